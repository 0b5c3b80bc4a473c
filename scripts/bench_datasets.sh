#!/usr/bin/env bash
# `make bench` (object storage part), against a real S3-compatible server
# (s3s-fs) on loopback, side by side in one run:
#   1. a 100 MB object uploaded and downloaded with a URL presigned by grad's
#      S3 blob store, against curl's own SigV4-signed PUT/GET (`--aws-sigv4`)
#      of the same object to the same server; both sent by curl;
#   2. a DuckDB query over a parquet dataset read through the s3fs mount, the
#      way a runner mounts it, against copying the file locally first and
#      querying the copy;
#   3. grad's own path for outputs, end to end: a real grad on this S3 server,
#      `gractl outputs collect` of a new 100 MB file in a runner's outputs/
#      (the runner hashes it, asks grad for a URL, PUTs it, grad checks and
#      records it) and `gractl outputs pull` (presigned GET, SHA-256 checked,
#      renamed into place), against curl --aws-sigv4 PUT and GET of the same
#      bytes; and a collection when nothing changed.
# Each step runs ROUNDS times; prints medians and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${BIN:-target/release}")
ROUNDS=${ROUNDS:-5}
SIZE_MB=${SIZE_MB:-100}
PYTHON=${GRAD_PYTHON:-python3}

for tool in s3s-fs s3fs curl; do
  command -v "$tool" >/dev/null || { echo "bench_datasets: $tool is missing (see .ci/run)" >&2; exit 1; }
done

TMP=$(mktemp -d /dev/shm/grad-bench-datasets.XXXXXX)
S3_PID= GRAD_PID=
cleanup() {
  set +e
  fusermount3 -u "$TMP/mnt" 2>/dev/null
  [ -n "$GRAD_PID" ] && kill "$GRAD_PID" 2>/dev/null && wait "$GRAD_PID" 2>/dev/null
  pkill -f "grad-runner.*$TMP" 2>/dev/null
  [ -n "$S3_PID" ] && kill "$S3_PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

export AWS_ACCESS_KEY_ID=bench-access AWS_SECRET_ACCESS_KEY=bench-secret-key-0123456789
mkdir -p "$TMP/s3/bench" "$TMP/mnt"
PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
s3s-fs --host 127.0.0.1 --port "$PORT" --access-key "$AWS_ACCESS_KEY_ID" \
  --secret-key "$AWS_SECRET_ACCESS_KEY" "$TMP/s3" >/dev/null 2>&1 &
S3_PID=$!
ENDPOINT="http://127.0.0.1:$PORT"
for _ in $(seq 100); do curl -s -o /dev/null "$ENDPOINT" && break; sleep 0.05; done

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { print b - a }'; }
# S3 wants the payload hash header; curl signs it as given.
sigv4=(--aws-sigv4 "aws:amz:us-east-1:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY"
  -H "x-amz-content-sha256: UNSIGNED-PAYLOAD")

# curl for a presigned request: METHOD URL HEADER... as grad-presign prints them.
presigned() {
  local what=$1; shift
  local lines method url headers=()
  mapfile -t lines < <("$BIN/grad-presign" "$what" "$ENDPOINT" bench "$@")
  method=${lines[0]} url=${lines[1]}
  for h in "${lines[@]:2}"; do headers+=(-H "$h"); done
  PRESIGNED=(-X "$method" "${headers[@]}" "$url")
}

# --- 1. presigned vs curl's own SigV4 -----------------------------------------
head -c "$((SIZE_MB * 1000 * 1000))" /dev/urandom > "$TMP/blob"
SHA=$(sha256sum "$TMP/blob" | cut -d' ' -f1)
# The same request body either way (curl 7.88 mis-signs `-T` uploads).
body=(-H "Content-Type: application/octet-stream" --data-binary "@$TMP/blob")
up_p=() up_r=() down_p=() down_r=()
for r in $(seq "$ROUNDS"); do
  presigned put "p$r" "$SHA"
  t0=$(now); curl -sSf -o /dev/null "${body[@]}" "${PRESIGNED[@]}"; t1=$(now); up_p+=("$(elapsed "$t0" "$t1")")
  t0=$(now); curl -sSf -o /dev/null -X PUT "${body[@]}" "${sigv4[@]}" "$ENDPOINT/bench/r$r"; t1=$(now); up_r+=("$(elapsed "$t0" "$t1")")
  presigned get "p$r"
  t0=$(now); curl -sSf -o "$TMP/down" "${PRESIGNED[@]}"; t1=$(now); down_p+=("$(elapsed "$t0" "$t1")")
  cmp -s "$TMP/blob" "$TMP/down" || { echo "presigned download differs" >&2; exit 1; }
  t0=$(now); curl -sSf -o "$TMP/down" "${sigv4[@]}" "$ENDPOINT/bench/r$r"; t1=$(now); down_r+=("$(elapsed "$t0" "$t1")")
done
row() {
  local name=$1 ours theirs; ours=$(printf '%s\n' "${!2}" | median); theirs=$(printf '%s\n' "${!3}" | median)
  awk -v n="$name" -v o="$ours" -v t="$theirs" -v mb="$SIZE_MB" \
    'BEGIN { printf "| %s | %.3f (%.0f MB/s) | %.3f (%.0f MB/s) | %.2fx |\n", n, o, mb / o, t, mb / t, t / o }'
}
printf '| %s MB object | presigned URL from grad (median s) | curl --aws-sigv4 (median s) | presigned speed vs curl |\n|---|---|---|---|\n' "$SIZE_MB"
row upload 'up_p[@]' 'up_r[@]'
row download 'down_p[@]' 'down_r[@]'

# --- 2. parquet through the s3fs mount vs copied first -------------------------
"$PYTHON" -c "import duckdb; duckdb.sql(\"COPY (SELECT i AS id, i % 1000 AS k, random() AS x FROM range(${ROWS:-8000000}) t(i)) TO '$TMP/trips.parquet' (FORMAT parquet)\")"
curl -sSf -o /dev/null -X PUT -H "Content-Type: application/octet-stream" \
  --data-binary "@$TMP/trips.parquet" "${sigv4[@]}" "$ENDPOINT/bench/trips.parquet"
printf '%s:%s' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" > "$TMP/passwd"; chmod 600 "$TMP/passwd"
s3fs bench "$TMP/mnt" -o "ro,passwd_file=$TMP/passwd,url=$ENDPOINT,endpoint=us-east-1,use_path_request_style"
for _ in $(seq 100); do [ -e "$TMP/mnt/trips.parquet" ] && break; sleep 0.1; done
QUERY="SELECT k, count(*), avg(x) FROM read_parquet('%s') GROUP BY k ORDER BY k"
query() { "$PYTHON" -c "import duckdb; duckdb.sql(\"$(printf "$QUERY" "$1")\").fetchall()"; }
mount_t=() copy_t=()
for r in $(seq "$ROUNDS"); do
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(now); query "$TMP/mnt/trips.parquet"; t1=$(now); mount_t+=("$(elapsed "$t0" "$t1")")
  sync; echo 3 > /proc/sys/vm/drop_caches; rm -f "$TMP/local.parquet"
  t0=$(now); cp "$TMP/mnt/trips.parquet" "$TMP/local.parquet"; query "$TMP/local.parquet"; t1=$(now); copy_t+=("$(elapsed "$t0" "$t1")")
done
MB=$(du -m "$TMP/trips.parquet" | cut -f1)
m=$(printf '%s\n' "${mount_t[@]}" | median); c=$(printf '%s\n' "${copy_t[@]}" | median)
printf '\n| DuckDB GROUP BY over a %s MB parquet dataset | median s |\n|---|---|\n' "$MB"
printf '| read through the s3fs mount | %.3f |\n| copy from the mount to local disk, then read | %.3f |\n' "$m" "$c"
awk -v m="$m" -v c="$c" 'BEGIN { printf "| mount vs copy-first | %.2fx |\n", c / m }'

# --- 3. outputs through grad vs curl ------------------------------------------
fusermount3 -u "$TMP/mnt"
mkdir -p "$TMP/s3/grad"
GRAD_PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN/grad" serve --listen "127.0.0.1:$GRAD_PORT" --data-dir "$TMP/grad" --python "$PYTHON" \
  --blob-store s3 --s3-bucket grad --s3-endpoint "$ENDPOINT" --s3-path-style --s3-region us-east-1 \
  2>"$TMP/grad.log" &
GRAD_PID=$!
for _ in $(seq 200); do [ -s "$TMP/grad/admin.token" ] && curl -s -o /dev/null "http://127.0.0.1:$GRAD_PORT/healthz" && break; sleep 0.05; done
export GRAD_SERVER="http://127.0.0.1:$GRAD_PORT" GRAD_TOKEN GRACTL_CONFIG="$TMP/gractl.yaml"
GRAD_TOKEN=$(cat "$TMP/grad/admin.token")
gractl() { "$BIN/gractl" "$@"; }
gractl runner create bench --wait >/dev/null
OUT="$TMP/grad/runners/admin/bench/workspace/outputs"
collect_t=() put_t=() pull_t=() get_t=() same_t=()
for r in $(seq "$ROUNDS"); do
  head -c "$((SIZE_MB * 1000 * 1000))" /dev/urandom > "$OUT/big.bin"
  cp "$OUT/big.bin" "$TMP/blob"
  sync
  t0=$(now); gractl outputs collect bench >/dev/null; t1=$(now); collect_t+=("$(elapsed "$t0" "$t1")")
  t0=$(now); curl -sSf -o /dev/null -X PUT "${body[@]}" "${sigv4[@]}" "$ENDPOINT/bench/o$r"; t1=$(now); put_t+=("$(elapsed "$t0" "$t1")")
  t0=$(now); gractl outputs collect bench >/dev/null; t1=$(now); same_t+=("$(elapsed "$t0" "$t1")")
  rm -rf "$TMP/pulled"
  t0=$(now); gractl outputs pull bench "$TMP/pulled" --no-collect >/dev/null; t1=$(now); pull_t+=("$(elapsed "$t0" "$t1")")
  cmp -s "$OUT/big.bin" "$TMP/pulled/big.bin" || { echo "pulled output differs" >&2; exit 1; }
  rm -f "$TMP/pulled/big.bin"
  t0=$(now); curl -sSf -o "$TMP/down" "${sigv4[@]}" "$ENDPOINT/bench/o$r"; t1=$(now); get_t+=("$(elapsed "$t0" "$t1")")
done
printf '\n| %s MB output | grad (median s) | curl --aws-sigv4 (median s) | grad speed vs curl |\n|---|---|---|---|\n' "$SIZE_MB"
row 'gractl outputs collect (hash + PUT + record)' 'collect_t[@]' 'put_t[@]'
row 'gractl outputs pull (GET + SHA-256 check)' 'pull_t[@]' 'get_t[@]'
s=$(printf '%s\n' "${same_t[@]}" | median)
printf '| collect again, nothing changed | %.3f | - | - |\n' "$s"

echo; echo 'All rounds (seconds):'
echo "    upload: presigned ${up_p[*]} / curl ${up_r[*]}"
echo "    download: presigned ${down_p[*]} / curl ${down_r[*]}"
echo "    parquet: mount ${mount_t[*]} / copy-first ${copy_t[*]}"
echo "    outputs collect: grad ${collect_t[*]} / curl PUT ${put_t[*]}; unchanged ${same_t[*]}"
echo "    outputs pull: grad ${pull_t[*]} / curl GET ${get_t[*]}"
