"""/metrics as the Kubernetes inference gateway's model-server protocol and Kaito's tools read it: each
metric's name, type, labels and range, parsed by prometheus_client's own parser while requests run."""

import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import hf_client

# name (as the parser names a family: counters without _total): (type, labels it must carry)
PROTOCOL = {
    "vllm:num_requests_waiting": ("gauge", set()),
    "vllm:num_requests_running": ("gauge", set()),
    "vllm:kv_cache_usage_perc": ("gauge", set()),
    "vllm:cache_config_info": ("gauge", {"block_size", "num_gpu_blocks"}),
    "vllm:generation_tokens": ("counter", set()),
}


def scrape(client) -> dict:
    text = client.get("/metrics").get_data(as_text=True)
    return {f.name: f for f in text_string_to_metric_families(text)}


def check_protocol(families: dict, max_running: int):
    """Each metric of the protocol with its type and labels, usage in 0-1, running within the batch; the
    cache_config_info sample."""
    for name, (kind, labels) in PROTOCOL.items():
        family = families[name]
        assert family.type == kind, name
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        assert len(samples) == 1 and labels <= set(samples[0].labels), (name, samples)
    assert 0 <= value(families, "vllm:kv_cache_usage_perc") <= 1
    assert 0 <= value(families, "vllm:num_requests_running") <= max_running
    (info,) = families["vllm:cache_config_info"].samples
    assert info.value == 1
    return info


def value(families: dict, name: str) -> float:
    return families[name].samples[0].value


def test_the_protocols_metrics_under_load(completion_client):
    client = completion_client
    body = {"prompts": ["Tell me about the river"], "parameters": {"max_gen_len": 96, "ignore_eos": True}}
    threads = [threading.Thread(target=client.post, args=("/generate",), kwargs={"json": body}) for _ in range(10)]
    for t in threads:
        t.start()
    seen = []
    while any(t.is_alive() for t in threads):
        seen.append(scrape(client))
    for t in threads:
        t.join()
    seen.append(scrape(client))
    for families in seen:
        info = check_protocol(families, max_running=4)  # the client's --max_batch_size
        assert int(info.labels["block_size"]) == 16 and int(info.labels["num_gpu_blocks"]) > 0
    busy = [f for f in seen if f["vllm:num_requests_running"].samples[0].value > 0]
    assert busy and max(f["vllm:kv_cache_usage_perc"].samples[0].value for f in busy) > 0
    assert max(f["vllm:num_requests_waiting"].samples[0].value for f in seen) > 0  # 10 requests, 4 slots
    total = seen[-1]["vllm:generation_tokens"].samples
    assert [s.value for s in total if s.name.endswith("_total")][0] >= 10 * 96


def test_the_protocols_metrics_on_the_hf_generate_server(falcon_dir):
    """transformers' generate has no block pool: usage is the running batch's token positions (rows x ids so far)
    over max_batch_size x the model's context, which cache_config_info gives as blocks of one token. The model
    is held at its 5th forward of the first batch (4 tokens generated): the metrics are read there, then after."""
    client, rt = hf_client(falcon_dir, max_batch_size=4)
    model, entered, release = rt.engine.model, threading.Event(), threading.Event()
    forward, calls = model.forward, []

    def held(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            entered.set()
            release.wait(60)  # a failed test never holds the engine for good
        return forward(*args, **kwargs)

    model.forward = held
    prompt = "Tell me about the river"
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    threads = [
        threading.Thread(target=client.post, args=("/v1/completions",), kwargs={"json": body}) for _ in range(10)
    ]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while not (entered.is_set() and sum(rt.loop.counts()) == 10):
            assert time.monotonic() < deadline, rt.loop.counts()
            time.sleep(0.01)
        during = scrape(client)
    finally:
        release.set()
        for t in threads:
            t.join()
    try:
        check_generate_metrics(rt, during, scrape(client), prompt)
    finally:
        rt.shutdown()


def check_generate_metrics(rt, during: dict, after: dict, prompt: str) -> None:
    """During: the first batch held after 4 tokens, 10 requests in. After: all answered."""
    budget = 4 * rt.engine.context
    for families in (during, after):
        info = check_protocol(families, max_running=4)
        assert info.labels["block_size"] == "1" and info.labels["num_gpu_blocks"] == str(budget)
    running = value(during, "vllm:num_requests_running")
    assert running >= 1 and value(during, "vllm:num_requests_waiting") == 10 - running
    width = len(rt.tokenizer(prompt).input_ids)  # equal prompts: no padding
    assert value(during, "vllm:kv_cache_usage_perc") == running * (width + 4) / budget
    assert [value(after, n) for n in ("vllm:num_requests_running", "vllm:num_requests_waiting")] == [0, 0]
    assert value(after, "vllm:kv_cache_usage_perc") == 0
