"""The `kakehashi` command: set up a node, run it, and operate the federation.

Commands that set a node up (`init`, `federation create`, `federation join`)
work on the home directly and need the node stopped. `audit show` and
`audit verify` read the node's database read-only, running or not. Every other
command talks to the running node through its admin socket.

Output is for people by default (tables, colours on a terminal) and JSON with
`--json`. Exit codes: 0 ok, 1 failure (one line saying what and one saying the
fix), 2 usage error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import click
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from federation.errors import ConfigError, KakehashiError

from . import logging as node_logging
from .admin_client import HISTORY_LIMIT, AdminClient
from .config import load_config, resolve_home

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])
# On a terminal rich uses its width; piped into a file or a log, 80 columns would cut
# node names and times, so tables get room to stay whole.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
# soft_wrap: an error is one line even when stderr is a pipe or a log (rich would wrap at 80).
err = Console(stderr=True, highlight=False, soft_wrap=True)


def home_option(func: F) -> F:
    return click.option(
        "--home",
        "home",
        envvar="KAKEHASHI_HOME",
        type=click.Path(file_okay=False),
        required=True,
        help="The node's home directory (or set KAKEHASHI_HOME).",
    )(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(func)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, indent=2))


def _admin(home: str) -> AdminClient:
    return AdminClient(resolve_home(home).admin_socket)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kakehashi")
def cli() -> None:
    """Kakehashi (架け橋): a federation gateway linking the prefecture and its municipalities.

    Each municipality runs a node; nodes exchange signed envelopes over mutual TLS.
    Start with `kakehashi init`, then `federation create` (prefecture) or
    `federation join TOKEN` (town), then `kakehashi run`.
    """


def _segment_pairs(items: tuple[str, ...]) -> dict[str, str]:
    """--segment NAME=URL options as {name: url}."""
    pairs: dict[str, str] = {}
    for item in items:
        segment, sep, url = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected NAME=URL", param_hint="--segment")
        pairs[segment.strip()] = url.strip()
    return pairs


@cli.command()
@home_option
@click.option("--node-id", required=True, help="Short lowercase id, e.g. tsu or mie-pref.")
@click.option("--name", required=True, help="Display name, e.g. 津市.")
@click.option("--code", default=None, help="6-digit local government code, e.g. 242012.")
@click.option(
    "--listen",
    required=True,
    metavar="HOST:PORT",
    help="Address of the federation API, e.g. 0.0.0.0:8443.",
)
@click.option(
    "--segment",
    "segments",
    multiple=True,
    metavar="NAME=URL",
    help="Network segment and this node's endpoint on it; repeat per segment "
    "(e.g. lgwan=https://10.20.0.2:8443). Default: one segment at the listen address.",
)
def init(
    home: str, node_id: str, name: str, code: str | None, listen: str, segments: tuple[str, ...]
) -> None:
    """Create a node home: configuration, keys (mode 0600) and database."""
    from .membership import init_home

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter("expected HOST:PORT, e.g. 0.0.0.0:8443", param_hint="--listen")
    pairs = _segment_pairs(segments)
    target = resolve_home(home)
    config = asyncio.run(
        init_home(
            target,
            node_id=node_id,
            name=name,
            code=code,
            listen_host=host.strip("[]"),
            listen_port=int(port),
            segments=pairs,
        )
    )
    out.print(f"initialised node [bold]{config.node_id}[/] ({config.name}) in {target.root}")
    for endpoint in config.endpoints:
        out.print(f"  segment {endpoint.segment}: {endpoint.url}")
    out.print("next: `kakehashi federation create` (prefecture) or `federation join TOKEN` (town)")


@cli.command()
@home_option
def run(home: str) -> None:
    """Run the node until interrupted (Ctrl-C or SIGTERM stops it cleanly)."""
    from .node import Node
    from .process import tune

    target = resolve_home(home)
    config = load_config(target)
    node_logging.configure(config.log_format, config.log_level)
    tune()

    async def serve() -> None:
        node = Node(target)
        await node.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.stop_requested.set)
        try:
            await node.stop_requested.wait()
        finally:
            await node.stop()

    asyncio.run(serve())


@cli.group()
def federation() -> None:
    """Create a federation (authority) or join one (member)."""


@federation.command("create")
@home_option
@click.option("--name", required=True, help="Federation name, e.g. '三重県 市町連携'.")
@json_option
def federation_create(home: str, name: str, as_json: bool) -> None:
    """Make this node the federation authority: federation key, CA, roster v1."""
    from .membership import create_federation

    roster = asyncio.run(create_federation(resolve_home(home), name=name))
    if as_json:
        _print_json({"federation_id": roster.federation_id, "roster_version": roster.version})
        return
    out.print(f"created federation [bold]{roster.federation_name}[/] ({roster.federation_id})")
    out.print(f"CA fingerprint (SHA-256): {roster.ca_fingerprint.hex()}")
    out.print("next: `kakehashi run`, then `kakehashi peer invite NODE_ID` for each town")


@federation.command("join")
@home_option
@click.argument("token")
@click.option(
    "--wait",
    default=600,
    show_default=True,
    help="Seconds to wait for an operator's approval when the invitation needs one.",
)
@json_option
def federation_join(home: str, token: str, wait: int, as_json: bool) -> None:
    """Join the federation TOKEN invites this node to (run before `kakehashi run`)."""
    from .membership import join_federation

    if token == "-":  # noqa: S105 - "-" means: read the token from standard input
        token = sys.stdin.readline().strip()

    def pending() -> None:
        err.print("waiting for the authority to approve this join (kakehashi peer approve) ...")

    outcome = asyncio.run(
        join_federation(resolve_home(home), token, wait_seconds=wait, on_pending=pending)
    )
    if as_json:
        _print_json(
            {
                "federation_id": outcome.federation_id,
                "roster_version": outcome.roster_version,
                "members": list(outcome.members),
            }
        )
        return
    out.print(
        f"joined [bold]{outcome.federation_name}[/] ({outcome.federation_id}); "
        f"authority {outcome.authority}; {len(outcome.members)} members"
    )
    out.print("next: `kakehashi run`")


@cli.group()
def peer() -> None:
    """Manage the federation's members (invite, approve, list, suspend, revoke)."""


@peer.command("invite")
@home_option
@click.argument("node_id")
@click.option("--expires", default="72h", show_default=True, help="Validity: 30m, 72h, 7d ...")
@click.option(
    "--approval",
    type=click.Choice(["auto", "manual"]),
    default="auto",
    show_default=True,
    help="manual: the join waits for `kakehashi peer approve`.",
)
@click.option("--relay", is_flag=True, help="The node will relay between network segments.")
@json_option
def peer_invite(
    home: str, node_id: str, expires: str, approval: str, relay: bool, as_json: bool
) -> None:
    """Issue a single-use invitation token for NODE_ID (authority only)."""
    data = _admin(home).request(
        "POST",
        "/v1/peers/invite",
        {"node_id": node_id, "expires": expires, "approval": approval, "relay": relay},
    )
    if as_json:
        _print_json(data)
        return
    if sys.stdout.isatty():
        expiry = datetime.fromtimestamp(data["expires_at"], UTC).isoformat(timespec="minutes")
        err.print(
            f"invitation for [bold]{node_id}[/] (single use, expires {expiry}, "
            f"approval {approval}); give it to the town's IT over a trusted channel:"
        )
    click.echo(data["token"])


@peer.command("pending")
@home_option
@json_option
def peer_pending(home: str, as_json: bool) -> None:
    """Join requests waiting for approval (authority only)."""
    rows = _admin(home).request("GET", "/v1/peers/pending")
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print("no join request is waiting")
        return
    table = Table("node", "requested", "relay")
    for row in rows:
        when = datetime.fromtimestamp(row["requested_at"], UTC).isoformat(timespec="seconds")
        table.add_row(row["node_id"], when, "yes" if row["relay"] else "")
    out.print(table)


@peer.command("approve")
@home_option
@click.argument("node_id")
@json_option
def peer_approve(home: str, node_id: str, as_json: bool) -> None:
    """Admit the waiting join of NODE_ID (authority only)."""
    data = _admin(home).request("POST", "/v1/peers/approve", {"node_id": node_id})
    if as_json:
        _print_json(data)
    else:
        out.print(f"approved {node_id}; roster version {data['roster_version']}")


@peer.command("deny")
@home_option
@click.argument("node_id")
@json_option
def peer_deny(home: str, node_id: str, as_json: bool) -> None:
    """Refuse the waiting join of NODE_ID (authority only)."""
    data = _admin(home).request("POST", "/v1/peers/deny", {"node_id": node_id})
    if as_json:
        _print_json(data)
    else:
        out.print(f"denied the join of {node_id}")


def _status_command(status: str, verb: str) -> Callable[..., None]:
    def command(home: str, node_id: str, reason: str, as_json: bool) -> None:
        data = _admin(home).request(
            "POST", "/v1/peers/status", {"node_id": node_id, "status": status, "reason": reason}
        )
        if as_json:
            _print_json(data)
        else:
            out.print(f"{verb} {node_id}; roster version {data['roster_version']}")

    return command


for _name, _status, _verb, _doc in (
    (
        "suspend",
        "suspended",
        "suspended",
        "Suspend NODE_ID: its connections are refused until resumed.",
    ),
    ("resume", "active", "resumed", "Resume a suspended NODE_ID."),
    (
        "revoke",
        "revoked",
        "revoked",
        "Revoke NODE_ID for good: its certificate and keys are refused.",
    ),
):
    peer.command(_name, help=_doc + " (authority only)")(
        home_option(
            click.argument("node_id")(
                click.option("--reason", default="", help="Why (kept in the roster).")(
                    json_option(_status_command(_status, _verb))
                )
            )
        )
    )


@peer.command("update")
@home_option
@click.argument("node_id")
@click.option(
    "--relay/--no-relay",
    default=None,
    help="Flag NODE_ID as a relay between segments (or clear the flag).",
)
@click.option(
    "--segment",
    "segments",
    multiple=True,
    metavar="NAME=URL",
    help="NODE_ID's endpoint on a segment; repeat per segment. Replaces all its endpoints.",
)
@json_option
def peer_update(
    home: str, node_id: str, relay: bool | None, segments: tuple[str, ...], as_json: bool
) -> None:
    """Change what the roster publishes for NODE_ID (authority only)."""
    if relay is None and not segments:
        raise click.UsageError("nothing to change: give --relay/--no-relay or --segment")
    change: dict[str, Any] = {"node_id": node_id}
    if relay is not None:
        change["relay"] = relay
    if segments:
        change["segments"] = _segment_pairs(segments)
    data = _admin(home).request("POST", "/v1/peers/update", change)
    if as_json:
        _print_json(data)
        return
    where = ", ".join(f"{name}={url}" for name, url in data["segments"].items())
    relay_text = "relay" if data["relay"] else "not a relay"
    out.print(f"{node_id}: {relay_text}; {where}; roster version {data['roster_version']}")


def _ago(iso: str | None) -> str:
    if iso is None:
        return "never"
    seconds = int((datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds())
    return f"{seconds}s ago" if seconds < 120 else f"{seconds // 60}m ago"


@peer.command("list")
@home_option
@json_option
def peer_list(home: str, as_json: bool) -> None:
    """Every member: status, health, segments, last contact, round trip, outbox depth, lag."""
    rows = _admin(home).request("GET", "/v1/peers")
    if as_json:
        _print_json(rows)
        return
    table = Table(
        "node",
        "name",
        "status",
        "health",
        "segments",
        "route",
        "last contact",
        "rtt",
        "outbox",
        "lag",
    )
    colours = {"up": "green", "down": "red", "self": "cyan"}
    for row in rows:
        health = row["health"]
        table.add_row(
            row["node_id"] + (" (relay)" if row["relay"] else ""),
            row["name"],
            row["status"],
            f"[{colours.get(health, 'yellow')}]{health}[/]",
            ",".join(row["segments"]),
            "-" if row["self"] else _route_cell(row),
            "-" if row["self"] else _ago(row["last_contact"]),
            "-" if row["rtt_ms"] is None else f"{row['rtt_ms']:.1f} ms",
            str(row.get("outbox", 0)),
            f"{row['delivery_lag_s']:.1f} s" if row.get("outbox") else "-",
        )
    out.print(table)


def _route_cell(row: dict[str, Any]) -> str:
    """How batches reach a peer: the route, and "stream" while they go on one."""
    route = row.get("route") or "none"
    return f"{route}, stream" if row.get("stream") else route


@cli.group()
def keys() -> None:
    """Rotate this node's keys through the authority (online, no downtime)."""


@keys.command("rotate")
@home_option
@click.option("--signing", "which", flag_value="signing", help="The envelope signing key.")
@click.option("--tls", "which", flag_value="tls", help="The TLS key and certificate.")
@click.option(
    "--federation", "which", flag_value="federation", help="The federation key (authority only)."
)
@json_option
def keys_rotate(home: str, which: str | None, as_json: bool) -> None:
    """Replace a key. The old one stays valid for an overlap (signing: 7 days, so what it
    signed keeps verifying forever; TLS: 1 day), and every node learns the new one
    from the roster within seconds. Nodes offline during a federation key rotation
    follow the chain of roster versions when they come back."""
    if which is None:
        raise click.UsageError("say which key: --signing, --tls or --federation")
    data = _admin(home).request("POST", "/v1/keys/rotate", {"key": which})
    if as_json:
        _print_json(data)
    elif which == "signing":
        out.print(
            f"signing key {data['key_id']} in use (was {data['previous']}); "
            f"roster version {data['roster_version']}"
        )
    elif which == "tls":
        out.print(
            f"new certificate {data['fingerprint'][:16]}… valid until {data['expires']}; "
            f"roster version {data['roster_version']}"
        )
    else:
        out.print(f"federation key {data['key_id']}; roster version {data['roster_version']}")


@cli.command("catchup")
@home_option
@click.option("--peer", default=None, metavar="NODE_ID", help="Only this peer (default: all).")
@click.option("--wait", is_flag=True, help="Follow until nothing is left, with a progress bar.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to follow at most.")
@json_option
def catchup(home: str, peer: str | None, wait: bool, timeout: float, as_json: bool) -> None:
    """Catch up now with the peers this node reaches (they send what it lacks).

    Nodes do this by themselves on reconnect and periodically; this starts it at once,
    and with --wait shows a big backlog being pulled."""
    admin = _admin(home)
    data = admin.request("POST", "/v1/catchup", {"peer": peer} if peer else {})
    requested: list[str] = data["requested"]
    if wait:
        # A peer already in a pass is not asked twice: that pass counts as ours.
        running = {p: v["number"] for p, v in data["peers"].items() if v["running"]}
        data = _follow_catch_up(admin, requested, data["passes"], running, timeout, as_json)
    if as_json:
        _print_json(data)
        return
    for name, progress in data["peers"].items():
        if name in requested:
            state = "running" if progress["running"] else "done"
            out.print(f"{name}: {progress['pulled']:,} pulled ({state})")
    if data["pending"]:
        out.print(f"[yellow]{data['pending']:,} envelopes still wait for their dependencies[/]")


def _follow_catch_up(
    admin: AdminClient,
    peers: list[str],
    after: int,
    running: dict[str, int],
    timeout: float,
    quiet: bool,
) -> dict[str, Any]:
    """Poll the node until, with every peer in `peers`, a pass numbered above `after` (or
    the one `running` when asked) ended; a progress bar on a terminal."""
    import time

    deadline = time.monotonic() + timeout
    columns = (
        TextColumn("catching up"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} envelopes"),
    )
    with Progress(*columns, console=err, disable=quiet or not err.is_terminal) as bar:
        task = bar.add_task("catch-up", total=None)
        while True:
            data: dict[str, Any] = admin.request("GET", "/v1/catchup")
            passes = {
                p: v
                for p, v in data["peers"].items()
                if p in peers and (v["number"] > after or v["number"] == running.get(p))
            }
            pulled = sum(v["pulled"] for v in passes.values())
            remaining = sum(v["remaining"] for v in passes.values() if v["running"])
            bar.update(task, completed=pulled, total=pulled + remaining or None)
            if len(passes) == len(peers) and not any(v["running"] for v in passes.values()):
                return data
            if time.monotonic() > deadline:
                raise KakehashiError(
                    f"catch-up still running after {timeout:.0f} s", code="catch_up_timeout"
                )
            time.sleep(0.2)


@cli.command("route")
@home_option
@click.argument("node_id")
@json_option
def route(home: str, node_id: str, as_json: bool) -> None:
    """How envelopes for NODE_ID travel from this node (direct, or via which relays), and why."""
    data = _admin(home).request("GET", f"/v1/route?node_id={quote(node_id)}")
    if as_json:
        _print_json(data)
        return
    chosen = data["route"]
    if chosen is None:
        out.print(f"[red]no route[/] to {node_id}")
    elif chosen["direct"]:
        out.print(f"[green]direct[/] to {node_id}")
    else:
        state = " [yellow](relay down: delivery waits)[/]" if chosen["degraded"] else ""
        out.print(f"via {' → '.join(chosen['path'])}{state}")
    out.print(f"  why: {data['reason']}")
    for alternative in data["alternatives"]:
        out.print(f"  alternative: via {' → '.join(alternative['path'])}")


@cli.group()
def room() -> None:
    """Shared rooms: create, invite nodes, send, read history."""


@room.command("create")
@home_option
@click.argument("name")
@click.option("--node", "nodes", multiple=True, metavar="NODE_ID", help="Member node; repeat.")
@click.option(
    "--announcement", is_flag=True, help="An announcement room: only admins post messages."
)
@json_option
def room_create(
    home: str, name: str, nodes: tuple[str, ...], announcement: bool, as_json: bool
) -> None:
    """Create a room NAME with this node as its home; prints the room id."""
    data = _admin(home).request(
        "POST",
        "/v1/rooms",
        {
            "name": name,
            "nodes": list(nodes),
            "kind": "announcement" if announcement else "standard",
        },
    )
    if as_json:
        _print_json({"room_id": data["room_id"]})
    else:
        click.echo(data["room_id"])


@room.command("invite")
@home_option
@click.argument("room_id", metavar="ROOM")
@click.argument("node_id")
@json_option
def room_invite(home: str, room_id: str, node_id: str, as_json: bool) -> None:
    """Add NODE_ID to ROOM (at the room's home directly; elsewhere by request to the home)."""
    _change_room_nodes(
        home,
        "invite",
        room_id,
        node_id,
        as_json,
        done=f"added {node_id} to {room_id}",
        asked=f"asked the room's home to add {node_id} to {room_id}",
    )


@room.command("remove")
@home_option
@click.argument("room_id", metavar="ROOM")
@click.argument("node_id")
@json_option
def room_remove(home: str, room_id: str, node_id: str, as_json: bool) -> None:
    """Take NODE_ID and its users out of ROOM.

    \b
    On the room's home node: removes any node but the home itself.
    On another node: only that node itself can leave (asked of the home).
    The removed node keeps the history it has and receives nothing newer.
    Revoked nodes are removed by the home node without this command."""
    _change_room_nodes(
        home,
        "remove",
        room_id,
        node_id,
        as_json,
        done=f"removed {node_id} from {room_id}",
        asked=f"asked the room's home to take {node_id} out of {room_id}",
    )


def _change_room_nodes(
    home: str, action: str, room_id: str, node_id: str, as_json: bool, *, done: str, asked: str
) -> None:
    """`room invite` / `room remove`: `done` when the change was made here (the room's
    home), `asked` when it was requested of the home."""
    change = {"room": room_id, "node_id": node_id}
    data = _admin(home).request("POST", f"/v1/rooms/{action}", change)
    if as_json:
        _print_json(data)
    else:
        out.print(done if data["result"] in ("added", "removed") else asked)


@room.command("list")
@home_option
@json_option
def room_list(home: str, as_json: bool) -> None:
    """Rooms this node takes part in."""
    rows = _admin(home).request("GET", "/v1/rooms")
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print("no rooms yet; create one with: kakehashi room create NAME --node NODE_ID")
        return
    table = Table("room", "name", "home", "nodes", "envelopes", "waiting")
    for row in rows:
        table.add_row(
            row["room_id"],
            row["name"] or "(joining)",
            f"{row['home']} (revoked)" if row.get("home_revoked") else row["home"],
            ",".join(row["nodes"]),
            str(row["envelopes"]),
            str(row["pending"]) if row["pending"] else "",
        )
    out.print(table)


@room.command("send")
@home_option
@click.argument("room_id", metavar="ROOM")
@click.argument("text")
@json_option
def room_send(home: str, room_id: str, text: str, as_json: bool) -> None:
    """Send TEXT to ROOM; with TEXT '-', send each line of standard input as one message."""
    client = _admin(home)
    if text != "-":
        data = client.request("POST", "/v1/rooms/send", {"room": room_id, "texts": [text]})
        if as_json:
            _print_json(data)
        return
    ids: list[str] = []
    chunk: list[str] = []
    first = 0  # the input line number of chunk[0]

    def flush() -> None:
        try:
            ids.extend(
                client.request("POST", "/v1/rooms/send", {"room": room_id, "texts": chunk})["ids"]
            )
        except KakehashiError as exc:
            # A chunk is one transaction: stored whole or not at all. Say exactly what is
            # stored, so a script resends only the rest (blank lines are not messages).
            exc.hint = (
                f"{len(ids)} messages, from the lines before line {first}, were sent and are "
                f"stored; resend from line {first}"
            )
            raise
        chunk.clear()

    for number, line in enumerate(sys.stdin, start=1):
        line = line.rstrip("\n")
        if line:
            if not chunk:
                first = number
            chunk.append(line)
        if len(chunk) >= 1000:
            flush()
    if chunk:
        flush()
    if as_json:
        _print_json({"room_id": room_id, "ids": ids})
    else:
        err.print(f"sent {len(ids)} messages")


@room.command("history")
@home_option
@click.argument("room_id", metavar="ROOM")
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(1, HISTORY_LIMIT),
    help="Newest N entries.",
)
@json_option
def room_history(home: str, room_id: str, limit: int, as_json: bool) -> None:
    """The room's timeline as this node holds it (oldest first)."""
    rows = _admin(home).request("GET", f"/v1/rooms/history?room={quote(room_id)}&limit={limit}")
    if as_json:
        _print_json(rows)
        return
    for row in rows:
        when = row["time"][11:19]
        who = row["sender"] or row["origin"]
        if row["kind"] == "message":
            out.print(f"{when} [bold]{escape(who)}[/] {escape(row['text'] or '')}")
        else:
            out.print(f"{when} [dim]{escape(who)} {escape(_describe(row['kind'], row['body']))}[/]")


def _describe(kind: str, body: dict[str, Any]) -> str:
    """One line for people about a non-message envelope."""
    if kind in ("state", "state-request"):
        parts = []
        if "name" in body:
            parts.append(f"name 「{body['name']}」")
        if body.get("add_nodes"):
            parts.append("+nodes " + ",".join(body["add_nodes"]))
        if body.get("remove_nodes"):
            parts.append("-nodes " + ",".join(body["remove_nodes"]))
        if body.get("set_users"):
            parts.append("+users " + ",".join(body["set_users"]))
        if body.get("remove_users"):
            parts.append("-users " + ",".join(body["remove_users"]))
        verb = "changed the room" if kind == "state" else "asked to change the room"
        return f"{verb}: " + "; ".join(parts)
    return f"{kind} {json.dumps(body, ensure_ascii=False)}"


@cli.command()
@home_option
@json_option
def status(home: str, as_json: bool) -> None:
    """This node: id, federation, roster version, certificate expiry, peers up/down."""
    data = _admin(home).request("GET", "/v1/status")
    if as_json:
        _print_json(data)
        return
    table = Table(show_header=False, box=None)
    for key, label in (
        ("node_id", "node"),
        ("name", "name"),
        ("federation_name", "federation"),
        ("federation_id", "federation id"),
        ("role", "role"),
        ("roster_version", "roster version"),
        ("listen", "listening on"),
        ("certificate_expires", "certificate expires"),
        ("certificate_days_left", "certificate days left"),
        ("peers_up", "peers up"),
        ("peers_down", "peers down"),
    ):
        table.add_row(label, str(data[key]))
    if data.get("catching_up"):
        table.add_row("catching up", "[yellow]yes: restored from a backup; local sends wait[/]")
    out.print(table)


@cli.command()
@home_option
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the node to finish stopping (0: ask and return).",
)
@json_option
def stop(home: str, wait: float, as_json: bool) -> None:
    """Stop the running node cleanly, as Ctrl-C or SIGTERM does: it finishes the commits
    under way, closes its connections and its database, and exits.

    Under systemd, use `systemctl stop` instead (or systemd restarts it)."""
    data = _admin(home).request("POST", "/v1/stop")
    node_id = data["node_id"]
    deadline = time.monotonic() + wait
    stopped = wait == 0
    probe = AdminClient(resolve_home(home).admin_socket, timeout=2.0)  # a stopping node is slow
    while not stopped and time.monotonic() < deadline:
        try:
            probe.request("GET", "/v1/status")
        except KakehashiError as exc:
            if exc.code == "node_not_running":
                stopped = True
            elif exc.code != "admin_failed":  # a node closing its socket can answer nothing
                raise
        else:
            time.sleep(0.1)
    if as_json:
        _print_json({"node_id": node_id, "pid": data["pid"], "stopped": stopped and wait > 0})
    elif wait == 0:
        out.print(f"asked {node_id} (pid {data['pid']}) to stop")
    if not stopped:
        raise ConfigError(
            f"{node_id} (pid {data['pid']}) was asked to stop and still runs after {wait:g} s",
            code="stop_timed_out",
            hint="its log says what it is waiting for; `kill -9` loses nothing committed",
        )
    if not as_json and wait > 0:
        out.print(f"stopped {node_id} (pid {data['pid']})")


@cli.group()
def maintenance() -> None:
    """Maintenance mode: /healthz answers 503 so a load balancer drains the node."""


def _print_maintenance(data: dict[str, Any]) -> None:
    if data["on"]:
        why = f": {escape(data['reason'])}" if data["reason"] else ""
        out.print(f"maintenance mode [yellow]on[/] since {data['since']}{why}")
        out.print("  /healthz answers 503; the node otherwise keeps working")
    else:
        out.print("maintenance mode [green]off[/]")


@maintenance.command("on")
@home_option
@click.option("--reason", default="", help="Why (shown by /healthz and `maintenance status`).")
@json_option
def maintenance_on(home: str, reason: str, as_json: bool) -> None:
    """Drain the node: /healthz answers 503 until `maintenance off` (survives restarts)."""
    data = _admin(home).request("POST", "/v1/maintenance", {"on": True, "reason": reason})
    if as_json:
        _print_json(data)
    else:
        _print_maintenance(data)


@maintenance.command("off")
@home_option
@json_option
def maintenance_off(home: str, as_json: bool) -> None:
    """Back in rotation: /healthz answers by the node's checks again."""
    data = _admin(home).request("POST", "/v1/maintenance", {"on": False})
    if as_json:
        _print_json(data)
    else:
        _print_maintenance(data)


@maintenance.command("status")
@home_option
@json_option
def maintenance_status(home: str, as_json: bool) -> None:
    """Whether maintenance mode is on, since when and why."""
    data = _admin(home).request("GET", "/v1/maintenance")
    if as_json:
        _print_json(data)
    else:
        _print_maintenance(data)


PASSPHRASE_ENV = "KAKEHASHI_BACKUP_PASSPHRASE"  # noqa: S105 - a variable name, no secret


def _passphrase(path: Path | None, *, confirm: bool) -> str:
    """From --passphrase-file (its first line), else the environment, else asked (hidden)."""
    if path is not None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read the passphrase file {path}: {exc}", code="passphrase_unreadable"
            ) from exc
        return lines[0] if lines else ""
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV]
    if not sys.stdin.isatty():
        raise ConfigError(
            "no passphrase given for the backup",
            code="no_passphrase",
            hint=f"pass --passphrase-file PATH or set {PASSPHRASE_ENV} (or run in a terminal)",
        )
    text: str = click.prompt(
        "backup passphrase", hide_input=True, confirmation_prompt=confirm, err=True
    )
    return text


_PHASES = {"database": "database snapshot", "archive": "encrypting", "restore": "decrypting"}


def _amount(phase: str, done: int, total: int) -> str:
    if phase == "database":
        return f"{done}/{total} pages"
    return f"{decimal(done)}/{decimal(total)}"


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar per phase on a terminal; otherwise a plain line per quarter (none if
    `quiet`). Both on standard error, so standard output stays for --json."""
    if err.is_terminal:
        columns = (
            TextColumn("{task.description:<18}"),
            BarColumn(),
            TextColumn("{task.fields[amount]}"),
        )
        with Progress(*columns, console=err) as bar:
            tasks: dict[str, Any] = {}

            def report_bar(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(_PHASES[phase], total=total, amount="")
                bar.update(
                    tasks[phase], completed=done, total=total, amount=_amount(phase, done, total)
                )

            yield report_bar
        return
    printed: dict[str, int] = {}

    def report_lines(phase: str, done: int, total: int) -> None:
        quarter = 4 if total <= 0 else min(4, done * 4 // total)
        if quiet or printed.get(phase, -1) >= quarter:
            return
        printed[phase] = quarter
        err.print(f"{_PHASES[phase]}: {_amount(phase, done, total)}")

    yield report_lines


@cli.command()
@home_option
@json_option
def doctor(home: str, as_json: bool) -> None:
    """Find what is wrong with this node and say how to fix it.

    Asks the running node (certificate, database, clock skew and reachability per
    peer and segment, roster versions, outboxes, maintenance mode) and checks the
    home's files (config, key modes). If the node is not running, says so and checks
    what it can offline (config, key modes, certificate expiry from the file, free
    disk space).
    Exit code 0 when every check is ok, 1 when any warns or is critical.
    """
    from .health import Check, Severity, offline_checks

    target = resolve_home(home)
    target.require_initialised()
    checks: list[Check] = []
    running = True
    try:
        checks = [Check.from_json(row) for row in _admin(home).request("GET", "/v1/doctor")]
    except KakehashiError as exc:
        if exc.code != "node_not_running":
            raise
        running = False
        checks.append(
            Check(
                check="node",
                status=Severity.CRITICAL,
                detail=f"the node is not running (no answer on {target.admin_socket})",
                fix=f"start it: `kakehashi run --home {target.root}` (or its service unit); "
                "the checks below are of its files only",
            )
        )
    checks[1:1] = offline_checks(target, datetime.now(UTC), running=running)
    problems = [c for c in checks if c.status is not Severity.OK]
    if as_json:
        _print_json([c.to_json() for c in checks])
    else:
        colours = {Severity.OK: "green", Severity.WARN: "yellow", Severity.CRITICAL: "red"}
        table = Table("status", "check", "detail", "fix", show_lines=bool(problems))
        for check in checks:
            colour = colours[check.status]
            table.add_row(
                f"[{colour}]{check.status.value}[/]",
                check.check,
                escape(check.detail),
                escape(check.fix or ""),
            )
        out.print(table)
        if problems:
            critical = sum(c.status is Severity.CRITICAL for c in problems)
            warnings = len(problems) - critical
            out.print(
                f"[red]{len(problems)} problem{'' if len(problems) == 1 else 's'}[/] "
                f"({critical} critical, {warnings} warning{'' if warnings == 1 else 's'})"
            )
        else:
            out.print("[green]no problem found[/]")
    if problems:
        sys.exit(1)


@cli.command()
@home_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Read the passphrase from the first line of this file (or set {PASSPHRASE_ENV}; "
    "otherwise it is asked twice).",
)
@json_option
def backup(home: str, file: Path, passphrase_file: Path | None, as_json: bool) -> None:
    """Write an encrypted backup of this node's home (database, config, keys) to FILE.

    Works while the node runs: the database is copied online, consistently.
    """
    from .backup import backup_home

    target = resolve_home(home)
    passphrase = _passphrase(passphrase_file, confirm=True)
    with _progress(as_json) as report:
        summary = backup_home(target, file, passphrase, progress=report)
    if as_json:
        _print_json(summary.to_json())
        return
    out.print(
        f"backup of node [bold]{summary.node_id}[/] written to {escape(summary.file)} "
        f"({decimal(summary.bytes)}, {summary.database_pages} database pages, {summary.created})"
    )
    out.print("keep the passphrase safe: without it the backup cannot be restored")


@cli.command()
@home_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Read the passphrase from the first line of this file (or set {PASSPHRASE_ENV}).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace a non-empty home: it is moved aside to HOME.before-restore-TIME first.",
)
@json_option
def restore(
    home: str, file: Path, passphrase_file: Path | None, force: bool, as_json: bool
) -> None:
    """Restore the backup FILE into the home (which must be missing or empty, or --force).

    The node must not be running. On its next start it catches up with its peers
    before it sends anything new.
    """
    from .backup import restore_home

    target = resolve_home(home)
    passphrase = _passphrase(passphrase_file, confirm=False)
    with _progress(as_json) as report:
        summary = restore_home(file, target, passphrase, force=force, progress=report)
    if as_json:
        _print_json(summary.to_json())
        return
    out.print(
        f"restored node [bold]{summary.node_id}[/] (backup of {summary.created}) "
        f"into {escape(summary.home)}"
    )
    if summary.moved_aside:
        out.print(f"the previous home was moved to {escape(summary.moved_aside)}")
    out.print(
        f"next: `kakehashi run --home {escape(summary.home)}`; it first catches up with its "
        "peers (local sends wait until then)"
    )


@cli.group()
def audit() -> None:
    """The node's audit log: what happened to its trust relationships, and a tamper check.

    Both commands read the node's database directly, read-only, whether the node runs or not.
    """


def _since_ms(text: str) -> int:
    """--since as unix ms: a duration back from now (24h, 7d) or a date/time (local time
    unless it names its zone)."""
    from federation.errors import ProtocolError
    from federation.invites import parse_duration

    with contextlib.suppress(ProtocolError):
        return int((datetime.now(UTC).timestamp() - parse_duration(text)) * 1000)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: use a duration (24h, 7d) or a date (2026-11-01, 2026-11-01T09:00)",
            param_hint="--since",
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # the operator's local time
    return int(when.timestamp() * 1000)


def _audit_time(at_ms: int) -> str:
    return datetime.fromtimestamp(at_ms / 1000, UTC).astimezone().isoformat(timespec="seconds")


def _field_text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_field_text(item) for item in value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


@audit.command("show")
@home_option
@click.option("--since", default=None, help="From a duration ago (24h, 7d) or a date (2026-11-01).")
@click.option("--event", default=None, metavar="NAME", help="Only this event, e.g. peer_refused.")
@click.option(
    "--limit",
    default=100,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="The newest N records.",
)
@json_option
def audit_show(home: str, since: str | None, event: str | None, limit: int, as_json: bool) -> None:
    """Audit records, oldest first: seq, time, event, fields."""
    from federation.audit import AuditRecord

    from .audit import read_records

    since_ms = None if since is None else _since_ms(since)
    rows = read_records(resolve_home(home).database, since_ms=since_ms, event=event, limit=limit)
    if as_json:
        _print_json(
            [
                {
                    "seq": r.seq,
                    "at_ms": r.at_ms,
                    "time": _audit_time(r.at_ms),
                    "event": r.event,
                    "fields": r.field_map,
                }
                if isinstance(r, AuditRecord)
                else {"seq": r.seq, "unreadable": r.reason}
                for r in rows
            ]
        )
        return
    if not rows:
        out.print("no audit records" + (" match" if since or event else " yet"))
        return
    table = Table("seq", "time", "event", "fields")
    for r in rows:
        if isinstance(r, AuditRecord):
            text = " ".join(f"{name}={_field_text(value)}" for name, value in r.field_map.items())
            table.add_row(str(r.seq), _audit_time(r.at_ms), r.event, escape(text))
        else:
            table.add_row(str(r.seq), "?", "[red]unreadable[/]", escape(r.reason))
    out.print(table)


@audit.command("verify")
@home_option
@json_option
def audit_verify(home: str, as_json: bool) -> None:
    """Check the audit log's hash chain and signed heads; exit 1 naming each damaged record."""
    from federation.errors import StorageError

    from .audit import verify_log

    report = verify_log(resolve_home(home))
    if as_json:
        _print_json(report.to_json())
    elif report.intact:
        signed = (
            f"last signed head at seq {report.last_signed_seq}"
            if report.last_signed_seq is not None
            else "no signed head yet"
        )
        out.print(f"audit log intact: {report.records} records, {signed}")
        if report.unsigned:
            out.print(
                f"  {report.unsigned} newer records are not signed yet "
                "(the running node signs them within a minute, and at stop)"
            )
    else:
        count = len(report.problems)
        out.print(f"audit log NOT intact: {count} problem{'' if count == 1 else 's'}")
        for problem in report.problems:
            out.print(f"  {escape(problem.describe())}")
    if not report.intact:
        raise StorageError(
            "the audit log was changed outside the node",
            code="audit_log_tampered",
            hint="keep this database as evidence; compare it with a backup of node.db",
        )


# `kakehashi user ...` lives in its own module, which uses this module's options and consoles.
from .usercli import user  # noqa: E402

cli.add_command(user)


def main() -> None:
    """Entry point: run the CLI, turning Kakehashi errors into one clear line and exit code 1."""
    # Set-up and admin commands print for people; their logs only matter when something
    # goes wrong. `run` reconfigures from the node's config.
    node_logging.configure("auto", "warning")
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2 if isinstance(exc, click.UsageError) else 1)
    except KakehashiError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))} [dim]({exc.code})[/]")
        if exc.hint:
            err.print(f"  fix: {escape(exc.hint)}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    with contextlib.suppress(Exception):
        sys.stdout.flush()


if __name__ == "__main__":
    main()
