#!/usr/bin/env bash
# Runs the runner image (runner-image/Dockerfile, built as $IMAGE) the way a
# kubelet would run the Pod grad writes for it, and drives it through grad:
#   1. kmock (the Kubernetes API double of the tests) and grad with
#      --backend kubernetes on loopback;
#   2. `gractl runner create r1`: grad applies the runner's Secret, claim and
#      Pod to kmock;
#   3. the Pod's container runs with `docker run`: its image, its args, the
#      token from its Secret as the file the Pod mounts, as uid 1000, on the
#      host network (grad is on loopback);
#   4. execute-code with pandas and DuckDB in the image, through grad.
# Needs: a docker daemon that has $IMAGE, the workspace built (make build),
# python3 with kmock (tests/kmock/requirements.txt), curl.
#
#   IMAGE=grad-runner:dev bash scripts/verify_runner_image.sh
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-grad-runner:dev}"
DOCKER="${DOCKER:-docker}"
NS=grad-runners
work=$(mktemp -d /tmp/grad-verify-image.XXXXXX)
pids=()
container=""
cleanup() {
  [ -n "$container" ] && $DOCKER rm -f "$container" >/dev/null 2>&1 || true
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

python3 tests/kmock/kmock_server.py 0 > "$work/kmock.out" &
pids+=($!)
for _ in $(seq 50); do grep -q PORT "$work/kmock.out" && break; sleep 0.1; done
kport=$(awk '/PORT/ {print $2}' "$work/kmock.out")
cat > "$work/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: kmock, cluster: {server: "http://127.0.0.1:$kport"}}]
users: [{name: grad, user: {token: verify}}]
contexts: [{name: kmock, context: {cluster: kmock, user: grad}}]
current-context: kmock
EOF

gport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
KUBECONFIG="$work/kubeconfig" target/debug/grad serve --listen "127.0.0.1:$gport" \
  --data-dir "$work/grad" --backend kubernetes --namespace "$NS" --runner-image "$IMAGE" \
  > "$work/grad.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -f "$work/grad/admin.token" ] && curl -fsS "http://127.0.0.1:$gport/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
export GRAD_SERVER="http://127.0.0.1:$gport" GRAD_TOKEN
GRAD_TOKEN=$(cat "$work/grad/admin.token")
export GRACTL_CONFIG="$work/gractl.yaml"

target/debug/gractl runner create r1
api="http://127.0.0.1:$kport/api/v1/namespaces/$NS"
pod=""
for _ in $(seq 50); do
  pod=$(curl -fsS "$api/pods" | python3 -c 'import json,sys; items=json.load(sys.stdin)["items"]; print(items[0]["metadata"]["name"] if items else "")')
  [ -n "$pod" ] && break; sleep 0.1
done
[ -n "$pod" ] || { echo "verify: grad made no pod" >&2; cat "$work/grad.log" >&2; exit 1; }
curl -fsS "$api/pods/$pod" > "$work/pod.json"
secret=$(python3 -c 'import json,sys; p=json.load(open(sys.argv[1])); print([v["secret"]["secretName"] for v in p["spec"]["volumes"] if "secret" in v][0])' "$work/pod.json")
mkdir -p "$work/token" "$work/claim/workspace" "$work/claim/state"
curl -fsS "$api/secrets/$secret" | python3 -c 'import json,sys; print(json.load(sys.stdin)["stringData"]["token"], end="")' > "$work/token/token"
chmod 0444 "$work/token/token"
chown -R 1000:1000 "$work/claim"
mapfile -t args < <(python3 -c 'import json,sys; [print(a) for a in json.load(open(sys.argv[1]))["spec"]["containers"][0]["args"]]' "$work/pod.json")
echo "verify: running $pod from $IMAGE with args: ${args[*]}"

container=$($DOCKER run -d --network host --user 1000:1000 \
  -e GRAD_RUNNER_TOKEN_FILE=/var/run/grad/token \
  -v "$work/token:/var/run/grad:ro" \
  -v "$work/claim/workspace:/workspace" -v "$work/claim/state:/var/lib/grad-runner" \
  "$IMAGE" "${args[@]}")

for _ in $(seq 120); do
  state=$(target/debug/gractl runner get r1 -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
  [ "$state" = ready ] && break; sleep 0.5
done
[ "$state" = ready ] || { echo "verify: runner is $state" >&2; $DOCKER logs "$container" >&2; exit 1; }
out=$(target/debug/gractl execute-code -r r1 --code '
import pandas as pd, duckdb, os, platform
df = pd.DataFrame({"x": [1, 2, 3]})
print(duckdb.sql("select sum(x) as s from df").fetchall()[0][0], pd.__version__, duckdb.__version__, os.getuid(), platform.python_version())')
echo "verify: $out"
[ "$(echo "$out" | awk '{print $1}')" = 6 ] || { echo "verify: unexpected result" >&2; exit 1; }
[ "$(echo "$out" | awk '{print $4}')" = 1000 ] || { echo "verify: not uid 1000" >&2; exit 1; }
echo "verify: the runner image runs the pod grad wrote, as uid 1000, with pandas and DuckDB"
