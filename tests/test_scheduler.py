"""Continuous batching, limits and the bounded queue, on a model-free engine."""

import threading
import time

import pytest
import torch

from presets.engine.params import SamplingParams
from presets.engine.runtime import Runtime
from presets.engine.sampling import make_rng, nucleus_sample, sample, top_p_filter
from presets.engine.scheduler import Sequence
from presets.errors import ApiError
from tests.fakes import BOS, ByteTokenizer, FakeEngine

GREEDY = SamplingParams(temperature=0)


def started(engine, **kw) -> Runtime:
    rt = Runtime(
        lambda progress: (engine, ByteTokenizer()), **{"max_seq_len": 64, "max_batch_size": 4, "max_waiting": 8, **kw}
    )
    rt.start(background=False)
    return rt


def test_max_tokens_respected(fake_runtime):
    (seq,) = fake_runtime.generate([[BOS, 10]], SamplingParams(temperature=0, max_tokens=5))
    assert seq.output == [11, 12, 13, 14, 15] and seq.finish_reason == "length"


def test_eos_stops_unless_ignore_eos(fake_runtime):
    # FakeEngine predicts last + 1, so after BOS (1) comes EOS (2).
    (seq,) = fake_runtime.generate([[5, BOS]], SamplingParams(temperature=0, max_tokens=5))
    assert seq.output == [] and seq.finish_reason == "stop"
    (seq,) = fake_runtime.generate([[5, BOS]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert seq.output == [2, 3, 4, 5, 6] and seq.finish_reason == "length"


def test_max_tokens_capped_to_room_left_in_max_seq_len(fake_runtime):
    (seq,) = fake_runtime.generate([[BOS] + [10] * 59], SamplingParams(temperature=0, max_tokens=100))
    assert len(seq.output) == 64 - 60


def test_prompt_longer_than_max_seq_len_names_both_numbers(fake_runtime):
    with pytest.raises(ApiError, match="prompt 1 is 70 tokens; max_seq_len is 64") as e:
        fake_runtime.generate([[BOS], [10] * 70], GREEDY)
    assert e.value.status == 400


def test_request_with_n_prompts_is_n_sequences_in_one_batch(fake_runtime):
    seqs = fake_runtime.generate([[BOS, 10], [BOS, 20], [BOS, 30]], SamplingParams(temperature=0, max_tokens=3))
    assert [s.output for s in seqs] == [[11, 12, 13], [21, 22, 23], [31, 32, 33]]
    assert [(0, 0, 2), (1, 0, 2), (2, 0, 2)] in fake_runtime.engine.steps  # the prompts in one step
    assert [(0, 2, 1), (1, 2, 1), (2, 2, 1)] in fake_runtime.engine.steps  # then one decode step for all


def test_new_sequences_join_between_decode_steps_and_finished_ones_leave():
    engine = FakeEngine()
    rt = started(engine)
    # The engine's steps wait on events, not on the clock, so the order below holds however slowly the threads
    # are scheduled: its 6th step waits until the short request is queued (it joins mid-decode), its 20th until
    # this thread has checked that the short one was answered (the long one is still running then).
    step, answered = engine.run, threading.Event()

    def paced(plan):
        if len(engine.steps) == 5:
            deadline = time.monotonic() + 60
            while sum(rt.loop.counts()) < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
        elif len(engine.steps) == 20:
            answered.wait(60)
        return step(plan)

    engine.run = paced
    long_done = []
    t = threading.Thread(
        target=lambda: long_done.append(rt.generate([[BOS, 10]], SamplingParams(temperature=0, max_tokens=40)))
    )
    t.start()
    try:
        deadline = time.monotonic() + 60
        while len(engine.steps) < 5:
            assert time.monotonic() < deadline, "the long request never started"
            time.sleep(0.001)
        (short,) = rt.generate([[BOS, 100]], SamplingParams(temperature=0, max_tokens=3))
        assert not long_done, "the short request finished while the long one was still running"
    finally:
        answered.set()
    t.join()
    # The short request's prompt (slot 1, from position 0) joins a step of the long one's decoding.
    joined = next(i for i, step in enumerate(engine.steps) if (1, 0, 2) in step)
    assert 3 <= joined < len(engine.steps) - 10, "admitted between decode steps, not after the long request"
    assert engine.steps[joined][0][0] == 0 and engine.steps[joined][0][2] == 1  # the long one decoded there too
    assert [slot for slot, _, _ in engine.steps[joined + 1]] == [0, 1]  # both run in one batch
    assert [slot for slot, _, _ in engine.steps[-1]] == [0]  # the short one left as soon as it finished
    assert short.output == [101, 102, 103] and long_done[0][0].output == list(range(11, 51))
    rt.shutdown()


def test_full_queue_answers_503_with_retry_after():
    engine = FakeEngine()
    rt = started(engine, max_batch_size=1, max_waiting=2)
    # The engine is held in the first request's first step until the 503 was seen: the queue stays full
    # however slowly this thread runs (a request finishing first would make room and no 503 would come).
    step, release = engine.run, threading.Event()
    engine.run = lambda plan: release.wait(60) and step(plan)
    params = SamplingParams(temperature=0, max_tokens=30)
    threads = [threading.Thread(target=rt.generate, args=([[BOS, 10]], params)) for _ in range(3)]
    try:
        for i, th in enumerate(threads):  # one runs, two wait: the queue is full
            th.start()
            deadline = time.monotonic() + 60
            while sum(rt.loop.counts()) < i + 1:  # this one is in (running or waiting) before the next
                assert time.monotonic() < deadline, "a request was not queued"
                time.sleep(0.001)
        assert rt.loop.counts() == (1, 2)
        with pytest.raises(ApiError) as e:
            rt.generate([[BOS, 10]], params)
        assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
    finally:
        release.set()
    for th in threads:
        th.join()
    (seq,) = rt.generate([[BOS, 10]], SamplingParams(temperature=0, max_tokens=2))  # room again
    assert seq.output == [11, 12]
    rt.shutdown()


def test_failed_step_fails_its_sequences_not_the_server():
    engine = FakeEngine()
    rt = started(engine)
    real = engine.run
    engine.run = lambda *a: (_ for _ in ()).throw(RuntimeError("device lost"))
    with pytest.raises(ApiError, match="generation failed: RuntimeError: device lost") as e:
        rt.generate([[BOS, 10]], GREEDY)
    assert e.value.status == 500 and rt.health() == (False, "the last engine step failed")
    engine.run = real
    # When idle, the engine probes the device again (every second): health recovers without traffic. The
    # deadline only ends a failing test; a loaded machine may take several seconds.
    deadline = time.monotonic() + 60
    while rt.health() != (True, "Healthy"):
        assert time.monotonic() < deadline, rt.health()
        time.sleep(0.1)
    (seq,) = rt.generate([[BOS, 10]], SamplingParams(temperature=0, max_tokens=2))
    assert seq.output == [11, 12] and rt.health() == (True, "Healthy")
    rt.shutdown()


def test_loading_state_is_reported_and_requests_get_503():
    release = threading.Event()

    def slow_load(progress):
        progress("loaded 1 of 2 shards")
        release.wait()
        return FakeEngine(), ByteTokenizer()

    rt = Runtime(slow_load, max_seq_len=64, max_batch_size=2, max_waiting=4)
    rt.start()
    deadline = time.monotonic() + 60
    while rt.progress != "loaded 1 of 2 shards":
        assert time.monotonic() < deadline, rt.progress
        time.sleep(0.01)
    assert rt.health() == (False, "model loading: loaded 1 of 2 shards")
    with pytest.raises(ApiError, match="model loading") as e:
        rt.generate([[BOS]], GREEDY)
    assert e.value.status == 503
    release.set()
    deadline = time.monotonic() + 60
    while rt.state != "ready":
        assert time.monotonic() < deadline, rt.progress
        time.sleep(0.01)
    assert rt.health() == (True, "Healthy")
    rt.shutdown()


def test_shutdown_ends_waiting_requests_with_503():
    engine = FakeEngine()
    rt = started(engine, max_batch_size=1)
    step, cv = engine.run, rt.loop.cv

    def held_until_shutdown(plan):  # the first request stays mid-step until shutdown is asked for
        with cv:
            cv.wait_for(lambda: rt.loop.stopping, timeout=60)
        return step(plan)

    engine.run = held_until_shutdown
    errors = []

    def call():
        try:
            rt.generate([[BOS, 10]], SamplingParams(temperature=0, max_tokens=50))
        except ApiError as e:
            errors.append((e.status, e.detail))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 60
    while rt.loop.counts() != (1, 1):  # one running (held in its step), one waiting
        assert time.monotonic() < deadline, f"the requests never reached the engine: {rt.loop.counts()}"
        time.sleep(0.001)
    with cv:
        seqs = [*rt.loop.scheduler.running, *rt.loop.scheduler.waiting]
    rt.shutdown()
    deadline = time.monotonic() + 60
    while not all(seq.done.is_set() for seq in seqs) or len(errors) < 2:
        assert time.monotonic() < deadline, f"shutdown left them: {[(s.sched.status, s.error) for s in seqs]}, {errors}"
        time.sleep(0.001)
    for th in threads:
        th.join(timeout=60)
    assert [(s.error_status, s.error, s.finish_reason) for s in seqs] == [(503, "server is shutting down", None)] * 2
    assert errors == [(503, "server is shutting down")] * 2
    assert not rt.health()[0]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    out = top_p_filter(probs, torch.tensor([0.4, 0.75]))
    assert torch.allclose(out[0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(out[1], torch.tensor([0.625, 0.375, 0.0]))


def test_repeat_penalty_pushes_down_recent_tokens_only():
    """llama.cpp's rule: a seen token's logit is divided by the penalty when positive, multiplied when negative."""
    logits = torch.tensor([[3.0, 2.9, -1.0, 0.5]])
    seq = Sequence([0, 2], SamplingParams(temperature=0, repeat_penalty=1.5, repeat_last_n=2), 8)
    assert sample(logits, [seq]) == [1]  # token 0 (3.0 -> 2.0) is in the window, so 1 (2.9) wins
    far = Sequence([0, 3, 3], SamplingParams(temperature=0, repeat_penalty=1.5, repeat_last_n=2), 8)
    assert sample(logits, [far]) == [0]  # token 0 is outside the last 2 tokens
    off = Sequence([0, 2], SamplingParams(temperature=0), 8)
    assert sample(logits, [off]) == [0] and logits[0, 0] == 3.0  # no penalty by default; logits untouched
    short = Sequence([0, 1], SamplingParams(temperature=0, repeat_penalty=10.0, repeat_last_n=7), 8)
    assert sample(logits, [short]) == [3]  # a window longer than the prompt covers all of it


def test_nucleus_sampling_draws_only_from_the_top_p_set_on_both_paths():
    """Peaked rows take the top-256 shortcut, flat rows the full sort; every draw lies in the exact nucleus."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 32000, generator=g)
    logits[:3] *= 8  # peaked: the 256 likeliest hold the nucleus
    probs = torch.softmax(logits, -1)
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.9, 0.5, 0.2])
    head = probs.topk(256, -1).values.sum(-1)
    assert (head[:3] >= top_p[:3]).all() and (head[3:] < top_p[3:]).all()  # both paths are taken
    nucleus = top_p_filter(probs, top_p) > 0
    for seed in range(30):
        drawn = nucleus_sample(probs, top_p, [make_rng(seed * 10 + j, "cpu") for j in range(6)])
        assert all(nucleus[j, t] for j, t in enumerate(drawn))
    tiny = torch.tensor([1e-3])  # a nucleus of one token: the most likely one
    assert nucleus_sample(probs[:1], tiny, [make_rng(0, "cpu")]) == [int(probs[0].argmax())]


def test_top_k_samples_only_among_the_k_most_likely():
    logits = torch.tensor([[2.0, 1.9, 1.8, 1.7, -5.0]])
    seen = set()
    for i in range(200):
        seq = Sequence([0], SamplingParams(temperature=5.0, top_p=1.0, top_k=2), 8)
        seq.rng = make_rng(i, "cpu")
        seen.update(sample(logits, [seq]))
    assert seen == {0, 1}


def test_batch_loop_failed_batch_fails_its_jobs_and_health_recovers_without_traffic():
    from presets.engine.batch_loop import BatchLoop, Job

    broken = {"now": False}

    def run_batch(key, payloads):
        if broken["now"]:
            raise RuntimeError("device lost")
        return [p * 2 for p in payloads]

    def make_loop(engine, tokenizer):
        return BatchLoop(run_batch, 4, 8, warm_up_job=lambda: Job(None, 0))

    rt = Runtime(lambda progress: (None, ByteTokenizer()), 64, 4, 8, make_loop=make_loop)
    rt.start(background=False)
    try:
        assert [j.result for j in rt.run([Job("k", 1), Job("k", 2)])] == [2, 4]
        broken["now"] = True
        with pytest.raises(ApiError, match="generation failed: RuntimeError: device lost") as e:
            rt.run([Job(None, 3)])
        assert e.value.status == 500 and rt.health() == (False, "the last engine step failed")
        broken["now"] = False
        deadline = time.monotonic() + 60  # the idle probe comes within a second; a loaded machine may be slower
        while rt.health() != (True, "Healthy"):
            assert time.monotonic() < deadline, rt.health()
            time.sleep(0.1)
    finally:
        rt.shutdown()


def test_a_full_queues_retry_after_follows_its_measured_pace():
    from presets.engine.thread import RETRY_CEILING, RETRY_UNKNOWN, EngineThread

    loop = EngineThread(max_waiting=4)
    assert loop.retry_after(3, now=100.0) == RETRY_UNKNOWN  # nothing left the queue yet: no pace to go by
    for t in range(90, 100):
        loop.drained(1, now=float(t))  # one a second for ten seconds
    assert loop.retry_after(3, now=100.0) == 3
    assert loop.retry_after(1000, now=100.0) == RETRY_CEILING
    loop.drained(100, now=100.0)  # a burst: room at once
    assert loop.retry_after(1, now=100.0) == 1
    assert loop.retry_after(3, now=300.0) == RETRY_UNKNOWN  # a pace from minutes ago says nothing
    with pytest.raises(ApiError) as e:
        loop.drains.clear()
        for t in range(0, 20, 2):
            loop.drained(1, now=time.monotonic() - 20 + t)  # one every two seconds, up to now
        loop._admit_or_refuse(4, 2, "sequences")
    assert e.value.status == 503 and e.value.headers["Retry-After"] in ("4", "5")  # two more: about 4 s
    assert "retry in" in e.value.detail
