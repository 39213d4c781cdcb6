"""LoRA adapters on our Llama layers, many in one step: each token's rows get their own adapter's low-rank path.

HuggingFace module paths map onto our layers: q/k/v_proj onto the stacked `attention.wqkv`, gate/up_proj
onto `feed_forward.w13`, o_proj and down_proj onto `wo` and `w2`. For a stacked layer an adapter's parts
become one pair: A stacks the parts' A rows (its ranks side by side), B is block-diagonal (each part's B
in its own rows and rank columns, zero where a part is not targeted), so q, k and v cost one matmul pair.
q and k rows are permuted as the base weights are (HF's half rotation to Meta's interleaved pairs).
Tensor parallel: B is split by output rows like a column-parallel layer's weight, A by input columns like
a row-parallel one's (whose low-rank product is then summed over the ranks before B).

A step groups its rows by adapter (kv_cache.StepAdapters). A small step (decodes, up to DENSE_ROWS rows)
runs every adapter present at once: rows gathered into one padded group per adapter, two batched matmuls
against the adapters' stacked A and B, the real rows added back; a large one (prompt chunks) goes
adapter by adapter over its runs of rows, adding x[rows] @ A^T @ B^T in place. Never a per-token copy of
A and B, never a copy of the base weights; the base layers (packed CPU kernels included) run unchanged.
"""

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.initialize import get_model_parallel_group, get_model_parallel_world_size

from presets.engine.adapters import AdapterError, LoraAdapter
from presets.models.llama.hf_checkpoint import to_interleaved
from presets.models.llama.kv_cache import StepAdapters

# HF module (within a layer) -> (our linear, part index within a stacked linear or None)
TARGETS = {
    "self_attn.q_proj": ("attention.wqkv", 0),
    "self_attn.k_proj": ("attention.wqkv", 1),
    "self_attn.v_proj": ("attention.wqkv", 2),
    "self_attn.o_proj": ("attention.wo", None),
    "mlp.gate_proj": ("feed_forward.w13", 0),
    "mlp.up_proj": ("feed_forward.w13", 1),
    "mlp.down_proj": ("feed_forward.w2", None),
}
ROW_PARALLEL = {"attention.wo", "feed_forward.w2"}


def module_paths(n_layers: int) -> set[str]:
    """The HF module paths an adapter of this model may target."""
    return {f"model.layers.{i}.{t}" for i in range(n_layers) for t in TARGETS}


def full_shape(args, target: str) -> tuple[int, int]:
    """(out, in) of the base model's HF module `target` (self_attn.q_proj, mlp.down_proj, ...), unsharded."""
    q, kv, hidden = args.n_heads * args.head_dim, (args.n_kv_heads or args.n_heads) * args.head_dim, args.ffn_hidden_dim
    return {
        "self_attn.q_proj": (q, args.dim),
        "self_attn.k_proj": (kv, args.dim),
        "self_attn.v_proj": (kv, args.dim),
        "self_attn.o_proj": (args.dim, q),
        "mlp.gate_proj": (hidden, args.dim),
        "mlp.up_proj": (hidden, args.dim),
        "mlp.down_proj": (args.dim, hidden),
    }[target]


def check_shapes(adapter: LoraAdapter, args) -> None:
    """AdapterError when an adapter's A and B do not fit the base model's modules (another base model's)."""
    for module, (a, b) in adapter.modules.items():
        out, inp = full_shape(args, module.split(".", 3)[3])
        if a.shape[1] != inp or b.shape[0] != out:
            raise AdapterError(
                f"adapter {adapter.name!r} ({adapter.path}): {module} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}; this base model's is {out} x {inp} (an adapter of another base model?)"
            )


DENSE_ROWS = 256  # steps of at most this many rows take every adapter's path at once (LinearLora.add_to)


class LinearLora:
    """Adapters' pairs on one of our linear layers: slot -> (A (R, in), B (out, R)), this rank's share; and the
    same stacked over the adapters, ranks padded to the largest (a_stack (S, R, in), b_stack (S, out, R))."""

    def __init__(self, row_parallel: bool):
        self.row_parallel = row_parallel
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.a_stack = self.b_stack = None

    def finalize(self, n_adapters: int) -> None:
        """Stack the pairs once every adapter's is in (zeros for an adapter that does not target this layer)."""
        if not self.pairs:
            self.a_stack = self.b_stack = None
            return
        a0, b0 = next(iter(self.pairs.values()))
        rank = max(a.shape[0] for a, _ in self.pairs.values())
        self.a_stack = a0.new_zeros(n_adapters, rank, a0.shape[1])
        self.b_stack = b0.new_zeros(n_adapters, b0.shape[0], rank)
        for slot, (a, b) in self.pairs.items():
            self.a_stack[slot - 1, : a.shape[0]] = a
            self.b_stack[slot - 1, :, : a.shape[0]] = b

    def add_to(self, out: torch.Tensor, x: torch.Tensor, step: StepAdapters) -> torch.Tensor:
        """out (1, N, out) += each row of x (1, N, in) through its adapter's pair, in place.

        A small step (decodes) runs every adapter present at once: its rows gathered into padded groups, two
        batched matmuls, the real rows added back; a pair per adapter would be bound by the calls' overhead.
        A large one (prompt chunks) goes adapter by adapter over its runs of rows, with no padding."""
        if self.a_stack is None:
            return out
        if x.shape[1] <= DENSE_ROWS:
            k, m = step.rows.shape
            xs = x[0].index_select(0, step.rows.flatten()).view(k, m, -1)
            a = self.a_stack if k == self.a_stack.shape[0] else self.a_stack.index_select(0, step.slots)
            b = self.b_stack if k == self.b_stack.shape[0] else self.b_stack.index_select(0, step.slots)
            low = torch.bmm(xs, a.transpose(1, 2))  # (k, m, R)
            if self.row_parallel and get_model_parallel_world_size() > 1:
                dist.all_reduce(low, group=get_model_parallel_group())
            delta = torch.bmm(low, b.transpose(1, 2)).view(k * m, -1)
            out[0].index_add_(0, step.rows.flatten()[step.real], delta[step.real])
            return out
        for slot, runs in step.runs:
            pair = self.pairs.get(slot)
            if pair is None:
                continue
            a, b = pair
            for start, end in runs:
                low = x[0, start:end] @ a.T  # (n, R)
                if self.row_parallel and get_model_parallel_world_size() > 1:
                    dist.all_reduce(low, group=get_model_parallel_group())
                out[0, start:end].addmm_(low, b.T)
        return out


def part_sizes(layer, ours: str) -> list[int]:
    """This rank's output rows of each part of our linear `ours` (q, k, v; gate, up; or the one part)."""
    if ours == "attention.wqkv":
        return list(layer.attention.qkv_sizes)
    if ours == "feed_forward.w13":
        return [layer.feed_forward.local_hidden] * 2
    return [layer.ffn_norm.weight.shape[0]]  # wo, w2: the model's width


def attach(model, adapters: list[LoraAdapter], rank: int, mp: int) -> None:
    """Give every layer's attention and feed-forward their LinearLoras (`.lora`: linear name -> LinearLora),
    adapters in slots 1, 2, ... in the order given; slot 0 is the base model. AdapterError when an adapter's
    shapes are not this model's."""
    for adapter in adapters:
        check_shapes(adapter, model.args)
    for slot, adapter in enumerate(adapters, start=1):
        add(model, adapter, slot, rank, mp, finalize=False)
    _finalize(model, len(adapters))


def linears(model) -> list[LinearLora]:
    """Every layer's LinearLoras, made (empty) on first use."""
    out = []
    for layer in model.layers:
        if layer.attention.lora is None:
            layer.attention.lora = {"wqkv": LinearLora(False), "wo": LinearLora(True)}
            layer.feed_forward.lora = {"w13": LinearLora(False), "w2": LinearLora(True)}
        out += [*layer.attention.lora.values(), *layer.feed_forward.lora.values()]
    return out


def _finalize(model, n_slots: int) -> None:
    for linear in linears(model):
        linear.finalize(n_slots)


def add(model, adapter: LoraAdapter, slot: int, rank: int, mp: int, finalize: bool = True) -> None:
    """Put `adapter` in `slot` on every layer it targets (the engine thread calls this between steps)."""
    args = model.args
    check_shapes(adapter, args)
    linears(model)
    n_kv = args.n_kv_heads or args.n_heads
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    by_layer: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, (a, b) in adapter.modules.items():
        _, _, index, target = module.split(".", 3)
        ours, part = TARGETS[target]
        if target in ("self_attn.q_proj", "self_attn.k_proj"):
            b = to_interleaved(b, args.n_heads if target.endswith("q_proj") else n_kv)
        by_layer.setdefault((int(index), ours), {})[part or 0] = (a, b)
    for (index, ours), parts in by_layer.items():
        layer = model.layers[index]
        a, b = _pair(ours in ROW_PARALLEL, parts, part_sizes(layer, ours), rank, mp)
        module, linear = ours.split(".")
        layer.get_submodule(module).lora[linear].pairs[slot] = (a.to(device, dtype), b.to(device, dtype))
    if finalize:
        _finalize(model, max(slot, _slots(model)))


def remove(model, slot: int) -> None:
    """Take the adapter in `slot` off every layer (its slot number is not given out again)."""
    for linear in linears(model):
        linear.pairs.pop(slot, None)
    _finalize(model, _slots(model))


def _slots(model) -> int:
    """The stacks' height: the largest slot they hold."""
    stack = next((x.a_stack for x in linears(model) if x.a_stack is not None), None)
    return 0 if stack is None else stack.shape[0]


def _pair(row_parallel: bool, parts: dict, sizes: list[int], rank: int, mp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (A, B) of one adapter on one of our linears, from its parts' full (A, B)."""
    if row_parallel:  # one part: A split by input columns, B whole
        a, b = parts[0]
        return a.chunk(mp, dim=1)[rank].contiguous(), b
    ranks = [parts[p][0].shape[0] if p in parts else 0 for p in range(len(sizes))]
    a = torch.cat([parts[p][0] for p in range(len(sizes)) if p in parts])
    b = torch.zeros(sum(sizes), sum(ranks))
    row = col = 0
    for p, size in enumerate(sizes):  # block-diagonal: part p's rows x part p's rank columns
        if p in parts:
            b[row : row + size, col : col + ranks[p]] = parts[p][1].chunk(mp, dim=0)[rank]
            col += ranks[p]
        row += size
    return a, b
