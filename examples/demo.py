"""A local federation on 127.0.0.1: Mie prefecture and three of its cities.

Everything here is done with the `kakehashi` command, exactly as operators would
on four machines: the prefecture initialises its node, creates the federation,
runs it and invites each city; each city initialises, joins with its token and
runs. Then every node prints its view of the federation (`peer list`), the
prefecture opens a shared room with every city, each node posts to it, and every
node prints the room's timeline: the same messages in the same order.

    make demo                 # runs until Ctrl-C, then stops every node cleanly
    python examples/demo.py --once   # form, show, stop (used by the tests)

Homes and logs are kept in `.demo/` (wiped at each start).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gateway.local import free_port

ROOT = Path(__file__).resolve().parent.parent
KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")
AUTHORITY = ("mie-pref", "三重県", "240001")
TOWNS = (
    ("tsu", "津市", "242012"),
    ("yokkaichi", "四日市市", "242021"),
    ("ise", "伊勢市", "242039"),
)
STAFF = (("tanaka", "田中太郎", "room_admin"), ("suzuki", "鈴木花子", "staff"))
"""Staff added on every node: (login, display name, role)."""


def kakehashi(*args: str, capture: bool = False) -> str:
    """Run one CLI command; stop the demo with its message if it fails."""
    result = subprocess.run(
        [KAKEHASHI, *args], capture_output=capture, text=True, check=False, env=os.environ
    )
    if result.returncode != 0:
        if capture:
            sys.stderr.write(result.stderr)
        raise SystemExit(f"demo: `kakehashi {' '.join(args[:2])}` failed")
    return result.stdout if capture else ""


def answers(home: str | Path) -> bool:
    """A node runs on `home` and answers `kakehashi status`."""
    probe = subprocess.run(
        [KAKEHASHI, "status", "--home", str(home), "--json"], capture_output=True, check=False
    )
    return probe.returncode == 0


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


class Demo:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.api_ports: dict[str, int] = {}

    def home(self, node_id: str) -> str:
        return str(self.base / node_id)

    def init(self, node_id: str, name: str, code: str) -> None:
        kakehashi(
            "init",
            "--home",
            self.home(node_id),
            "--node-id",
            node_id,
            "--name",
            name,
            "--code",
            code,
            "--listen",
            f"127.0.0.1:{free_port()}",
        )
        config = Path(self.home(node_id)) / "config.toml"
        # A short health interval so the demo shows everyone up within a second or two.
        config.write_text(
            config.read_text().replace("interval_seconds = 5.0", "interval_seconds = 1.0")
        )
        # The staff client API and web client on a loopback port of its own.
        self.api_ports[node_id] = free_port()
        with config.open("a", encoding="utf-8") as out:
            out.write(f'\n[api]\nlisten = "127.0.0.1:{self.api_ports[node_id]}"\n')

    def staff(self) -> None:
        """Two staff per node, added through the running node, and the web client URLs."""
        for node_id, port in self.api_ports.items():
            url = f"https://127.0.0.1:{port}/"
            print(f"\n{node_id}: web client {url}")
            loopback = ssl.create_default_context()
            loopback.check_hostname, loopback.verify_mode = False, ssl.CERT_NONE
            with urllib.request.urlopen(url, context=loopback, timeout=10) as answer:
                page = answer.read().decode("utf-8")
            if "ログイン" in page:
                print("  serves the login page (ログイン)")
            for login, name, role in STAFF:
                password = f"{login}-{node_id}-demo-2026"
                secret = self.base / f"{node_id}-{login}.password"
                secret.write_text(password + "\n", encoding="utf-8")
                secret.chmod(0o600)
                kakehashi(
                    "user",
                    "add",
                    login,
                    "--home",
                    self.home(node_id),
                    "--name",
                    name,
                    "--role",
                    role,
                    "--password-file",
                    str(secret),
                    "--json",
                    capture=True,
                )
                print(f"  login {login} / password {password}  ({name}, {role})")

    def run(self, node_id: str) -> None:
        log = open(self.base / f"{node_id}.log", "wb")  # noqa: SIM115 - owned by the child's lifetime
        self.processes[node_id] = subprocess.Popen(
            [KAKEHASHI, "run", "--home", self.home(node_id)], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.processes[node_id].poll() is not None:
                raise SystemExit(f"demo: node {node_id} exited; see {self.base / node_id}.log")
            if answers(self.home(node_id)):
                return
            time.sleep(0.2)
        raise SystemExit(f"demo: node {node_id} did not start; see {self.base / node_id}.log")

    def all_up(self) -> bool:
        expected = 1 + len(TOWNS)
        for node_id in self.processes:
            rows = json.loads(
                kakehashi("peer", "list", "--home", self.home(node_id), "--json", capture=True)
            )
            if len(rows) != expected or any(r["health"] not in ("up", "self") for r in rows):
                return False
        return True

    def history(self, node_id: str, room: str) -> list[dict[str, str]]:
        rows = json.loads(
            kakehashi("room", "history", "--home", self.home(node_id), room, "--json", capture=True)
        )
        return [row for row in rows if row["kind"] == "message"]

    def shared_room(self) -> None:
        """A prefecture-wide room: every node posts, every node shows the same timeline."""
        authority = AUTHORITY[0]
        towns = [town for town, _, _ in TOWNS]
        step(f"{AUTHORITY[1]} opens a shared room with every town")
        nodes = [arg for town in towns for arg in ("--node", town)]
        room = kakehashi(
            "room",
            "create",
            "--home",
            self.home(authority),
            "停電情報 連絡室",
            *nodes,
            capture=True,
        ).strip()
        print(f"room id: {room}")
        messages = {
            authority: [
                "【県】本日14時より県内一部地域で停電が発生しています",
                "各市の状況を報告してください",
            ],
            "tsu": ["津市: 市役所本庁舎は自家発電で稼働中"],
            "yokkaichi": ["四日市市: 沿岸部で約1,200戸が停電"],
            "ise": ["伊勢市: 影響なし、避難所の開設準備は不要"],
        }
        expected = sum(len(texts) for texts in messages.values())
        deadline = time.monotonic() + 20
        while any(self.history_or_none(town, room) is None for town in towns):
            if time.monotonic() > deadline:
                raise SystemExit("demo: the room did not reach every town")
            time.sleep(0.2)
        for node_id, texts in messages.items():
            for text in texts:
                kakehashi("room", "send", "--home", self.home(node_id), room, text)
        timelines: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            timelines = {
                node: [row["id"] for row in self.history(node, room)] for node in self.processes
            }
            if all(len(ids) == expected for ids in timelines.values()):
                break
            time.sleep(0.2)
        for node in self.processes:
            step(f"kakehashi room history --home .demo/{node} ROOM")
            kakehashi("room", "history", "--home", self.home(node), room)
        same = len({tuple(ids) for ids in timelines.values()}) == 1
        counts = {node: len(ids) for node, ids in timelines.items()}
        if not same or set(counts.values()) != {expected}:
            raise SystemExit(f"demo: timelines differ between nodes: {counts}")
        print(f"\nthe same {expected} messages, in the same order, on all {len(timelines)} nodes")

    def history_or_none(self, node_id: str, room: str) -> list[dict[str, str]] | None:
        result = subprocess.run(
            [KAKEHASHI, "room", "history", "--home", self.home(node_id), room, "--json"],
            capture_output=True,
            check=False,
        )
        return json.loads(result.stdout) if result.returncode == 0 else None

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for node_id, process in self.processes.items():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print(f"demo: {node_id} did not stop in time; killing it", file=sys.stderr)
                process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="form the federation, show it, stop")
    parser.add_argument("--dir", default=str(ROOT / ".demo"), help="where the node homes go")
    args = parser.parse_args()
    base = Path(args.dir)
    # Wiping the homes of running nodes would leave them serving from deleted files,
    # and their shutdown would remove the new nodes' admin sockets.
    running = [home for home in sorted(base.glob("*/")) if answers(home)]
    if running:
        stops = "; ".join(f"kakehashi stop --home {home}" for home in running)
        raise SystemExit(
            f"demo: nodes of an earlier demo still run in {base} "
            f"({', '.join(home.name for home in running)}); stop that demo with Ctrl-C in "
            f"its terminal (if it is gone: {stops}), or give another --dir"
        )
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    demo = Demo(base)
    try:
        node_id, name, code = AUTHORITY
        step(f"{name} ({node_id}): init, create the federation, run")
        demo.init(node_id, name, code)
        kakehashi("federation", "create", "--home", demo.home(node_id), "--name", "三重県 市町連携")
        demo.run(node_id)
        for town, town_name, town_code in TOWNS:
            step(f"{town_name} ({town}): invited by {name}, init, join, run")
            token = kakehashi(
                "peer", "invite", "--home", demo.home(node_id), town, capture=True
            ).strip()
            print(f"invitation token for {town}: {token[:24]}…")
            demo.init(town, town_name, town_code)
            kakehashi("federation", "join", "--home", demo.home(town), token)
            demo.run(town)
        deadline = time.monotonic() + 20
        while not demo.all_up():
            if time.monotonic() > deadline:
                raise SystemExit(
                    "demo: not every node sees every peer up after 20 s; see .demo/*.log"
                )
            time.sleep(0.3)
        for node in demo.processes:
            step(f"kakehashi peer list --home .demo/{node}")
            kakehashi("peer", "list", "--home", demo.home(node))
        step(f"kakehashi status --home .demo/{AUTHORITY[0]}")
        kakehashi("status", "--home", demo.home(AUTHORITY[0]))
        demo.shared_room()
        step("web clients (the node certificate is from the federation CA: accept it)")
        demo.staff()
        if args.once:
            return
        print(
            "\nThe federation is running. Try, in another terminal:\n"
            f"  .venv/bin/kakehashi peer list --home {base}/tsu\n"
            f"  .venv/bin/kakehashi peer invite --home {base}/mie-pref matsusaka\n"
            "Ctrl-C stops every node.",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        step("stopping every node")
        demo.stop()
        print("stopped cleanly")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # SIGTERM (e.g. from a service manager) stops the demo like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    main()
