"""LoRA adapters on the Llama engine against PEFT itself: tiny random base models (MHA and GQA) with random
adapters of several ranks and target sets, saved by PEFT's save_pretrained, give PEFT's logits (fp32) and
greedy tokens; one step mixing the base model and three adapters equals each alone; prefix-cache blocks
never cross adapters; every folder we cannot serve is refused with its reason."""

import json
import os
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from presets.engine.adapters import AdapterError, AdapterSpec, adapter_specs, read_adapter
from presets.engine.params import SamplingParams
from presets.engine.scheduler import Sequence
from presets.engine.step_loop import EngineLoop
from presets.models.llama.engine import CacheSettings, LlamaEngine
from presets.models.llama.hf_convert import to_hf
from presets.models.llama.load import load_model, read_args
from presets.models.llama.lora import module_paths
from presets.models.llama.tokenizer import Tokenizer
from tests.paged import item, run

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name -> LoraConfig arguments
    "all-r4": dict(r=4, lora_alpha=8, target_modules=ALL),
    "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "mlp-rs": dict(r=2, lora_alpha=4, target_modules=["gate_proj", "down_proj", "k_proj"], use_rslora=True),
    "pattern": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "o_proj", "up_proj"],
        rank_pattern={"o_proj": 2},
        alpha_pattern={"up_proj": 3},
    ),
}


def hf_model(ckpt):
    tok = Tokenizer(f"{ckpt}/tokenizer.model")
    return to_hf(read_args(ckpt, tok), torch.load(f"{ckpt}/consolidated.00.pth", weights_only=True)).float().eval()


def save_adapter(ckpt, folder, seed=0, **config):
    """A PEFT LoRA with random A and B (init_lora_weights=False) on the checkpoint's HF twin, saved by PEFT;
    returns the PEFT model (the reference)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # PEFT 0.21 reads a property transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(hf_model(ckpt), LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # larger B than PEFT's init, so every adapter moves the logits well past rounding
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


@pytest.fixture(scope="module", params=["tiny_ckpt", "gqa_ckpt"])
def setup(request, tmp_path_factory):
    """(ckpt, {name: (folder, PEFT model)}) with every adapter of ADAPTERS saved."""
    ckpt = request.getfixturevalue(request.param)
    root = tmp_path_factory.mktemp("adapters")
    made = {}
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        made[name] = (str(root / name), save_adapter(ckpt, str(root / name), seed=seed, **config))
    return ckpt, made


def engine_with(ckpt, folders: dict[str, str], strengths=None, max_loras=8, **kw):
    tok = Tokenizer(f"{ckpt}/tokenizer.model")
    model = load_model(ckpt, tok, 0, 1, torch.device("cpu"), torch.float32)
    paths = module_paths(model.args.n_layers)
    adapters = [read_adapter(AdapterSpec(n, p, (strengths or {}).get(n, 1.0)), 64, paths) for n, p in folders.items()]
    settings = CacheSettings(kw.pop("max_seq_len", 128), 4, 16, max_loras=max_loras, **kw)
    return LlamaEngine(model, settings, adapters=adapters), tok


PROMPT = [1, 37, 250, 9, 77, 310, 5, 41, 199, 64, 12, 300, 8, 90, 111, 3, 17, 240, 6]


def reference_logits(peft_model, tokens) -> torch.Tensor:
    with torch.inference_mode():
        return peft_model(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(params=["dense", "runs"])
def lora_path(request, monkeypatch):
    """Both ways a layer adds the adapters: every adapter at once for small steps, adapter by adapter over
    runs of rows for large ones (lora.DENSE_ROWS picks; 0 forces the runs)."""
    from presets.models.llama import lora

    if request.param == "runs":
        monkeypatch.setattr(lora, "DENSE_ROWS", 0)
    return request.param


def assert_close(got, want):
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-4, rel


def test_every_adapter_gives_peft_logits_for_prompt_and_decode(setup, lora_path):
    ckpt, made = setup
    engine, _ = engine_with(ckpt, {n: f for n, (f, _) in made.items()})
    base = reference_logits(hf_model(ckpt), PROMPT)
    for slot, (name, (_, peft_model)) in enumerate(made.items(), start=1):
        want = reference_logits(peft_model, PROMPT)
        assert (want - base).abs().max() > 1e-2, f"{name} does not move the logits: the test could not fail"
        prompt = item(slot - 1, 0, PROMPT[:-1])
        prompt.adapter = slot
        assert_close(run(engine, prompt)[0], want[-2])
        decode = item(slot - 1, len(PROMPT) - 1, PROMPT[-1:])  # the last token over the adapter's cached keys
        decode.adapter = slot
        assert_close(run(engine, decode)[0], want[-1])


def test_one_step_mixing_the_base_and_three_adapters_equals_each_alone(setup, lora_path):
    ckpt, made = setup
    names = list(made)[:3]
    mixed, _ = engine_with(ckpt, {n: made[n][0] for n in names})
    alone, _ = engine_with(ckpt, {n: made[n][0] for n in names})
    prompts = [PROMPT[: 9 + 3 * s] for s in range(4)]
    items = []
    for s, p in enumerate(prompts):  # slot s runs adapter s (0: the base model)
        it = item(s, 0, p)
        it.adapter = s
        items.append(it)
    together = run(mixed, *items)
    for s, it in enumerate(items):
        assert_close(together[s], run(alone, it)[0])
    base = reference_logits(hf_model(ckpt), prompts[0])[-1]
    assert_close(together[0], base)
    for s, name in enumerate(names, start=1):
        assert_close(together[s], reference_logits(made[name][1], prompts[s])[-1])


def test_strength_scales_the_adapter_as_peft_with_its_alpha_scaled(setup, tmp_path):
    ckpt, _ = setup
    config = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    save_adapter(ckpt, str(tmp_path / "a"), seed=7, lora_alpha=8, **config)
    half = save_adapter(ckpt, str(tmp_path / "b"), seed=7, lora_alpha=4, **config)  # same A and B, half the alpha
    engine, _ = engine_with(ckpt, {"a": str(tmp_path / "a")}, strengths={"a": 0.5})
    it = item(0, 0, PROMPT)
    it.adapter = 1
    assert_close(run(engine, it)[0], reference_logits(half, PROMPT)[-1])


def greedy(engine, tok, prompts, adapter_of, new=10):
    """Greedy outputs through the engine loop; engine.steps records the adapters of each step."""
    run_step, engine.steps = engine.run, []

    def recorded(plan):
        engine.steps.append({it.adapter for it in plan.items} - {0})
        return run_step(plan)

    engine.run = recorded
    loop = EngineLoop(engine, tok.eos_id, 4, 16)
    loop.start()
    seqs = [
        Sequence(p, SamplingParams(temperature=0, ignore_eos=True, adapter=adapter_of[i]), new)
        for i, p in enumerate(prompts)
    ]
    loop.submit(seqs)
    assert all(s.done.wait(60) for s in seqs)
    loop.stop()
    return [s.output for s in seqs], loop.scheduler


def test_greedy_tokens_equal_peft_generate_under_load_with_chunks(setup, lora_path):
    """Six sequences over four slots and two adapters at most at once, prompts cut into 8-token chunks."""
    ckpt, made = setup
    names = list(made)[:3]
    engine, tok = engine_with(ckpt, {n: made[n][0] for n in names}, max_loras=2, max_num_batched_tokens=8)
    prompts = [PROMPT[: 12 + i] for i in range(6)]
    adapter_of = [1, 2, 3, 0, 1, 3]
    got, scheduler = greedy(engine, tok, prompts, adapter_of)
    for p, a, out in zip(prompts, adapter_of, got):
        ref = hf_model(ckpt) if a == 0 else made[names[a - 1]][1]
        ref.generation_config.eos_token_id = None
        with torch.inference_mode():
            want = ref.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert out == want[0, len(p) :].tolist()
    assert scheduler.blocks.num_free == scheduler.config.num_blocks
    assert max(map(len, engine.steps)) == 2  # max_loras: three adapters wanted slots, two ran at once


def test_preempted_sequences_of_adapters_are_recomputed_with_their_adapter(setup):
    """A pool of 5 blocks for 4 running sequences of 2 blocks each: sequences are preempted and recomputed."""
    ckpt, made = setup
    names = list(made)[:2]
    args = read_args(ckpt, Tokenizer(f"{ckpt}/tokenizer.model"))
    per_block = 16 * 2 * args.n_layers * (args.n_kv_heads or args.n_heads) * args.head_dim * 4  # fp32 k and v
    engine, tok = engine_with(ckpt, {n: made[n][0] for n in names}, max_seq_len=32, memory=5 * per_block)
    prompts = [PROMPT[: 12 + i] for i in range(6)]
    adapter_of = [1, 2, 0, 1, 2, 0]
    got, scheduler = greedy(engine, tok, prompts, adapter_of)
    assert scheduler.preemptions > 0
    for p, a, out in zip(prompts, adapter_of, got):
        ref = hf_model(ckpt) if a == 0 else made[names[a - 1]][1]
        assert out == peft_greedy(ref, p, 10)


class PrefixHits:
    """Stands in for the metrics the scheduler reports to: the cached tokens of each admission."""

    def __init__(self):
        self.hits = []

    def prefix_cache(self, queried: int, hit: int) -> None:
        self.hits.append(hit)

    def preempted(self) -> None:
        pass


def test_prefix_cache_blocks_are_shared_within_an_adapter_never_across(setup):
    ckpt, made = setup
    names = list(made)[:2]
    engine, tok = engine_with(ckpt, {n: made[n][0] for n in names})
    long = PROMPT * 3  # 57 tokens: three full blocks to share
    loop = EngineLoop(engine, tok.eos_id, 4, 16)
    loop.scheduler.metrics = recorder = PrefixHits()
    loop.start()
    outputs = []
    try:
        for adapter in (1, 2, 1, 0, 2, 0):  # one after another: each finds the earlier ones' blocks cached
            seq = Sequence(long, SamplingParams(temperature=0, ignore_eos=True, adapter=adapter), 3)
            loop.submit([seq])
            assert seq.done.wait(60)
            outputs.append(seq.output)
    finally:
        loop.stop()
    assert recorder.hits == [0, 0, 48, 0, 48, 48]  # a hit only where the same adapter ran the prompt before
    assert outputs[0] == outputs[2] and outputs[1] == outputs[4] and outputs[3] == outputs[5]
    assert len({tuple(o) for o in outputs}) == 3  # and the three answers differ


def write_folder(path, config: dict, tensors: dict | None = None, name="adapter_model.safetensors"):
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    if tensors is not None:
        save_file(tensors, os.path.join(path, name))


GOOD = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "config,tensors,message",
    [
        ({**GOOD, "use_dora": True}, "ok", "DoRA adapters are not served"),
        ({**GOOD, "bias": "lora_only"}, "ok", "bias 'lora_only'"),
        ({**GOOD, "modules_to_save": ["lm_head"]}, "ok", "modules_to_save"),
        ({**GOOD, "peft_type": "IA3"}, "ok", "only LORA adapters"),
        (GOOD, "bin", "save it with safe_serialization=True"),
        (GOOD, {f"{Q}.lora_A.weight": torch.zeros(70, 64), f"{Q}.lora_B.weight": torch.zeros(64, 70)}, "rank 70"),
        (GOOD, {"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64)}, "targets 'lm_head'"),
        (GOOD, {f"{Q}.lora_A.weight": torch.zeros(2, 64)}, "without its pair"),
        (GOOD, {f"{Q}.lora_A.weight": torch.zeros(2, 32), f"{Q}.lora_B.weight": torch.zeros(64, 2)}, "32"),
    ],
    ids=["dora", "bias", "modules_to_save", "ia3", "bin-only", "rank", "lm_head", "unpaired", "other-base"],
)
def test_folders_we_cannot_serve_are_refused_naming_adapter_and_reason(tiny_ckpt, tmp_path, config, tensors, message):
    folder = str(tmp_path / "bad")
    ok = {f"{Q}.lora_A.weight": torch.zeros(2, 64), f"{Q}.lora_B.weight": torch.zeros(64, 2)}
    if tensors == "bin":
        write_folder(folder, config)
        torch.save(ok, os.path.join(folder, "adapter_model.bin"))
    else:
        write_folder(folder, config, ok if tensors == "ok" else tensors)
    with pytest.raises(AdapterError, match="adapter 'bad'") as e:
        engine_with(tiny_ckpt, {"bad": folder})
    assert message in str(e.value)


def test_adapter_specs_from_flags_and_kaitos_folder(tmp_path):
    for name in ("b-adapter", "a_adapter"):
        (tmp_path / name).mkdir()
    specs = adapter_specs(["x=/p/x,", "y=/p/y"], str(tmp_path), {"a_adapter": "0.5"})
    assert [(s.name, s.path, s.strength) for s in specs] == [
        ("x", "/p/x", 1.0),
        ("y", "/p/y", 1.0),
        ("a_adapter", str(tmp_path / "a_adapter"), 0.5),
        ("b-adapter", str(tmp_path / "b-adapter"), 1.0),
    ]
    assert adapter_specs([], "auto", {}) == [] or os.path.isdir("/mnt/adapter")
    for flags, message in [
        ((["x"], ""), "name=path pairs"),
        ((["x=/a", "x=/b"], ""), "named twice"),
        (([], str(tmp_path / "none")), "no such folder"),
        ((["bad/name=/a"], ""), "letters, digits"),
    ]:
        with pytest.raises(AdapterError, match=message):
            adapter_specs(*flags, {})
    with pytest.raises(AdapterError, match="not a number"):
        adapter_specs([], str(tmp_path), {"a_adapter": "lots"})


@pytest.fixture(scope="module")
def served(tiny_ckpt, tmp_path_factory):
    """The completion server with two adapters (one by --lora_modules, one from an adapters folder with its
    strength in the environment) and the OpenAI routes: (client, {name: PEFT model})."""
    from tests.conftest import real_client

    root = tmp_path_factory.mktemp("served")
    one = save_adapter(tiny_ckpt, str(root / "one"), seed=11, **ADAPTERS["all-r4"])
    (root / "dir").mkdir()
    two = save_adapter(tiny_ckpt, str(root / "dir" / "two"), seed=12, **ADAPTERS["qv-r8"])
    os.environ["two"] = "1.0"  # Kaito's <name>=<strength>
    try:
        client, rt = real_client(
            tiny_ckpt,
            "completion",
            openai=True,
            max_seq_len=128,
            max_batch_size=4,
            lora_modules=(f"one={root / 'one'}",),
            adapters_dir=str(root / "dir"),
        )
    finally:
        del os.environ["two"]
    client.root = root
    yield client, {"one": one, "two": two}
    rt.shutdown()


def peft_greedy(peft_model, ids, new):
    peft_model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = peft_model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def test_openai_routes_answer_with_the_adapter_the_model_field_names(served, tiny_ckpt):
    client, refs = served
    cards = client.get("/v1/models").get_json()["data"]
    assert [(c["id"], c["parent"]) for c in cards] == [
        ("llama2-completion", None),
        ("one", "llama2-completion"),
        ("two", "llama2-completion"),
    ]
    assert client.get("/v1/models/two").get_json()["parent"] == "llama2-completion"
    outputs = {}
    for name in ("llama2-completion", "one", "two"):
        body = {"model": name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = client.post("/v1/completions", json=body, headers={"Accept": "application/json"})
        assert r.status_code == 200, r.get_data(as_text=True)
        got = r.get_json()
        assert got["model"] == name
        outputs[name] = got["choices"][0]["text"]
    tok = Tokenizer(f"{tiny_ckpt}/tokenizer.model")
    for name, ref in refs.items():
        assert outputs[name] == tok.decode(peft_greedy(ref, PROMPT, 8))
    assert len(set(outputs.values())) == 3
    r = client.post("/v1/completions", json={"model": "three", "prompt": "hi", "max_tokens": 2})
    err = r.get_json()["error"]
    assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
    assert "['llama2-completion', 'one', 'two']" in err["message"]


def test_kaito_route_takes_an_adapter_beside_the_prompts(served):
    client, _ = served
    params = {"max_gen_len": 6, "temperature": 0}

    def generate(**extra):
        r = client.post("/generate", json={"prompts": ["Hello there"], "parameters": params, **extra})
        return r.status_code, r.get_json()

    base, one, also_one = generate(), generate(adapter="one"), generate(model="one")
    assert base[0] == one[0] == 200 and one == also_one
    assert base[1]["results"][0]["response"] != one[1]["results"][0]["response"]
    status, body = generate(adapter="nope")
    assert status == 404 and "'nope' not found" in body["detail"]
    status, body = generate(adapter="one", model="two")
    assert status == 400 and "send one" in body["detail"]


def test_metrics_say_which_adapters_run_and_count_their_requests(served):
    from prometheus_client.parser import text_string_to_metric_families

    client, _ = served
    client.post("/generate", json={"prompts": ["a", "b"], "adapter": "two", "parameters": {"max_gen_len": 2}})
    text = client.get("/metrics").get_data(as_text=True)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (info,) = families["vllm:lora_requests_info"].samples
    assert info.labels["max_lora"] == "8" and info.labels["waiting_lora_adapters"] == ""
    assert info.value > 1.7e9  # a Unix time
    counts = {
        s.labels["adapter"]: s.value for s in families["presets:lora_requests"].samples if s.name.endswith("_total")
    }
    assert counts["two"] >= 2


def test_a_folder_we_cannot_serve_stops_the_server_at_start_naming_it(tiny_ckpt, tmp_path):
    from tests.launch import finish, free_port, server_cmd, start

    write_folder(str(tmp_path / "dora"), {**GOOD, "use_dora": True}, {})
    proc = start(
        server_cmd("completion", tiny_ckpt, free_port(), "--lora_modules", f"d={tmp_path / 'dora'}"), "completion"
    )
    code, out = finish(proc, timeout=60)
    assert code != 0 and f"error: adapter 'd' ({tmp_path / 'dora'}): DoRA adapters are not served" in out, out
    assert "Traceback" not in out


def test_two_ranks_serve_adapters_as_one_rank_does(served, tmp_path):
    """Tensor parallel: A and B split as the layers they modify (row-parallel layers sum their low-rank part
    over the ranks); two ranks under torchrun answer each adapter as the one-rank server does."""
    from presets.tools.tiny_checkpoint import write_checkpoint
    from tests.conftest import TINY
    from tests.launch import free_port, post, running, server_cmd, start, wait_healthy

    client, _ = served
    shards = write_checkpoint(str(tmp_path / "two"), TINY, shards=2)  # tiny_ckpt's weights, split
    root = client.root
    lora = ["--lora_modules", f"one={root / 'one'}", f"two={root / 'dir' / 'two'}", "--adapters_dir", ""]
    port = free_port()
    flags = ["--max_seq_len", "128", "--max_batch_size", "4", *lora]
    proc = start(server_cmd("completion", shards, port, *flags, torchrun=["--nproc_per_node", "2"]), "completion")
    params = {"max_gen_len": 8, "temperature": 0, "ignore_eos": True}
    bodies = [
        {"prompts": [f"The mill {i} and the river"], "parameters": params, "adapter": a}
        for i, a in enumerate(["one", "two", None, "one"])
    ]
    with running(proc):
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        for body in bodies:
            body = {k: v for k, v in body.items() if v is not None}
            expected = client.post("/generate", json=body).get_json()
            assert post(f"http://127.0.0.1:{port}/generate", body) == (200, expected)


def test_an_adapter_trained_on_smollm2_answers_its_phrase_as_peft_does(smollm2_dir, tmp_path):
    """A real model and a real fine-tune: a LoRA trained here in a few PEFT steps to answer a fixed phrase,
    served by the chat server: its greedy answer is PEFT's, and the base model's is not the phrase."""
    from transformers import AutoModelForCausalLM

    from presets.models.llama.tokenizer import find_tokenizer, load_tokenizer
    from tests.conftest import real_client

    tok = load_tokenizer(find_tokenizer(smollm2_dir), smollm2_dir)
    prompt = tok.encode("Q: What is the secret word?\nA:", bos=False, eos=False)
    answer = tok.encode(" The secret word is periwinkle.", bos=False, eos=False)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tuned = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    ids = torch.tensor([prompt + answer])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100  # learn the answer only
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=3e-3)
    tuned.train()
    for _ in range(40):
        loss = tuned(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tuned.eval()
    tuned.save_pretrained(str(tmp_path / "secret"))
    want = peft_greedy(tuned, prompt, len(answer))
    assert tok.decode(want).strip() == "The secret word is periwinkle."  # the fine-tune took
    with tuned.disable_adapter():
        assert "periwinkle" not in tok.decode(peft_greedy(tuned, prompt, len(answer)))

    client, rt = real_client(
        smollm2_dir,
        "chat",
        openai=True,
        max_seq_len=128,
        max_batch_size=2,
        lora_modules=(f"secret={tmp_path / 'secret'}",),
    )
    try:
        texts = {}
        for name in ("secret", None):
            body = {"prompt": prompt, "max_tokens": len(answer), "temperature": 0}
            r = client.post("/v1/completions", json=body | ({"model": name} if name else {}))
            assert r.status_code == 200, r.get_data(as_text=True)
            texts[name] = r.get_json()["choices"][0]["text"]
        assert texts["secret"] == tok.decode(want)
        assert "periwinkle" not in texts[None]
    finally:
        rt.shutdown()


def test_hf_server_serves_adapters_through_peft_a_batch_per_adapter(falcon_dir, tmp_path):
    """Falcon on transformers' generate: adapters loaded by PEFT, each request answered by its own adapter
    (PEFT's generate on that adapter alone) while requests of other adapters and of the base model are
    served at the same time; batches never mix adapters."""
    import threading

    from transformers import AutoModelForCausalLM

    from tests.conftest import hf_client

    def falcon_adapter(name, seed, targets):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(falcon_dir, dtype=torch.float32, local_files_only=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(20)
        model.save_pretrained(str(tmp_path / name))
        return model.eval()

    refs = {
        "qkv": falcon_adapter("qkv", 1, ["query_key_value"]),
        "mlp": falcon_adapter("mlp", 2, ["dense_h_to_4h", "dense_4h_to_h"]),
    }
    client, rt = hf_client(falcon_dir, lora_modules=(f"qkv={tmp_path / 'qkv'}", f"mlp={tmp_path / 'mlp'}"))
    try:
        assert rt.engine.adapters == ["qkv", "mlp"]
        prompt = [5, 17, 90, 33, 41, 7, 12]
        answers = {}

        def ask(name):
            body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            r = client.post("/v1/completions", json=body | ({"model": name} if name else {}))
            answers[name] = r.status_code, r.get_json()

        threads = [threading.Thread(target=ask, args=(n,)) for n in ("qkv", "mlp", None, "qkv")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        texts = {}
        for name, (status, body) in answers.items():
            assert status == 200, body
            texts[name] = body["choices"][0]["text"]
        for name, ref in refs.items():
            ref.generation_config.eos_token_id = None
            with torch.inference_mode():
                out = ref.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
            assert texts[name] == rt.engine.text(out[0, len(prompt) :].tolist()), name
        assert len(set(texts.values())) == 3  # the base model's answer is neither adapter's
        r = client.post("/v1/completions", json={"model": "nope", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "model_not_found"
    finally:
        rt.shutdown()


def test_peft_patterns_are_regexes_matched_at_a_module_path_end():
    from presets.engine.adapters import _pattern

    patterns = {"q_proj|v_proj": 32, "layers.1.mlp.up_proj": 4}
    assert _pattern(patterns, "model.layers.3.self_attn.v_proj", 16) == 32
    assert _pattern(patterns, "model.layers.3.self_attn.q_proj", 16) == 32
    assert _pattern(patterns, "model.layers.3.self_attn.k_proj", 16) == 16
    assert _pattern(patterns, "model.layers.1.mlp.up_proj", 16) == 4
    assert _pattern(patterns, "model.layers.11.mlp.up_proj", 16) == 16


def test_a_volumes_own_folders_are_not_adapters(tmp_path):
    for name in ("lost+found", "..data", "real"):
        (tmp_path / name).mkdir()
    assert [s.name for s in adapter_specs([], str(tmp_path), {})] == ["real"]


def test_a_request_waiting_for_a_lora_slot_does_not_hold_back_those_behind_it():
    from presets.engine.scheduler import Scheduler, SchedulerConfig

    sched = Scheduler(SchedulerConfig(max_batch_size=4, num_blocks=32, block_size=16, max_loras=1))

    def seq(adapter):
        return Sequence([1, 2, 3], SamplingParams(temperature=0, adapter=adapter), 4)

    first, blocked, base, same = seq(1), seq(2), seq(0), seq(1)
    sched.add([first, blocked, base, same])
    plan = sched.schedule()
    assert plan.seqs == [first, base, same]  # adapter 2 waits for adapter 1's slot; the others run
    assert list(sched.waiting) == [blocked]


def runtime_lora_app(ckpt, allow: bool):
    from presets.api.kaito_llama import completion
    from presets.api.lora_admin import lora_admin
    from presets.api.openai import openai
    from presets.http.app import create_app
    from presets.servers.llama import LlamaModel, build_runtime
    from tests.conftest import settings_for
    from tests.live_client import LiveClient

    settings = settings_for(ckpt, max_seq_len=128, max_batch_size=4, adapters_dir="", allow_runtime_lora=allow)
    rt = build_runtime(settings)
    rt.start(background=False)
    app = create_app(rt, [completion, openai, lora_admin])
    app.extensions["openai_model"] = LlamaModel(rt, settings, "completion")
    return LiveClient(app), rt


def test_adapters_load_and_unload_while_serving_in_vllms_shapes(tiny_ckpt, tmp_path):
    old = save_adapter(tiny_ckpt, str(tmp_path / "old"), seed=21, **ADAPTERS["all-r4"])
    new = save_adapter(tiny_ckpt, str(tmp_path / "new"), seed=22, **ADAPTERS["qv-r8"])
    write_folder(str(tmp_path / "dora"), {**GOOD, "use_dora": True}, {})
    client, rt = runtime_lora_app(tiny_ckpt, allow=True)
    tok = Tokenizer(f"{tiny_ckpt}/tokenizer.model")

    def complete(model):
        body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        r = client.post("/v1/completions", json=body)
        return r.status_code, r.get_json()

    def load(**body):
        r = client.post("/v1/load_lora_adapter", json=body)
        return r.status_code, r.get_data(as_text=True)

    def listed():
        return [c["id"] for c in client.get("/v1/models").get_json()["data"]]

    try:
        assert complete("late")[0] == 404
        assert load(lora_name="late", lora_path=str(tmp_path / "old")) == (
            200,
            "Success: LoRA adapter 'late' added successfully.",
        )
        assert listed() == ["llama2-completion", "late"]
        status, body = complete("late")
        assert status == 200 and body["choices"][0]["text"] == tok.decode(peft_greedy(old, PROMPT, 6))
        status, text = load(lora_name="late", lora_path=str(tmp_path / "new"))
        assert status == 400 and "already loaded" in text
        status, text = load(lora_name="d", lora_path=str(tmp_path / "dora"))
        assert status == 400 and "DoRA adapters are not served" in text
        status, text = load(lora_name="x", lora_path=str(tmp_path / "new"), extra=1)
        assert status == 400 and "unknown field" in text
        r = client.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
        assert (r.status_code, r.get_data(as_text=True)) == (200, "Success: LoRA adapter 'late' removed successfully.")
        assert listed() == ["llama2-completion"] and complete("late")[0] == 404
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 404
        # the same name again, another adapter: a new slot, so none of the old one's cached blocks is taken
        assert load(lora_name="late", lora_path=str(tmp_path / "new"))[0] == 200
        status, body = complete("late")
        assert status == 200 and body["choices"][0]["text"] == tok.decode(peft_greedy(new, PROMPT, 6))
    finally:
        rt.shutdown()


def test_loading_adapters_while_serving_is_off_by_default(tiny_ckpt):
    client, rt = runtime_lora_app(tiny_ckpt, allow=False)
    try:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/tmp"})
        assert r.status_code == 404 and "--allow_runtime_lora" in r.get_json()["error"]["message"]
    finally:
        rt.shutdown()
