"""The block manager and the scheduler's plans, model-free: random traffic against a cache that records
what was written where, so every read a step makes is checked against the tokens it should see."""

import random

import pytest

from presets.engine.block_manager import BlockManager
from presets.engine.params import SamplingParams
from presets.engine.scheduler import Scheduler, SchedulerConfig, Sequence, Status

VOCAB = 1000


def next_token(tokens: list[int]) -> int:
    """The 'model': a deterministic function of the whole sequence, so any wrong cache read or lost token shows."""
    return (sum(tokens[-3:]) * 31 + len(tokens)) % VOCAB


class RecordingCache:
    """Stands in for the engine: (block, offset) -> (token, position), written before any read of a step."""

    def __init__(self, scheduler: Scheduler):
        self.sched, self.bs = scheduler, scheduler.config.block_size
        self.cells: dict[tuple[int, int], tuple[int, int]] = {}

    def run(self, plan, shared_before: set[int] = frozenset()) -> list[int]:
        """The sampled tokens; `shared_before`: blocks held by several sequences before this step was planned."""
        for it in plan.items:  # 1. every write of the step
            for pos, tok in enumerate(it.tokens, it.start):
                block = it.blocks[pos // self.bs]
                assert block not in shared_before, f"block {block} is written while other sequences hold it"
                self.cells[block, pos % self.bs] = (tok, pos)
        out = []
        for it, seq in zip(plan.items, plan.seqs):  # 2. every read: the whole prefix through the table
            end = it.start + len(it.tokens)
            assert len(set(it.blocks)) == len(it.blocks), "a block twice in one table"
            for pos in range(end):
                got = self.cells.get((it.blocks[pos // self.bs], pos % self.bs))
                assert got == (seq.tokens[pos], pos), f"position {pos} reads {got}, not {(seq.tokens[pos], pos)}"
            if it.sample:
                out.append(next_token(seq.tokens[:end]))
        return out


def step(sched: Scheduler, cache: RecordingCache):
    """Plan, run and postprocess one step, checking the pool after it; returns the plan."""
    shared = {b.id for b in sched.blocks.blocks if b.ref > 1}
    plan = sched.schedule()
    sched.postprocess(plan, cache.run(plan, shared), eos_ids=())
    check_pool(sched)
    return plan


def check_pool(sched: Scheduler) -> None:
    bm = sched.blocks
    held = [b for s in sched.running for b in s.sched.table.blocks]
    for block in bm.blocks:
        assert block.ref == held.count(block.id), f"block {block.id}: ref {block.ref}, held {held.count(block.id)}"
        assert (block.ref == 0) == (block.id in bm.free)
        if block.ref > 1:
            assert block.key is not None and len(block.tokens) == bm.block_size, "a shared block that is not full"
    for key, b in bm.cached.items():
        assert bm.blocks[b].key == key


def expected_output(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_random_traffic_never_leaks_double_frees_or_reads_wrong_blocks(seed, prefix_caching):
    rng = random.Random(seed)
    bs = rng.choice([1, 4, 16])
    num_blocks = rng.randint(-(-70 // bs), -(-105 // bs))  # from one longest sequence to 1.5
    sched = Scheduler(SchedulerConfig(rng.randint(2, 8), num_blocks, bs, rng.choice([1, 7, 64]), prefix_caching))
    cache = RecordingCache(sched)
    systems = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(3)]
    seqs = []
    for _ in range(400):
        if rng.random() < 0.3 and len(seqs) < 60:
            prompt = rng.choice(systems)[: rng.randint(1, 40)] + [
                rng.randrange(VOCAB) for _ in range(rng.randint(0, 8))
            ]
            seq = Sequence(prompt[:50], SamplingParams(temperature=0, ignore_eos=True), rng.randint(1, 20))
            assert sched.fits_alone(seq) is None
            sched.add([seq])
            seqs.append(seq)
        if rng.random() < 0.05 and sched.running:  # a client went away
            sched.finish(rng.choice(sched.running), None, "cancelled")
        if not sched.has_work():
            continue
        plan = step(sched, cache)
        assert plan.items, "work waits but the step is empty"
        assert sum(len(it.tokens) for it in plan.items) <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_batch_size
    while sched.has_work():
        step(sched, cache)
    assert sched.blocks.num_free == num_blocks, "blocks leaked"
    for seq in seqs:
        assert seq.sched.status is Status.FINISHED
        if seq.error is None:
            assert seq.output == expected_output(seq.prompt, seq.max_new_tokens)


def test_identical_prefix_is_computed_once_and_survives_its_sequence():
    sched = Scheduler(SchedulerConfig(4, 16, 4))
    cache = RecordingCache(sched)
    system = list(range(100, 110))  # 10 tokens: two full blocks of 4 and two tokens more
    first = Sequence(system + [1], SamplingParams(temperature=0), 2)
    sched.add([first])
    plan = step(sched, cache)
    assert [(it.start, len(it.tokens)) for it in plan.items] == [(0, 11)]
    while sched.has_work():
        plan = step(sched, cache)
    assert first.sched.status is Status.FINISHED and sched.blocks.num_free == 16  # cached at ref 0, still free
    second = Sequence(system + [2, 3], SamplingParams(temperature=0), 1)
    sched.add([second])
    plan = step(sched, cache)
    assert [(it.start, len(it.tokens)) for it in plan.items] == [(8, 4)]  # the two full blocks were hits
    assert second.output == expected_output(second.prompt, 1)


def test_whole_prompt_hit_still_computes_its_last_token():
    sched = Scheduler(SchedulerConfig(2, 8, 4))
    cache = RecordingCache(sched)
    for _ in range(2):
        seq = Sequence(list(range(8)), SamplingParams(temperature=0), 1)
        sched.add([seq])
        plan = step(sched, cache)
    assert [(it.start, len(it.tokens)) for it in plan.items] == [(4, 4)]  # block 2 holds the last token: computed


def test_siblings_in_one_step_share_the_blocks_the_first_writes():
    """n choices of one prompt: the first computes the prompt, the others take its full blocks in the same step."""
    sched = Scheduler(SchedulerConfig(4, 32, 4))
    cache = RecordingCache(sched)
    prompt = list(range(50, 63))  # 13 tokens: 3 full blocks
    sched.add([Sequence(prompt, SamplingParams(temperature=0), 3) for _ in range(3)])
    plan = step(sched, cache)
    assert [(it.start, len(it.tokens)) for it in plan.items] == [(0, 13), (12, 1), (12, 1)]
    assert plan.items[1].blocks[:3] == plan.items[0].blocks[:3] == plan.items[2].blocks[:3]


def test_long_prompt_is_chunked_while_others_decode():
    sched = Scheduler(SchedulerConfig(4, 64, 4, max_num_batched_tokens=16))
    cache = RecordingCache(sched)
    short = Sequence([1, 2, 3], SamplingParams(temperature=0, ignore_eos=True), 20)
    sched.add([short])
    plan = step(sched, cache)
    sched.add([Sequence(list(range(200, 250)), SamplingParams(temperature=0), 2)])
    shapes = []
    for _ in range(4):
        plan = step(sched, cache)
        shapes.append([(it.start, len(it.tokens)) for it in plan.items])
    # The short one decodes every step; the 50-token prompt takes the 15 tokens left each step.
    assert shapes == [[(3, 1), (0, 15)], [(4, 1), (15, 15)], [(5, 1), (30, 15)], [(6, 1), (45, 5)]]


def test_decode_without_a_free_block_preempts_the_newest_and_it_is_recomputed():
    sched = Scheduler(SchedulerConfig(4, 6, 4))  # 24 positions: three 7-token prompts take 2 blocks each
    cache = RecordingCache(sched)
    old, mid, new, late = (Sequence([i] * 7, SamplingParams(temperature=0, ignore_eos=True), 5) for i in range(1, 5))
    sched.add([old, mid, new, late])
    step(sched, cache)  # three admitted in this order; the pool is full, so the fourth waits
    assert sched.running == [old, mid, new] and list(sched.waiting) == [late] and sched.blocks.num_free == 0
    step(sched, cache)  # the first decode (position 7) still fits each one's second block
    kept = {seq: (seq.sched.slot, list(seq.sched.table.blocks), list(seq.output)) for seq in (old, mid, new)}
    plan = step(sched, cache)  # position 8 needs a third block each: none is free
    assert sched.preemptions == 1
    # The newest gave its blocks up and went back to the front of the queue, its tokens so far kept ...
    assert new.sched.status is Status.WAITING and list(sched.waiting) == [new, late]
    assert (
        new.sched.table is None
        and new.sched.slot is None
        and new.sched.num_computed == 0
        and new.output == kept[new][2]
    )
    # ... so the older two decoded in this step, in their slots, each on its blocks and one more.
    assert sched.running == [old, mid] and plan.seqs == [old, mid]
    for seq in (old, mid):
        slot, blocks, output = kept[seq]
        assert seq.sched.status is Status.RUNNING and seq.sched.slot == slot and len(seq.output) == len(output) + 1
        assert seq.sched.table.blocks[:2] == blocks and len(seq.sched.table.blocks) == 3
    assert set(kept[new][1]) == {
        old.sched.table.blocks[2],
        mid.sched.table.blocks[2],
    }  # they grew into the newest's blocks
    step(sched, cache)
    step(sched, cache)  # the older two reach their 5 tokens
    assert old.sched.status is mid.sched.status is Status.FINISHED and list(sched.waiting) == [new, late]
    plan = step(sched, cache)  # the newest is readmitted first and recomputes its 9 tokens (their blocks were reused)
    assert sched.running == [new, late] and (plan.items[0].start, len(plan.items[0].tokens)) == (0, 9)
    while sched.has_work():
        step(sched, cache)
    assert sched.preemptions == 1
    for seq in (old, mid, new, late):
        assert seq.output == expected_output(seq.prompt, 5)
    assert sched.blocks.num_free == 6


def test_sequence_that_can_never_fit_is_named_with_the_numbers():
    sched = Scheduler(SchedulerConfig(2, 4, 16))
    why = sched.fits_alone(Sequence([1] * 60, SamplingParams(), 10))
    assert why == (
        "the prompt (60 tokens) plus 10 new tokens needs 5 KV blocks of 16 tokens; the cache has 4 (64 tokens)"
    )


def test_eviction_takes_unkeyed_blocks_first_then_the_oldest_cached():
    bm = BlockManager(4, 2)
    a = bm.allocate([], 4)  # blocks 0, 1
    bm.commit(a, [1, 2, 3, 4], 4)
    b = bm.allocate([], 3)  # blocks 2, 3 (3 half full: never keyed)
    bm.release(a)
    bm.release(b)
    assert list(bm.free) == [2, 3, 1, 0]  # unkeyed first, then the cached prefix from its tail
    c = bm.allocate([], 6)
    assert c.blocks == [2, 3, 1] and bm.match([1, 2, 3, 4, 5]) == [0]  # block 1 was evicted, block 0 kept
