"""torchrun roles: rank 0 sends one message per engine step; every other rank runs the same step.

A message is two int64 broadcasts over the control group (a header, then the payload: the step plan
as integers, StepPlan.encode), never a pickle. Rank 0 also sends a no-op when idle, so the process
group's timeout never fires between requests and workers can tell they are still in step (their /healthz).
"""

import logging
import time

import torch
import torch.distributed as dist

from presets.engine.scheduler import StepPlan

log = logging.getLogger(__name__)

NOOP, STEP, EXIT = range(3)


class StepChannel:
    def __init__(self, group):
        self.group = group

    def send(self, op: int, payload: list[int] = ()) -> None:
        """Broadcast (op, payload) from rank 0."""
        header = torch.tensor([op, len(payload)], dtype=torch.long)
        dist.broadcast(header, 0, group=self.group)
        if payload:
            dist.broadcast(torch.tensor(payload, dtype=torch.long), 0, group=self.group)

    def recv(self) -> tuple[int, list[int]]:
        """(op, payload) as rank 0 sent it."""
        header = torch.empty(2, dtype=torch.long)
        dist.broadcast(header, 0, group=self.group)
        op, size = header.tolist()
        payload = torch.empty(size, dtype=torch.long)
        if size:
            dist.broadcast(payload, 0, group=self.group)
        return op, payload.tolist()


class LeaderEngine:
    """Rank 0's view of a step engine: each step is announced to the other ranks, then run here too."""

    def __init__(self, engine, channel: StepChannel):
        self.engine = engine
        self.channel = channel
        self.device = engine.device
        self.kv_config = engine.kv_config
        self.max_num_batched_tokens = engine.max_num_batched_tokens

    def run(self, plan: StepPlan):
        self.channel.send(STEP, plan.encode())
        return self.engine.run(plan)

    def heartbeat(self) -> None:
        self.channel.send(NOOP)

    def close(self) -> None:
        self.channel.send(EXIT)


def follow(engine, channel: StepChannel, on_message=lambda: None) -> None:
    """Run rank 0's steps on this rank's shard until rank 0 says exit; collective errors propagate."""
    while True:
        op, payload = channel.recv()
        on_message()
        if op == EXIT:
            return
        if op == STEP:
            engine.run(StepPlan.decode(payload))


class FollowerState:
    """What a worker rank's /healthz reports: loaded, and hearing from rank 0 recently."""

    def __init__(self, stale_after_s: float):
        self.stale_after_s = stale_after_s
        self.state = "loading"
        self.last_message = None

    def touch(self) -> None:
        self.last_message = time.monotonic()

    def health(self) -> tuple[bool, str]:
        if self.state != "following":
            return False, f"worker {self.state}"
        if self.last_message is None:
            return False, "worker has not heard from rank 0 yet"
        age = time.monotonic() - self.last_message
        if age > self.stale_after_s:
            return False, f"no message from rank 0 for {age:.0f}s"
        return True, "Healthy"


def heartbeat_interval(timeout_s: float) -> float:
    """How often idle rank 0 messages the others: well inside the process group's timeout."""
    return max(0.2, min(5.0, timeout_s / 4))
