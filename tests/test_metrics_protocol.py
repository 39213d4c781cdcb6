"""/metrics as the Kubernetes inference gateway's model-server protocol and Kaito's tools read it: each
metric's name, type, labels and range, parsed by prometheus_client's own parser while requests run."""

import threading

from prometheus_client.parser import text_string_to_metric_families

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
        for name, (kind, labels) in PROTOCOL.items():
            family = families[name]
            assert family.type == kind, name
            samples = [s for s in family.samples if not s.name.endswith("_created")]
            assert len(samples) == 1 and labels <= set(samples[0].labels), (name, samples)
        usage = families["vllm:kv_cache_usage_perc"].samples[0].value
        assert 0 <= usage <= 1
        running = families["vllm:num_requests_running"].samples[0].value
        assert 0 <= running <= 4  # the client's --max_batch_size
        (info,) = families["vllm:cache_config_info"].samples
        assert info.value == 1 and int(info.labels["block_size"]) == 16 and int(info.labels["num_gpu_blocks"]) > 0
    busy = [f for f in seen if f["vllm:num_requests_running"].samples[0].value > 0]
    assert busy and max(f["vllm:kv_cache_usage_perc"].samples[0].value for f in busy) > 0
    assert max(f["vllm:num_requests_waiting"].samples[0].value for f in seen) > 0  # 10 requests, 4 slots
    total = seen[-1]["vllm:generation_tokens"].samples
    assert [s.value for s in total if s.name.endswith("_total")][0] >= 10 * 96
