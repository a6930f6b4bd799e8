"""Summaries of py-spy raw (collapsed-stack) profiles: where a node's CPU time goes.

Every line of a raw profile recorded with `--threads` is
`thread (TID): NAME;frame;frame;... COUNT`, frames as `function (file:line)`.
The summary splits samples by thread (the event loop is MainThread; aiosqlite
runs SQLite in its own thread) and lists, per thread, the functions with the
most samples at the top of the stack (self) and anywhere in it (inclusive).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")
_SHORTEN = (
    ("/tmp/kvenv/lib/python3.11/site-packages/", ""),
    (str(Path(__file__).resolve().parent.parent) + "/", ""),
)

# Frames that are on every stack and say nothing about where time goes.
_GENERIC = (
    "<module>",
    "run (asyncio/",
    "run_until_complete",
    "run_forever",
    "_run_once",
    "Handle._run",
    "_run (asyncio/events",
    "main (",
    "serve (",
    "Thread._bootstrap",
    "Thread.run",
    "(aiohttp/web_protocol.py)",
    "(aiohttp/web_app.py)",
    "(aiohttp/web_middlewares.py)",
    "admin_app.<locals>.errors",
)


def _function(frame: str) -> str:
    frame = _LINE.sub(")", frame.strip())
    for prefix, replacement in _SHORTEN:
        frame = frame.replace(prefix, replacement)
    return frame


def summarize(path: Path, top: int = 14) -> str:
    """A text summary of one raw profile."""
    threads: dict[str, tuple[Counter[str], Counter[str], list[int]]] = {}
    total = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames[-1].startswith(("EpollSelector.select", "select (selectors")):
            continue  # the event loop waiting for I/O: idle, whatever py-spy thought
        thread = frames[0]
        name = thread.partition(": ")[2] or thread
        kind = "event loop (MainThread)" if name == "MainThread" else f"thread {name}"
        self_counter, incl_counter, n = threads.setdefault(kind, (Counter(), Counter(), [0]))
        functions = [_function(f) for f in frames[1:]]
        n[0] += count
        total += count
        if functions:
            self_counter[functions[-1]] += count
        for function in set(functions):
            if not any(g in function for g in _GENERIC):
                incl_counter[function] += count
    if not total:
        return f"{path.name}: no samples (py-spy could not attach?)\n"
    lines = [f"{path.name}: {total} samples of CPU time (idle and epoll waits left out)"]
    for kind, (self_counter, incl_counter, n) in sorted(
        threads.items(), key=lambda item: -item[1][2][0]
    ):
        lines.append(f"  {kind}: {n[0]} samples ({n[0] / total:.0%})")
        lines.append("    self (top of stack):")
        for function, count in self_counter.most_common(top):
            lines.append(f"      {count / total:6.1%}  {function}")
        lines.append("    inclusive:")
        for function, count in incl_counter.most_common(top + 6):
            lines.append(f"      {count / total:6.1%}  {function}")
    return "\n".join(lines) + "\n"
