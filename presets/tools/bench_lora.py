"""LoRA benchmark (make bench-lora): the defined workload spread over 0, 1, 4 and 8 adapters, same run.

    python -m presets.tools.bench_lora [--ckpt_dir DIR] [--rank 16] [--requests 64 --clients 16 --new_tokens 64]

The bench model and workload of docs/benchmarks.md (this server in fp32 through Runtime.generate, HTTP
excluded); the adapters are random, rank `rank`, on every target (q, k, v, o, gate, up, down), written in
PEFT's folder format. Request i runs on adapter i mod n (n = 0: the base model, no adapter loaded). Each
configuration runs in a process of its own; the base model runs first and last, so drift shows.
"""

import json
import os
import tempfile

import torch
from safetensors.torch import save_file

from presets.engine.params import SamplingParams
from presets.models.llama.load import read_args
from presets.models.llama.lora import TARGETS, full_shape
from presets.models.llama.tokenizer import Tokenizer
from presets.process.settings import Settings
from presets.servers.llama import build_runtime
from presets.tools.bench import BENCH_ARGS, _in_process, closed_loop, cpu_model, make_prompts, summarize, workload_args
from presets.tools.tiny_checkpoint import write_checkpoint


def write_adapter(folder: str, args, rank: int, seed: int) -> str:
    """A random LoRA on every target of every layer, as PEFT's save_pretrained lays it out."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(args.n_layers):
        for target in TARGETS:
            out, inp = full_shape(args, target)
            key = f"base_model.model.model.layers.{i}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) / rank**0.5 * 0.1
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": [t.split(".")[1] for t in TARGETS],
    }
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return folder


def run(ckpt: str, prompts, clients: int, new_tokens: int, folders: list[str]) -> dict:
    settings = Settings(
        ckpt_dir=ckpt,
        tokenizer_path=f"{ckpt}/tokenizer.model",
        device="cpu",
        dtype="float32",
        max_batch_size=clients,
        max_seq_len=max(map(len, prompts)) + new_tokens,
        max_queue_size=len(prompts),
        lora_modules=tuple(f"a{i}={f}" for i, f in enumerate(folders)),
        adapters_dir="",
        max_loras=max(1, len(folders)),
    )
    rt = build_runtime(settings)
    rt.start()
    rt.wait_started()
    index = {id(p): i for i, p in enumerate(prompts)}

    def params(i: int) -> SamplingParams:
        adapter = i % len(folders) + 1 if folders else 0
        return SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, adapter=adapter)

    for i in range(clients):  # warm-up at full batch, every adapter
        rt.generate([prompts[i]], params(i))

    def serve(prompt):
        (seq,) = rt.generate([prompt], params(index[id(prompt)]))
        return seq.token_times

    seconds, records = closed_loop(prompts, clients, serve)
    rt.shutdown()
    return summarize(f"{len(folders)} adapters" if folders else "base model", seconds, records, new_tokens)


def main(argv=None):
    ap = workload_args(__doc__)
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args(argv)
    if not os.path.exists(f"{a.ckpt_dir}/params.json"):
        print(f"writing the random-weight bench checkpoint to {a.ckpt_dir}")
        write_checkpoint(a.ckpt_dir, BENCH_ARGS)
    args = read_args(a.ckpt_dir, Tokenizer(f"{a.ckpt_dir}/tokenizer.model"))
    prompts = make_prompts(a.requests, args.vocab_size)
    root = tempfile.mkdtemp()
    folders = [write_adapter(os.path.join(root, f"a{i}"), args, a.rank, i) for i in range(8)]
    rows = [_in_process(run, a.ckpt_dir, prompts, a.clients, a.new_tokens, folders[:n]) for n in (0, 1, 4, 8, 0)]
    base = (rows[0]["tokens_per_s"] + rows[-1]["tokens_per_s"]) / 2
    print(f"\nmachine: {os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__}")
    print(
        f"model: dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}, fp32; "
        f"adapters of rank {a.rank} on every target"
    )
    print(f"workload: {a.requests} requests, {a.clients} clients, prompts 16-128 tokens, {a.new_tokens} new tokens\n")
    print("| requests spread over | output tokens/s | of the base model's | TTFT p50 (s) | ITL p50 (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['system']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.0%} | {r['ttft_p50']:.2f} "
            f"| {r['itl_p50'] * 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
