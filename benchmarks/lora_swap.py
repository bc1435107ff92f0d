"""Merged hot swap and the adapter cache of lit_llama/multi_lora.py, measured.

    python benchmarks/lora_swap.py                                   # CPU, the 4x512 LLaMA shape
    python benchmarks/lora_swap.py --device cuda --precision bf16-true

Adapters: LoRA r 8 on query and value, random A and B (the cost of trained ones), written as finetune/lora.py
writes them.
- Exactness: 1,000 random switches (80% batches of one adapter, merged; 20% mixed batches, unmerged) in float32,
  bf16 and fp16; the SHA-256 of the base weights afterwards against the loaded ones.
- Swap: `select([b])` while adapter a is merged (the kept rows of a copied back, b merged), median of 50,
  against one forward pass over a prompt of 32 tokens at batch 1.
- Generation at batch 1 (greedy, 32 new tokens after a 32-token prompt): one adapter merged, the same adapter
  unmerged (gathered from the stacks), and the base alone; the three in turn, median of 5 rounds.
- Cache: 1,000 adapters; 4 device slots; a switch to an adapter not on the device (median over 200 selects of
  single adapters, each new to the device), from host memory (--max_host_adapters 1000) against from disk
  (--max_host_adapters 4: every switch reads the LoRA file; the operating system's page cache is warm, so
  a cold disk is slower). Memory of each level with all 1,000 in host memory.
Appends the rows to benchmarks/RESULTS.md.
"""

import hashlib
import os
import platform
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows, median_seconds, sync_time  # noqa: E402
from benchmarks.multi_lora import SMALL, write_adapters  # noqa: E402
from lit_llama.checkpoint import default_dtype  # noqa: E402
from lit_llama.cli import UserError, run_cli  # noqa: E402
from lit_llama.distributed import precision_dtype  # noqa: E402
from lit_llama.generation import generate_batch  # noqa: E402
from lit_llama.model import Config, LLaMA  # noqa: E402
from lit_llama.multi_lora import MultiLoRALLaMA  # noqa: E402

SWAP_HEADER = """
## Merged hot swap: exact base, swap time, merged vs unmerged speed

`python benchmarks/lora_swap.py`: one base, LoRA r 8 on query and value (lit_llama/multi_lora.py, --swap
merged). Exact: the SHA-256 of the base weights after N random switches (merged single-adapter batches and
unmerged mixed ones) equals the loaded one, in float32 / bf16 / fp16. Swap: selecting adapter b while a is
merged (a's kept rows copied back, b merged in float32 and rounded once), against one forward pass of 32
tokens at batch 1. Tokens/s: batch 1, greedy, 32 new tokens.

| date | machine | model | precision | base bit-identical after N random swaps (fp32 / bf16 / fp16) | swap | one forward (32 tokens) | tokens/s merged | tokens/s unmerged | tokens/s base |
|---|---|---|---|---|---|---|---|---|---|
"""

CACHE_HEADER = """
## Adapter cache: a switch from host memory vs from disk

`python benchmarks/lora_swap.py`: 1,000 LoRA adapters (r 8, query and value) on one base, 4 device slots
(--max_device_adapters 4). A switch: selecting a batch of one adapter that is not on the device (unmerged
mode), median over 200. From host: all 1,000 in host memory (--max_host_adapters 1000); from disk: 4 in host
memory, so each switch reads the LoRA file (warm OS page cache). On a CPU, "device" is the same memory.

| date | machine | model | precision | adapters | host -> device | disk -> device | device memory (4 slots) | host memory (1,000) |
|---|---|---|---|---|---|---|---|---|
"""


def main(
    model_size: Optional[str] = None,
    adapters: int = 1000,
    swaps: int = 1000,
    device: str = "cpu",
    precision: str = "32-true",
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> None:
    """Measures the merged swap (exactness, time, speed) and the adapter cache (switch latency, memory).

    Args:
        model_size: A named size from lit_llama/model.py (e.g. 7B); default: a 4-layer, 512-wide LLaMA.
        adapters: LoRA files for the cache measurement (at least 8).
        swaps: Random switches of the exactness check, in each of float32, bf16 and fp16.
        device: cpu or cuda.
        precision: 32-true, 16-true or bf16-true: the dtype of the timings.
        results_file: Markdown file to add the rows to ("" for none).
    """
    if adapters < 8 or swaps < 1:
        raise UserError("--adapters must be at least 8 and --swaps at least 1")
    dev, dtype = torch.device(device), precision_dtype(precision)
    config = Config.from_name(model_size) if model_size else Config(**SMALL)
    shape = model_size or "4x512 (32k vocab)"
    machine = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else f"CPU {platform.machine()}, {os.cpu_count()} cores")
    torch.manual_seed(0)
    with torch.device("cpu"):
        base = LLaMA(config).state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_adapters(config, adapters, Path(tmp))

        exact = [exact_after_swaps(config, base, files, dev, d, swaps)
                 for d in (torch.float32, torch.bfloat16, torch.float16)]
        print(f"base bit-identical after {swaps} swaps (float32, bf16, fp16): {exact}")

        model = build(config, base, dev, dtype, swap="merged")
        for name in ("a0", "a1"):
            model.add_adapter(name, files[name])
        prompt = torch.randint(3, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1)).to(dev)
        order = iter(["a0", "a1"] * 100)
        swap = median_seconds(lambda: model.select([next(order)]), dev, 50)
        with torch.no_grad():
            forward = median_seconds(lambda: model(prompt), dev, 10)
        # the three modes in turn, 5 rounds, the median of each: a busy machine's slow spells hit all three
        seconds: Dict[str, List[float]] = {"merged": [], "unmerged": [], "base": []}
        for turn in range(6):
            for mode, rows in (("merged", ["a0"]), ("unmerged", ["a0"]), ("base", ["base"])):
                model.swap = "unmerged" if mode == "unmerged" else "merged"
                model.select(rows)
                assert (model.merged == "a0") == (mode == "merged")
                t0 = sync_time(dev)
                generate_batch(model, [prompt[0]], 32, temperature=0)
                if turn:  # the first turn warms up
                    seconds[mode].append(sync_time(dev) - t0)
        rates = {mode: 32 / statistics.median(times) for mode, times in seconds.items()}
        print(f"swap {swap * 1e3:.2f} ms, one forward of 32 tokens {forward * 1e3:.2f} ms; tokens/s at batch 1: "
              f"merged {rates['merged']:.1f}, unmerged {rates['unmerged']:.1f}, base {rates['base']:.1f}")
        del model

        host_switch, host_model = switch_seconds(config, base, files, dev, dtype, max_host=adapters)
        memory = host_model.memory()
        del host_model
        disk_switch, _ = switch_seconds(config, base, files, dev, dtype, max_host=4)
        print(f"{adapters} adapters: switch host -> device {host_switch * 1e3:.2f} ms, disk -> device "
              f"{disk_switch * 1e3:.2f} ms; device {memory['device_bytes'] / 1e6:.1f} MB, host "
              f"{memory['host_bytes'] / 1e6:.1f} MB")

    yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
    add_rows(results_file, SWAP_HEADER, [
        f"| {date.today()} | {machine} | {shape} | {precision} | {' / '.join(yes(e) for e in exact)} (N = {swaps}) | "
        f"{swap * 1e3:.2f} ms | {forward * 1e3:.2f} ms | {rates['merged']:.1f} | {rates['unmerged']:.1f} | "
        f"{rates['base']:.1f} |"])
    add_rows(results_file, CACHE_HEADER, [
        f"| {date.today()} | {machine} | {shape} | {precision} | {adapters} | {host_switch * 1e3:.2f} ms | "
        f"{disk_switch * 1e3:.2f} ms | {memory['device_bytes'] / 1e6:.1f} MB | {memory['host_bytes'] / 1e6:.1f} MB |"])
    if results_file:
        print(f"rows added to {results_file}")


def build(config: Config, base: Dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
          **cache) -> MultiLoRALLaMA:
    with device, default_dtype(dtype):
        model = MultiLoRALLaMA(config, **cache).eval()
    model.load_state_dict(base, strict=False)
    return model


def digest(model: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(t.detach().cpu().view(torch.uint8).numpy().tobytes()
                                   for t in model.state_dict().values())).hexdigest()


def exact_after_swaps(config: Config, base: Dict[str, torch.Tensor], files: Dict[str, Path], device: torch.device,
                      dtype: torch.dtype, swaps: int) -> bool:
    """Whether the base weights hash as loaded after `swaps` random switches among 4 adapters and the base."""
    model = build(config, base, device, dtype, swap="merged")
    names = ["a0", "a1", "a2", "a3"]
    for name in names:
        model.add_adapter(name, files[name])
    loaded = digest(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(swaps):
        if torch.rand((), generator=g) < 0.8:
            model.select([[*names, "base"][int(torch.randint(5, (), generator=g))]])
        else:
            model.select([names[int(i)] for i in torch.randint(4, (3,), generator=g)] + ["a0", "a1"])
    model.select(None)
    return digest(model) == loaded


def switch_seconds(config: Config, base: Dict[str, torch.Tensor], files: Dict[str, Path], device: torch.device,
                   dtype: torch.dtype, max_host: int):
    """Median seconds of selecting an adapter that is not on the device (4 slots, `max_host` in host memory)."""
    model = build(config, base, device, dtype, max_device_adapters=4, max_host_adapters=max_host)
    for name, path in files.items():  # the last `max_host` stay in host memory
        model.add_adapter(name, path)
    times: List[float] = []
    # 200 different adapters (or as many as there are), none of the 4 added first (on the device) or last (in
    # host memory with max_host 4): each select brings a new one to the device, from host memory or its file
    for name in list(files)[4:-4][:200]:
        t0 = sync_time(device)
        model.select([name])
        times.append(sync_time(device) - t0)
    return statistics.median(times), model



if __name__ == "__main__":
    run_cli(main)
