#!/usr/bin/env bash
# `make bench`: runs grad-bench (release build) against a Jupyter kernel in
# the same run. Installs the baseline's packages if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GRAD_PYTHON:-python3}
if ! "$PY" -c 'import jupyter_client, ipykernel' 2>/dev/null; then
  "$PY" -m pip install --quiet --disable-pip-version-check ipykernel jupyter_client
fi
GRAD_PYTHON="$PY" target/release/grad-bench 2> target/bench.log
