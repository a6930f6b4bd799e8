"""A node that was down while 10,000 messages were exchanged catches up completely.

Four node processes share one room. ise is stopped (SIGTERM); tsu and yokkaichi
each send 5,000 numbered messages at the same time, so each one's messages depend
on the other's; once the three running nodes hold all 10,000, ise is started
again and must end with exactly the envelopes the others hold, in the same
timeline order, nothing missing and nothing twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import Federation, assert_exactly_once_in_causal_order, numbered

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

NODES = ("mie-pref", "tsu", "yokkaichi", "ise")
RUNNING = ("mie-pref", "tsu", "yokkaichi")
SENDERS = ("tsu", "yokkaichi")
PER_SENDER = 5000


def test_node_down_during_10000_messages_catches_up_completely(
    federation_of: Callable[..., Federation],
) -> None:
    started = time.monotonic()
    federation = federation_of(*NODES)
    room = federation.room_create("mie-pref", "県内連絡", ["tsu", "yokkaichi", "ise"])
    federation.wait_room_known(room, NODES)
    before = federation.envelope_count("mie-pref", room)
    print(f"{len(NODES)} nodes running and room ready in {time.monotonic() - started:.1f} s")

    federation.stop("ise")
    texts = {sender: numbered(sender, PER_SENDER) for sender in SENDERS}
    exchange = time.monotonic()
    with ThreadPoolExecutor(len(SENDERS)) as pool:
        sends = [pool.submit(federation.send, s, room, texts[s], check=False) for s in SENDERS]
        for sender, future in zip(SENDERS, sends, strict=True):
            result = future.result(timeout=120)
            assert result.returncode == 0, f"the send at {sender} failed: {result.stderr}"
    total = before + PER_SENDER * len(SENDERS)
    took = federation.wait_envelopes(room, RUNNING, total, timeout=120)
    assert took is not None, f"the running nodes {RUNNING} did not exchange all messages"
    print(f"{PER_SENDER * len(SENDERS)} messages exchanged in {time.monotonic() - exchange:.1f} s")

    restart = time.monotonic()
    federation.start("ise")
    caught_up = federation.wait_envelopes(room, ["ise"], total, timeout=120)
    elapsed = time.monotonic() - restart
    print(
        f"ise caught up in {elapsed:.1f} s after its restart"
        if caught_up is not None
        else f"ise did NOT catch up within {elapsed:.0f} s"
    )
    histories = federation.histories(room, NODES)
    assert_exactly_once_in_causal_order(histories, texts, "ise down during the exchange")
    assert caught_up is not None, "ise holds everything, but only after the timeout"
    problems = federation.log_problems()
    assert not problems, f"node logs show failures: {problems}"
    # The pages were decoded on ise's helper process (it starts on the first large page).
    assert '"decode_helper_started"' in federation.nodes["ise"].log.read_text(encoding="utf-8")
