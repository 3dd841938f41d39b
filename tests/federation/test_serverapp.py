"""The Flower ServerApp's grid: replies are collected as soon as they are in, not on Flower's 3-second beat."""

from __future__ import annotations

import time
from types import SimpleNamespace

from fgrpo.federation.serverapp import PromptGrid


class SlowRepliesGrid:
    """A stand-in for a SuperLink's grid: each message's reply appears `delay_s` after the push."""

    def __init__(self, delay_s: dict[str, float]) -> None:
        self.delay_s, self.pushed_at, self.pulls = delay_s, 0.0, 0
        self.connection = "superlink"

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [m.id for m in messages]

    def pull_messages(self, message_ids):
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in message_ids if now >= self.delay_s[i]]


def test_replies_are_collected_soon_after_they_arrive():
    inner = SlowRepliesGrid({"a": 0.0, "b": 0.3})
    grid = PromptGrid(inner, poll_s=0.05)
    started = time.monotonic()
    replies = grid.send_and_receive([SimpleNamespace(id="a"), SimpleNamespace(id="b")], timeout=10)
    waited = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert 0.3 <= waited < 2.0  # Flower's own grid would have returned after 3 s
    assert inner.pulls >= 3 and grid.connection == "superlink"  # the rest is the grid's own


def test_a_timeout_returns_the_replies_that_came_in_time():
    inner = SlowRepliesGrid({"a": 0.0, "late": 60.0})
    started = time.monotonic()
    replies = PromptGrid(inner, poll_s=0.05).send_and_receive([SimpleNamespace(id="a"), SimpleNamespace(id="late")],
                                                             timeout=0.4)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.35 <= time.monotonic() - started < 1.5
