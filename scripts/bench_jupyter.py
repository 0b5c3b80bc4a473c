"""The baseline for `make bench`: a Jupyter kernel driven by jupyter_client,
the way a notebook front end drives it. Prints one JSON document with the
samples in seconds: kernel start times and execute round trips of `code`.

usage: bench_jupyter.py ROUNDS STARTS
"""
import json
import sys
import time

from jupyter_client.manager import start_new_kernel

rounds, starts = int(sys.argv[1]), int(sys.argv[2])
code = "1+1"


def run(kc, code):
    msg_id = kc.execute(code)
    # A round trip ends when the kernel reports idle for this request, after
    # it has sent the result (as a notebook waits before running the next cell).
    while True:
        msg = kc.get_iopub_msg(timeout=10)
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            break
    kc.get_shell_msg(timeout=10)


start_times = []
for _ in range(starts):
    t = time.perf_counter()
    km, kc = start_new_kernel(kernel_name="python3")
    start_times.append(time.perf_counter() - t)
    kc.stop_channels()
    km.shutdown_kernel(now=True)

km, kc = start_new_kernel(kernel_name="python3")
for _ in range(20):
    run(kc, code)
samples = []
for _ in range(rounds):
    t = time.perf_counter()
    run(kc, code)
    samples.append(time.perf_counter() - t)
kc.stop_channels()
km.shutdown_kernel(now=True)
print(json.dumps({"start": start_times, "execute": samples}))
