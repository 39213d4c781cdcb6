"""Faster fp32 linear layers on CPU: each weight repacked once into oneDNN's blocked layout.

At decode batch sizes (a few to a few dozen rows) MKL's plain sgemm streams the weights poorly
(on AMD EPYC much worse than on Intel Xeon); oneDNN's prepacked kernel is 1.5x (Xeon) to 2-3.5x (EPYC)
faster on the same math (see README, Benchmark). Projections that read the same input are stacked
into one matmul (wq|wk|wv, w1|w3): fewer, wider calls are about 10% faster per decode step. These
ops are PyTorch's own (the ones its CPU compiler uses for frozen weights) but not public API, so
`available()` guards them and the plain layers remain the fallback. The packed copy replaces the
original weights to keep memory the same.
"""

import types

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.initialize import get_model_parallel_group, get_model_parallel_world_size
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region

from presets.llama2.model import Attention, FeedForward


def available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def _linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


# The inference half of fairscale's forward methods, with the packed matmul in place of F.linear.
# Their autograd wrappers (identity on the way forward) cost more than the math at decode sizes.
def _column_forward(self, x):
    y = _linear(x, self.packed_weight)
    return gather_from_model_parallel_region(y) if self.gather_output else y


def _row_forward(self, x):
    y = _linear(x, self.packed_weight)
    if get_model_parallel_world_size() > 1:
        dist.all_reduce(y, group=get_model_parallel_group())
    return y


# wq|wk|wv and w1|w3 read the same input: one matmul over their stacked rows, then split.
def _fused_project(self, x):
    return _linear(x, self.packed_qkv).split(self.qkv_sizes, dim=-1)


def _fused_gate_up(self, x):
    return _linear(x, self.packed_gate_up).split(self.gate_up_sizes, dim=-1)


def _packable(m: torch.nn.Module) -> bool:
    column = isinstance(m, ColumnParallelLinear)
    if not (column or isinstance(m, RowParallelLinear)) or m.weight.device.type != "cpu":
        return False
    return m.weight.dtype == torch.float32 and m.bias is None and (column or m.input_is_parallel)


def _pack(linears, batch_hint: int) -> tuple[torch.Tensor, list[int]]:
    """This rank's weights of `linears` stacked and packed; each original weight is emptied."""
    sizes = [m.weight.shape[0] for m in linears]
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat([m.weight.detach() for m in linears]), batch_hint)
    for m in linears:
        m.weight.data = torch.empty(0)  # the packed copy is the weight from now on
    return packed, sizes


def pack_linears(model: torch.nn.Module, batch_hint: int) -> int:
    """Repack every fp32 CPU parallel linear layer of `model` in place; returns how many were packed."""
    n = 0
    for m in list(model.modules()):
        if isinstance(m, Attention) and all(map(_packable, (m.wq, m.wk, m.wv))):
            m.packed_qkv, m.qkv_sizes = _pack([m.wq, m.wk, m.wv], batch_hint)
            m.project = types.MethodType(_fused_project, m)
            n += 3
        elif isinstance(m, FeedForward) and all(map(_packable, (m.w1, m.w3))):
            m.packed_gate_up, m.gate_up_sizes = _pack([m.w1, m.w3], batch_hint)
            m.gate_up = types.MethodType(_fused_gate_up, m)
            n += 2
        elif _packable(m) and m.weight.numel():  # one not fused above (wo, w2, output)
            m.packed_weight = _pack([m], batch_hint)[0]
            m.forward = types.MethodType(_column_forward if isinstance(m, ColumnParallelLinear) else _row_forward, m)
            n += 1
    return n
