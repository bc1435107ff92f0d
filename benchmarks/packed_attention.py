"""The attention of one layer, forward and backward, on the micro-batches a LoRA run trains on: packed rows
through each way lit_llama.packed_attention can attend (the variable-length flash kernel, SDPA example by
example, SDPA with the block mask of compiled blocks), against the padded and the length-grouped
micro-batches through plain causal SDPA.

    python benchmarks/packed_attention.py --device cuda                       # 7B's heads, real Alpaca lengths
    python benchmarks/packed_attention.py --device cuda --micro_batch_size 16

Random q, k and v of the shapes the micro-batches give (the values do not change the time); the example
lengths are the real Alpaca records' with the LLaMA tokenizer where ../shared has them, else random. Each way
runs every micro-batch once untimed, then once timed, the ways taking turns micro-batch by micro-batch. Per
micro-batch: the wall time of forward + backward with the device synchronized at the end, and the host time
(until the last kernel is queued): where the host time is close to the wall time, the kernel launches and
Python around them are what costs, not the GPU's arithmetic. What the model makes once per forward for all its
layers (the spans, their offsets, the mask) is made before the timing.
"""

import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows  # noqa: E402
from benchmarks.lora_vs_peft import SHARED, make_samples  # noqa: E402
from lit_llama import packed_attention as pa  # noqa: E402
from lit_llama.batches import batch_indices, pack_batch  # noqa: E402
from lit_llama.cli import UserError, run_cli  # noqa: E402
from lit_llama.model import Config  # noqa: E402

RESULTS_HEADER = """
## Packed attention: one layer's kernels

`python benchmarks/packed_attention.py`: one layer's attention, forward and backward, over the micro-batches a
LoRA run trains on (seed 1337), random q, k, v of their shapes; ms per micro-batch, wall (synchronized) and host
(until the last kernel is queued). Packed rows (--packing) through the variable-length flash kernel, SDPA
example by example, and SDPA with the block mask; padded (plain) and length-grouped micro-batches through causal
SDPA. Times 32 layers for a 7B step's attention.

| date | machine | heads x size | dtype | micro batch | max length | data | way | positions | wall ms | host ms |
|---|---|---|---|---|---|---|---|---|---|---|
"""


def main(
    device: str = "cpu",
    heads: int = 32,
    head_size: int = 128,
    micro_batch_size: int = 4,
    max_seq_length: int = 512,
    batches: int = 24,
    data: str = "alpaca",
    layout: str = "one_row",
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> Dict[str, float]:
    """Times one layer's attention on packed, padded and grouped micro-batches; returns wall ms per way.

    Args:
        device: cpu or cuda (the variable-length kernel needs cuda and --dtype half precision).
        heads: Attention heads (7B: 32).
        head_size: Size of each head (7B: 128).
        micro_batch_size: Examples per micro-batch.
        max_seq_length: Examples cut to this many tokens; packed rows hold at most this many.
        batches: Micro-batches timed (24 of 4 cover the 102-record Alpaca sample).
        data: alpaca (the real records' lengths) or random (lengths from 60 to --max_seq_length).
        layout: one_row (each micro-batch's examples in one row without padding: --packing) or rows (rows of at
            most --max_seq_length, right-padded: --packing with --compile).
        results_file: Markdown file for the rows ("" for none).
    """
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected cpu or cuda")
    if layout not in ("one_row", "rows"):
        raise UserError(f"--layout {layout!r}: expected one_row or rows")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU here")
    for name, value in (("heads", heads), ("head_size", head_size), ("micro_batch_size", micro_batch_size),
                        ("max_seq_length", max_seq_length), ("batches", batches)):
        if value < 1:
            raise UserError(f"--{name} {value}: expected at least 1")
    dev = torch.device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    samples, source = make_samples(Config.from_name("7B"), micro_batch_size * batches, max_seq_length, data,
                                   SHARED / "data" / "alpaca_sample.json",
                                   SHARED / "tokenizers" / "llama" / "tokenizer.model")
    lengths = [min(len(s["input_ids"]), max_seq_length) for s in samples]
    print(f"{heads} heads x {head_size}, {dtype}, micro batch {micro_batch_size}, {max_seq_length} tokens, {source}, "
          f"packed as {layout}")

    def chunks(grouped: bool) -> List[List[int]]:
        key = tuple(lengths) if grouped else None
        return [[lengths[j] for j in batch_indices(len(lengths), micro_batch_size, i, 0, 1, 1337, key)]
                for i in range(batches)]

    def padded(chunk: List[int]) -> Callable[[], tuple]:
        shape = (len(chunk), heads, max(chunk), head_size)
        return lambda: (shape, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def packed(chunk: List[int], way: str) -> Callable[[], tuple]:
        examples = [{"input_ids": torch.zeros(n, dtype=torch.long), "labels": torch.zeros(n, dtype=torch.long)}
                    for n in chunk]  # only the lengths matter: pack_batch lays them out as training does
        _, _, positions = pack_batch(examples, max_seq_length, one_row=layout == "one_row")
        shape = (positions.size(0), heads, positions.size(1), head_size)

        # made once per forward in the model (for all its layers), so outside the timed layer here
        spans = pa.packed_spans(positions)
        made_once = spans.mask(dev) if way == "mask" else spans.offsets(dev) if way == "varlen" else None

        def attend(q, k, v):
            if way == "mask":
                return F.scaled_dot_product_attention(q, k, v, attn_mask=made_once)
            if way == "per example":
                return pa.attend_example_by_example(q, k, v, spans)
            return pa.attend_variable_length(q, k, v, spans)

        return lambda: (shape, attend)

    ways = {"padded": [padded(c) for c in chunks(False)], "grouped": [padded(c) for c in chunks(True)]}
    plain = chunks(False)
    if device == "cuda" and pa.variable_length_kernel() is not None:
        ways["packed, variable-length kernel"] = [packed(c, "varlen") for c in plain]
    ways["packed, example by example"] = [packed(c, "per example") for c in plain]
    ways["packed, block mask"] = [packed(c, "mask") for c in plain]

    generator = torch.Generator().manual_seed(0)
    made = {}  # inputs per (way, micro-batch), made before timing
    for name, items in ways.items():
        for i, item in enumerate(items):
            shape, attend = item()
            qkv = [torch.randn(shape, generator=generator).to(dev, dtype).requires_grad_() for _ in range(3)]
            made[name, i] = (qkv, attend, torch.randn(shape, generator=generator).to(dev, dtype))
    timings: Dict[str, List[float]] = {name: [] for name in ways}
    host: Dict[str, List[float]] = {name: [] for name in ways}
    for timed in (False, True):
        for i in range(batches):
            for name in ways:
                (q, k, v), attend, grad = made[name, i]
                sync(dev)
                t0 = time.perf_counter()
                attend(q, k, v).backward(grad)
                t1 = time.perf_counter()
                sync(dev)
                if timed:
                    host[name].append(t1 - t0)
                    timings[name].append(time.perf_counter() - t0)
                q.grad = k.grad = v.grad = None
    positions = {name: sum(made[name, i][0][0].shape[0] * made[name, i][0][0].shape[2] for i in range(batches))
                 for name in ways}
    machine = torch.cuda.get_device_name() if device == "cuda" else f"CPU {platform.machine()}"
    rows, result = [], {}
    for name in ways:
        wall, host_ms = 1e3 * sum(timings[name]) / batches, 1e3 * sum(host[name]) / batches
        result[name] = wall
        print(f"  {name:32s} {wall:8.3f} ms wall, {host_ms:8.3f} ms host per micro-batch, "
              f"{positions[name]:,} positions")
        rows.append(f"| {date.today()} | {machine} | {heads} x {head_size} | {str(dtype).split('.')[-1]} | "
                    f"{micro_batch_size} | {max_seq_length} | {data} | {name}{packed_as(name, layout)} | "
                    f"{positions[name]:,} | {wall:.3f} | {host_ms:.3f} |")
    add_rows(results_file, RESULTS_HEADER, rows)
    return result


def packed_as(way: str, layout: str) -> str:
    return f" ({layout.replace('_', ' ')})" if way.startswith("packed") else ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    run_cli(main)
