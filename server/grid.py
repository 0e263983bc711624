"""A Grid wrapper that polls for replies more often than Flower's deployment Grid.

Flower 1.42's ``HttpGrid.send_and_receive`` (deployment) sleeps 3 s between pulls, so a
round waits up to 3 s after the last reply, twice (train, evaluate). This wrapper uses
the same public ``push_messages`` / ``pull_messages`` calls with a shorter interval. In
simulation (``InMemoryGrid``, already polling quickly) it is not used.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class FastPollGrid(Grid):
    """Delegates everything to ``inner``; ``send_and_receive`` polls every ``interval`` s."""

    def __init__(self, inner: Grid, interval: float = 0.1) -> None:
        self.inner, self.interval = inner, interval

    def set_run(self, run: Run) -> None:
        """Delegate."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """Delegate."""
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        """Delegate."""
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """Delegate."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegate."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull every ``interval`` s until all replies came or ``timeout``."""
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        while pending and (timeout is None or time.monotonic() < end):
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self.interval)
        return replies
