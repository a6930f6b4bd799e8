"""One node in its own process, for the process benchmarks (run by bench/cluster.py).

It does what `kakehashi run --home HOME` does (configure logging, `Node(home)`,
start, serve until SIGTERM/SIGINT, stop cleanly), and in addition reports on
standard output, one line per event, so the benchmark can time commits without
polling the node:

    READY <monotonic> <pid>               the node has started and serves
    TRACED <monotonic>                    (with --trace) the timing table was written
    C <monotonic> <count> [<id> ...]      a committed step accepted <count> messages
                                          (ids: first 16 hex digits, with --ids)
    STOPPED <monotonic>

With --api-port, the node's file routes (`gateway.api_files`) are served on that port
of 127.0.0.1 over plain HTTP, with two benchmark-only routes: `POST /bench/user`
({"login"}: add the user, log in, answer {"user_id", "token"}) and `POST
/bench/room-users` ({"room", "users"}: make them members, as the room's home).

`<monotonic>` is `time.monotonic()`, i.e. CLOCK_MONOTONIC, which every process on
the machine shares, so times from different nodes and the benchmark compare.
Logs go to standard error, as with `kakehashi run`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

from federation.envelope import Envelope, Kind
from gateway import logging as node_logging
from gateway.api_files import file_routes
from gateway.config import Home, load_config
from gateway.node import Node
from gateway.process import tune


async def serve_api(node: Node, port: int) -> web.AppRunner:
    """The file routes, and the benchmark's setup routes, on 127.0.0.1:`port`."""

    async def add_user(request: web.Request) -> web.Response:
        login = str((await request.json())["login"])
        issued = await node.accounts.add_user(login, display_name="ベンチ " + login)
        assert issued.initial_password is not None
        tokens = await node.accounts.login(login, issued.initial_password)
        return web.json_response({"user_id": tokens.user_id, "token": tokens.access_token})

    async def room_users(request: web.Request) -> web.Response:
        data = await request.json()
        users = {str(user): "member" for user in data["users"]}
        result = await node.rooms.change(str(data["room"]), {"set_users": users})
        return web.json_response({"result": result})

    app = web.Application()
    app.add_routes(file_routes(node))
    app.add_routes([web.post("/bench/user", add_user), web.post("/bench/room-users", room_users)])
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home")
    parser.add_argument("--ids", action="store_true", help="report the id of every message")
    parser.add_argument(
        "--trace",
        metavar="FILE",
        help="time storage and delivery steps (bench/tracing.py); on SIGUSR1 write the table "
        "since the last SIGUSR1 to FILE as JSON and report `TRACED`",
    )
    parser.add_argument(
        "--api-port", type=int, help="serve the file routes on this port of 127.0.0.1"
    )
    args = parser.parse_args()
    if args.trace:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import tracing

        tracing.install()
    home = Home(Path(args.home).absolute())
    config = load_config(home)
    node_logging.configure(config.log_format, config.log_level)
    out = sys.stdout
    with_ids = args.ids

    def committed(envelopes: list[Envelope]) -> None:
        messages = [e for e in envelopes if e.content.kind is Kind.MESSAGE]
        if not messages:
            return
        now = time.monotonic()
        if with_ids:
            ids = " ".join(e.id.hex()[:16] for e in messages)
            out.write(f"C {now:.6f} {len(messages)} {ids}\n")
        else:
            out.write(f"C {now:.6f} {len(messages)}\n")
        out.flush()

    async def serve() -> None:
        node = Node(home)
        await node.start()
        node.rooms.listen(committed)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.trace:

            def dump_trace() -> None:
                Path(args.trace).write_text(json.dumps(tracing.dump()))
                out.write(f"TRACED {time.monotonic():.6f}\n")
                out.flush()

            loop.add_signal_handler(signal.SIGUSR1, dump_trace)
        api = await serve_api(node, args.api_port) if args.api_port else None
        out.write(f"READY {time.monotonic():.6f} {os.getpid()}\n")
        out.flush()
        try:
            await stop.wait()
        finally:
            if api is not None:
                await api.cleanup()
            await node.stop()
        out.write(f"STOPPED {time.monotonic():.6f}\n")
        out.flush()

    tune()  # as `kakehashi run` does
    asyncio.run(serve())


if __name__ == "__main__":
    main()
