"""Attention over packed rows (--packing): several examples share a row, and each token attends only to the
earlier tokens of its own example. The model finds the examples from the per-token positions (an example
starts where its position is 0) and calls `packed_attention`, which runs one of three equal computations,
the one measured fastest where it runs (`way_for`):

- on a CPU: SDPA's causal kernel example by example. A block mask would compute the blocks between
  examples only to mask them (a 512-token row of two 256-token examples: a quarter of the work); attending
  example by example made packing 7-11% faster on the 2-core CPU (benchmarks/RESULTS.md);
- on a GPU, rows of up to VARIABLE_LENGTH_FROM - 1 tokens: SDPA with the block mask (`packed_mask`, made once
  per forward). At these lengths an eager step is bound by the host's kernel launches, not the arithmetic:
  one 7B layer's attention, forward and backward, on an NVIDIA H200 (benchmarks/packed_attention.py, real
  Alpaca lengths, rows of at most 256 or 512 tokens): the mask 0.67-0.95 ms per micro-batch, the
  variable-length kernel 1.4-1.9 ms (its Python custom op and the flattening copies), example by example
  2.4-8.0 ms (then by slicing);
- on a GPU, longer rows (a packed micro-batch is one row: `batches.pack_batch`): in bf16/fp16 PyTorch's
  variable-length flash attention (`torch.nn.attention.varlen`), all the examples in one kernel, computing
  only each example's own causal triangle while the mask's work grows with the square of the row (the
  crossover is an estimate from that arithmetic, not measured: see VARIABLE_LENGTH_FROM); in float32, or
  before PyTorch 2.9, example by example.

Inside a compiled block (`--compile`) the mask is used everywhere: micro-batches of any layout share one graph.
"""

import functools
import inspect
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

Spans = List[List[Tuple[int, int]]]  # each row's examples as (start, end), end exclusive


# From this row length on a GPU the variable-length kernel replaces the mask. An estimate: the mask's kernel
# computes every (query, key) pair of a row, 4 T^2 n_embd FLOPs forward and about 2.5x that backward; for a
# 7B that is 0.2 ms per layer for one row of 1024 tokens on an H200 (at ~300 TFLOP/s), 0.8 ms at 2048 and 3.2
# ms at 4096, where the variable-length kernel's extra host time is about 1 ms and its arithmetic only the
# examples' own triangles.
VARIABLE_LENGTH_FROM = 1024


class PackedSpans(list):
    """`packed_spans`' result: a list (row) of lists of (start, end) spans, and what the kernels take instead,
    made once per forward (the same for every layer) on the device that asks: the block mask, and the spans'
    offsets in the flattened (B * T) batch."""

    def __init__(self, rows: Spans, length: int) -> None:
        super().__init__(rows)
        self.length = length
        self.longest = max(e - s for row in rows for s, e in row)
        self._made: Dict[str, torch.Tensor] = {}

    def offsets(self, device: torch.device) -> torch.Tensor:
        """(number of spans + 1,) int32: where each example starts in the flattened batch, then its end."""
        return self._once("offsets", device, lambda: torch.tensor(
            [b * self.length + s for b, row in enumerate(self) for s, _ in row] + [len(self) * self.length],
            dtype=torch.int32, device=device))

    def mask(self, device: torch.device) -> torch.Tensor:
        """`packed_mask` of these spans, (B, 1, T, T) bool."""
        return self._once("mask", device, lambda: packed_mask(self, self.length, device))

    def _once(self, name: str, device: torch.device, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if name not in self._made or self._made[name].device != device:
            self._made[name] = make()
        return self._made[name]


def packed_spans(positions: torch.Tensor) -> PackedSpans:
    """Each packed row's examples as (start, end) spans from the (B, T) positions: an example starts where its
    position is 0; a row's end padding is a span too."""
    spans = []
    for row in positions.tolist():
        starts = [t for t, p in enumerate(row) if p == 0] + [len(row)]
        spans.append(list(zip(starts[:-1], starts[1:])))
    return PackedSpans(spans, positions.size(1))


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: PackedSpans) -> torch.Tensor:
    """Causal attention within each example of the packed rows: q, k, v and the result (B, n_head, T, hs)."""
    way = way_for(q.device.type, q.dtype, spans.length, variable_length_kernel() is not None)
    if way == "variable length":
        return attend_variable_length(q, k, v, spans)
    if way == "mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=spans.mask(q.device))
    return attend_example_by_example(q, k, v, spans)


def way_for(device_type: str, dtype: torch.dtype, length: int, have_variable_length: bool) -> str:
    """Which computation `packed_attention` runs for rows of `length` tokens (see the module's docstring)."""
    if device_type != "cuda":
        return "example by example"
    if length < VARIABLE_LENGTH_FROM:
        return "mask"
    half = dtype in (torch.bfloat16, torch.float16)  # flash attention has no float32 kernel
    # without it, example by example: the mask's work would grow with the square of the row
    return "variable length" if half and have_variable_length else "example by example"


def attend_variable_length(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: PackedSpans) -> torch.Tensor:
    """All the examples in one kernel call: the batch flattened to (B * T, n_head, hs), each example a sequence
    of its own between two offsets."""
    B, H, T, hs = q.shape
    flat = [t.transpose(1, 2).reshape(B * T, H, hs) for t in (q, k, v)]
    offsets = spans.offsets(q.device)
    y = variable_length_kernel()(*flat, offsets, offsets, spans.longest, spans.longest)
    return y.view(B, T, H, hs).transpose(1, 2)


def attend_example_by_example(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: Spans) -> torch.Tensor:
    """SDPA's causal kernel on each example's part of its row, the parts joined back into rows. Split by
    unbind and split, whose backward passes join the gradients in one copy; indexing or slicing instead
    would fill a zero tensor of the whole batch's size per example in the backward pass."""
    rows = []
    for row, *qkv in zip(spans, q.unbind(0), k.unbind(0), v.unbind(0)):  # each (n_head, T, hs)
        sizes = [e - s for s, e in row]
        parts = zip(*(t.split(sizes, dim=1) for t in qkv))
        rows.append(torch.cat([F.scaled_dot_product_attention(*part, is_causal=True) for part in parts], dim=1))
    return torch.stack(rows)


@functools.lru_cache(maxsize=None)
def variable_length_kernel() -> Optional[Callable[..., torch.Tensor]]:
    """torch.nn.attention.varlen.varlen_attn made causal, or None before PyTorch 2.9. Its causal flag changed: `is_causal=True` in 2.9, `window_size=(-1, 0)` from 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:
        return functools.partial(varlen_attn, window_size=(-1, 0))
    if "is_causal" in parameters:
        return functools.partial(varlen_attn, is_causal=True)
    return None


def packed_mask(spans: Spans, length: int, device: torch.device) -> torch.Tensor:
    """(B, 1, T, T) bool, True where a query may attend: causal, and within its own example's span; the same
    attention as attending example by example, as one tensor (a compiled graph takes it whatever the layout)."""
    example = torch.tensor([[i for i, (s, e) in enumerate(row) for _ in range(e - s)] for row in spans], device=device)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return ((example.unsqueeze(2) == example.unsqueeze(1)) & causal).unsqueeze(1)
