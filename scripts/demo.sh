#!/usr/bin/env bash
# `make demo`: grad end to end on the embedded default. Prepares a Python
# environment with pandas and DuckDB, starts grad with a fresh data dir,
# creates a runner, runs a pandas + DuckDB snippet twice (state kept), pulls
# its outputs, shows pause/resume/delete, and stops grad.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/debug}
DATA=${DEMO_DATA_DIR:-.grad/demo}
VENV=${DEMO_VENV:-.grad/venv}

step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
run() { printf '$ %s\n' "$*" >&2; "$@"; }

step "Python environment for runners ($VENV)"
if ! "$VENV/bin/python" -c 'import pandas, duckdb' 2>/dev/null; then
  # Reuse what the system Python already has; install only what is missing.
  python3 -m venv --system-site-packages "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check pandas duckdb
fi
"$VENV/bin/python" -c 'import sys, pandas, duckdb; print(f"python {sys.version.split()[0]}, pandas {pandas.__version__}, duckdb {duckdb.__version__}")'

step "Start grad (data dir $DATA)"
rm -rf "$DATA"
mkdir -p "$DATA"
"$BIN/grad" serve --listen 127.0.0.1:0 --data-dir "$DATA" --python "$VENV/bin/python" \
  2> "$DATA/grad.log" &
GRAD_PID=$!
cleanup() {
  kill "$GRAD_PID" 2>/dev/null || true
  wait "$GRAD_PID" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 300); do
  ADDR=$(sed -n 's/.*grad serving.*addr=\([0-9.:]*\).*/\1/p' "$DATA/grad.log" | head -1)
  [ -n "$ADDR" ] && break
  kill -0 "$GRAD_PID" 2>/dev/null || { cat "$DATA/grad.log" >&2; exit 1; }
  sleep 0.05
done
[ -n "$ADDR" ] || { echo "grad did not start; see $DATA/grad.log" >&2; exit 1; }
echo "grad is serving on http://$ADDR"

# Keep the demo's credentials away from the user's real gractl config.
export GRACTL_CONFIG="$DATA/gractl.yaml"
unset GRAD_TOKEN GRAD_SERVER GRAD_WORKSPACE
G="$BIN/gractl"

step "Log in with the admin token grad wrote at first start"
run "$G" login --server "http://$ADDR" --token-file "$DATA/admin.token"

step "Create a runner"
run "$G" runner create demo --cpu 2 --memory 4Gi --wait
run "$G" runner list

step "pandas + DuckDB, first call: build a DataFrame and query it with SQL"
run "$G" execute-code -r demo --code '
import pandas as pd, duckdb
sales = pd.DataFrame({
    "region": ["eu", "us", "eu", "apac", "us"],
    "amount": [120, 340, 80, 210, 95],
})
duckdb.sql("SELECT region, SUM(amount) AS total FROM sales GROUP BY region ORDER BY total DESC").df()
'

step "Second call: the interpreter kept its state (sales is still defined)"
run "$G" execute-code -r demo --param k=10 --code '
top = duckdb.sql("SELECT region FROM sales ORDER BY amount DESC LIMIT 1").fetchall()[0][0]
print(f"{len(sales)} rows kept between calls; top region: {top}")
int(sales.amount.sum()) * params["k"]
'

step "Machine-readable output for programs and AI agents"
run "$G" execute-code -r demo -o json --code 'sales.amount.max()'

step "Outputs: what the runner writes to outputs/ is collected and pulled back"
run "$G" execute-code -r demo --code 'sales.to_csv("../outputs/sales.csv", index=False)'
run "$G" outputs pull demo "$DATA/results"
run head -3 "$DATA/results/sales.csv"

step "Pause (files kept), resume, delete (outputs stay pullable)"
run "$G" runner pause demo --wait
run "$G" runner resume demo --wait
run "$G" runner delete demo --wait
run "$G" outputs list

step "Stop grad"
cleanup
trap - EXIT
echo "demo finished; grad's log is in $DATA/grad.log"
