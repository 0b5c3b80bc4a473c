#!/usr/bin/env bash
# `make bench` (workspace sync part): the same file workload on two FUSE
# mounts side by side in one run:
#   grad  — `gractl workspace sync`: FUSE → SFTP → SSH → gRPC tunnel → grad →
#           grad-runner's SSH server, all on loopback;
#   sshfs — Debian's sshfs → OpenSSH sshd + sftp-server on loopback.
# Workload: sequential write and read of 256 MiB (page cache dropped before the
# read), creating 2000 small files (in a new directory each round), `ls -lR`
# cold (of everything: ROUNDS x 2000 files), `cat` of 2000 small files.
# Each step runs ROUNDS times per mount; prints medians and grad/sshfs ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${BIN:-target/release}")
ROUNDS=${ROUNDS:-5}
SIZE_MB=${SIZE_MB:-256}
SMALL=${SMALL:-2000}

if ! command -v sshfs >/dev/null || ! command -v sshd >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sshfs openssh-server fuse3 >/dev/null
fi

# Where both servers keep their files: tmpfs by default, so that the figures
# compare the two transports rather than this machine's disk (whose fsync of
# 256 MiB alone swings between 0.26 and 0.68 s); STORE=disk puts them on /tmp.
case ${STORE:-tmpfs} in
  tmpfs) BASE=/dev/shm ;;
  disk) BASE=/tmp ;;
  *) echo "STORE must be tmpfs or disk, not '$STORE'" >&2; exit 2 ;;
esac
TMP=$(mktemp -d "$BASE/grad-bench-sync.XXXXXX")
echo "(files kept on ${STORE:-tmpfs}: $BASE)"
GRAD_PID= SSHD_PID=
cleanup() {
  set +e
  [ -n "${WS:-}" ] && (cd "$WS" && GRACTL workspace unsync >/dev/null 2>&1)
  fusermount3 -u "$TMP/sshfs" 2>/dev/null
  [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null
  [ -n "$GRAD_PID" ] && kill "$GRAD_PID" 2>/dev/null && wait "$GRAD_PID" 2>/dev/null
  pkill -f "$TMP/grad/runners" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

# --- sshfs on a private sshd ------------------------------------------------
mkdir -p "$TMP/sshd" "$TMP/remote" "$TMP/sshfs" /run/sshd
chmod 755 /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$TMP/sshd/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$TMP/sshd/client_key"
cp "$TMP/sshd/client_key.pub" "$TMP/sshd/authorized_keys"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$TMP/sshd/config" <<CFG
Port $PORT
ListenAddress 127.0.0.1
HostKey $TMP/sshd/host_key
AuthorizedKeysFile $TMP/sshd/authorized_keys
PidFile $TMP/sshd/pid
UsePAM no
StrictModes no
PermitRootLogin yes
Subsystem sftp /usr/lib/openssh/sftp-server
CFG
/usr/sbin/sshd -D -e -f "$TMP/sshd/config" 2> "$TMP/sshd/log" &
SSHD_PID=$!
for _ in $(seq 100); do ssh-keyscan -p "$PORT" 127.0.0.1 >/dev/null 2>&1 && break; sleep 0.05; done
sshfs -o "IdentityFile=$TMP/sshd/client_key,Port=$PORT,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes" \
  "root@127.0.0.1:$TMP/remote" "$TMP/sshfs"

# --- grad + a runner + gractl workspace sync ----------------------------------
"$BIN/grad" serve --listen 127.0.0.1:0 --data-dir "$TMP/grad" 2> "$TMP/grad.log" &
GRAD_PID=$!
for _ in $(seq 200); do
  ADDR=$(sed -n 's/.*grad serving.*addr=\([0-9.:]*\).*/\1/p' "$TMP/grad.log" | head -1)
  [ -n "$ADDR" ] && break
  sleep 0.05
done
export GRAD_SERVER="http://$ADDR" GRAD_TOKEN=$(cat "$TMP/grad/admin.token") GRACTL_CONFIG="$TMP/gractl.yaml"
GRACTL() { "$BIN/gractl" "$@"; }
GRACTL runner create bench --wait >/dev/null
WS="$TMP/ws"
GRACTL workspace init "$WS" >/dev/null
(cd "$WS" && GRACTL workspace sync >/dev/null)
GRAD_MNT="$WS/runners/bench"
grep -q " $GRAD_MNT " /proc/self/mountinfo || { echo "grad mount missing" >&2; exit 1; }

# --- the workload -------------------------------------------------------------
head -c "$((SIZE_MB << 20))" /dev/urandom > "$TMP/big.src"
now() { date +%s.%N; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# step MOUNT NAME ROUND: prints seconds for round ROUND of step NAME on MOUNT.
step() {
  local m=$1 name=$2 round=$3 t0 t1
  case $name in
    write) rm -f "$m/big"; drop; t0=$(now); dd if="$TMP/big.src" of="$m/big" bs=1M conv=fsync status=none; t1=$(now) ;;
    read) drop; t0=$(now); dd if="$m/big" of=/dev/null bs=1M status=none; t1=$(now) ;;
    # A new directory each round, nothing deleted: ext4 makes creating
    # files right after thousands were deleted slow for any client (it
    # scans for inodes not recently freed), which would swamp both mounts.
    create) mkdir "$m/small$round"; t0=$(now)
            for i in $(seq "$SMALL"); do echo "file $i" > "$m/small$round/f$i"; done; t1=$(now) ;;
    ls) drop; t0=$(now); ls -lR "$m" > /dev/null; t1=$(now) ;;
    cat) drop; t0=$(now); cat "$m"/small1/* > /dev/null; t1=$(now) ;;
  esac
  awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '| step | grad (median s) | sshfs (median s) | grad speed vs sshfs |\n|---|---|---|---|\n'
for name in write read create ls cat; do
  g=(); s=()
  for r in $(seq "$ROUNDS"); do
    g+=("$(step "$GRAD_MNT" "$name" "$r")")
    s+=("$(step "$TMP/sshfs" "$name" "$r")")
  done
  gm=$(printf '%s\n' "${g[@]}" | median); sm=$(printf '%s\n' "${s[@]}" | median)
  case $name in
    write|read) extra=$(awk -v n="$SIZE_MB" -v g="$gm" -v s="$sm" 'BEGIN { printf " (%.0f vs %.0f MB/s)", n * 1.048576 / g, n * 1.048576 / s }') ;;
    *) extra= ;;
  esac
  printf '| %s | %.3f | %.3f | %.2fx%s |\n' "$name" "$gm" "$sm" "$(awk -v g="$gm" -v s="$sm" 'BEGIN { print s / g }')" "$extra"
  echo "$name: grad ${g[*]} / sshfs ${s[*]}" >> "$TMP/rounds"
done
echo; echo 'All rounds (seconds):'; sed 's/^/    /' "$TMP/rounds"
cmp "$TMP/big.src" "$GRAD_MNT/big" && echo "(256 MiB file identical through the grad mount)"
