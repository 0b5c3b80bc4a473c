"""Drives `gractl mcp` with the official MCP Python SDK (a real MCP client,
not one written for grad) and prints what it got as one JSON document, for
tests/tests/mcp.rs to check.

Usage: python3 mcp_client.py GRACTL SCENARIO
The environment (GRAD_SERVER, GRAD_TOKEN, GRACTL_CONFIG) is passed to gractl.
"""

import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp import MCPError


def result(r):
    """A tool result as plain JSON."""
    content = []
    for block in r.content:
        if block.type == "text":
            content.append({"type": "text", "text": block.text})
        elif block.type == "image":
            content.append({"type": "image", "mimeType": block.mime_type, "data": block.data})
        else:
            content.append({"type": block.type})
    return {"isError": bool(r.is_error), "content": content, "structured": r.structured_content}


async def call(session, name, args):
    try:
        return result(await session.call_tool(name, args))
    except MCPError as e:
        return {"protocolError": {"code": e.error.code, "message": e.error.message}}


async def scenario(session, which):
    out = {}
    if which == "basics":
        tools = await session.list_tools()
        out["tools"] = {t.name: t.input_schema for t in tools.tools}
        out["create"] = await call(session, "create_runner", {"name": "mcp1"})
        out["plot"] = await call(session, "execute_code", {
            "runner": "mcp1",
            "code": "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
                    "plt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\nplt.show()\nprint('plotted')",
        })
        out["raises"] = await call(session, "execute_code", {"runner": "mcp1", "code": "1 / 0"})
        out["bad_argument"] = await call(session, "execute_code", {"runner": "mcp1"})
        out["unknown_field"] = await call(session, "execute_code", {"runner": "mcp1", "code": "1", "kode": "2"})
        out["no_runner"] = await call(session, "execute_code", {"runner": "nope", "code": "1"})
        out["state"] = await call(session, "execute_code", {"runner": "mcp1", "code": "x = 41"})
        out["state_kept"] = await call(session, "execute_code", {
            "runner": "mcp1", "code": "x + params['k']", "params": {"k": 1},
        })
        out["write"] = await call(session, "write_file", {
            "runner": "mcp1", "path": "code/notes/hello.txt", "content": "hello from an agent\n",
        })
        out["read"] = await call(session, "read_file", {"runner": "mcp1", "path": "code/notes/hello.txt"})
        out["list"] = await call(session, "list_files", {"runner": "mcp1", "path": "code/notes"})
        out["escape"] = await call(session, "read_file", {"runner": "mcp1", "path": "../../etc/passwd"})
        out["delete"] = await call(session, "delete_runner", {"runner": "mcp1"})
    elif which == "agent":
        # Only MCP calls: a runner, parquet through DuckDB, an aggregate, a plot, the PNG back.
        steps = []
        steps.append(await call(session, "create_runner", {"name": "analyst"}))
        steps.append(await call(session, "execute_code", {"runner": "analyst", "code":
            "import duckdb\n"
            "duckdb.sql(\"COPY (SELECT i % 3 AS k, i AS v FROM range(300) t(i)) TO '../outputs/t.parquet' (FORMAT parquet)\")\n"
            "print('written')"}))
        steps.append(await call(session, "execute_code", {"runner": "analyst", "code":
            "import duckdb\n"
            "df = duckdb.sql(\"SELECT k, sum(v) AS total FROM '../outputs/t.parquet' GROUP BY k ORDER BY k\").df()\n"
            "df.to_dict(orient='list')"}))
        steps.append(await call(session, "execute_code", {"runner": "analyst", "code":
            "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
            "fig, ax = plt.subplots()\nax.bar(df.k, df.total)\nfig.savefig('../outputs/totals.png')\nprint('saved')"}))
        steps.append(await call(session, "list_files", {"runner": "analyst", "path": "outputs"}))
        steps.append(await call(session, "read_file", {"runner": "analyst", "path": "outputs/totals.png"}))
        steps.append(await call(session, "delete_runner", {"runner": "analyst"}))
        steps.append(await call(session, "list_runners", {}))
        out["steps"] = steps
    elif which == "jobs":
        out["create"] = await call(session, "create_runner", {"name": "jobs1"})
        out["submit"] = await call(session, "submit_job", {"dir": os.environ["PROJECT_DIR"]})
        job = out["submit"]["structured"]["id"]
        for _ in range(300):
            status = await call(session, "job_status", {"id": job})
            if status["structured"]["state"] in ("succeeded", "failed", "cancelled"):
                break
            await asyncio.sleep(0.1)
        out["status"] = status
        out["logs"] = await call(session, "job_logs", {"id": job})
        out["no_dir"] = await call(session, "submit_job", {"dir": "/no/such/dir"})
        out["delete"] = await call(session, "delete_runner", {"runner": "jobs1"})
    elif which == "logged_out":
        out["list"] = await call(session, "list_runners", {})
    return out


async def main():
    gractl, which = sys.argv[1], sys.argv[2]
    params = StdioServerParameters(command=gractl, args=["mcp"], env=dict(os.environ))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            out = {
                "server": init.server_info.name,
                "instructions": init.instructions,
                "protocol": init.protocol_version,
            }
            out.update(await scenario(session, which))
    json.dump(out, sys.stdout)


asyncio.run(main())
