"""Flower's floor: each round sends one empty message to every node and waits for the
empty replies (pulled every 0.1 s, as fedrec's ServerApp does). Imports only flwr."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Reply at once, with nothing."""
    return Message(RecordDict(), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """``rounds`` rounds over ``nodes`` nodes; round times go to ``out-file`` (JSON)."""
    cfg = context.run_config
    nodes = int(cfg["nodes"])
    while len(ids := list(grid.get_node_ids())) < nodes:
        time.sleep(0.1)
    seconds = []
    for _ in range(int(cfg["rounds"])):
        t0 = time.perf_counter()
        msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN)
                for n in ids[:nodes]]
        pending = set(grid.push_messages(msgs))
        while pending:
            got = list(grid.pull_messages(pending))
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(0.1)
        seconds.append(time.perf_counter() - t0)
    Path(str(cfg["out-file"])).write_text(json.dumps({"round_seconds": seconds}))
