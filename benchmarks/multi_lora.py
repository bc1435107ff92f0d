"""Many adapters on one base: mixed-adapter batches vs one merged copy per adapter, swap cost, memory.

    python benchmarks/multi_lora.py                              # CPU, a small LLaMA shape
    python benchmarks/multi_lora.py --model_size 7B --device cuda --precision bf16-true

For k = 1, 4 and 16 adapters (LoRA r 8 on query and value, random B: the cost of a trained adapter), 16
requests of random prompts (16 to 48 tokens), request i for adapter i mod k, greedy, a fixed number of new
tokens (no end-of-text stop):
- mixed: one MultiLoRALLaMA, the base loaded once, all 16 requests in one batch, each row its own adapter;
- separate: one merged copy of the model per adapter (prepared beforehand, not timed), each adapter's
  requests in one batch on its copy, one adapter after the other.
Swap cost: selecting an adapter for a batch (`select`), loading one from its file (`add_adapter`), against
merging and unmerging one into the weights (what switching a single merged model costs).
Memory: the base and the adapters' stacks, against k merged copies (tensor bytes, counted exactly).
Appends the rows to benchmarks/RESULTS.md.
"""

import platform
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows, median_seconds, sync_time  # noqa: E402
from lit_llama.generation import generate_batch  # noqa: E402
from lit_llama.lora import LoRAConfig, LoRALLaMA, lora_state_dict  # noqa: E402
from lit_llama.model import Config, LLaMA  # noqa: E402
from lit_llama.multi_lora import MultiLoRALLaMA  # noqa: E402
from lit_llama.checkpoint import default_dtype
from lit_llama.cli import run_cli
from lit_llama.distributed import precision_dtype

RESULTS_HEADER = """
## Many LoRA adapters on one base

`python benchmarks/multi_lora.py`: 16 requests (random prompts of 16-48 tokens, greedy, fixed new tokens),
request i for adapter i mod k; LoRA r 8 on query and value. Mixed: one base, one batch, each row its own
adapter (lit_llama/multi_lora.py). Separate: one merged copy per adapter, each adapter's requests batched
on its copy, one adapter after another. Memory: tensor bytes of the base plus the adapters' stacks, against
k merged copies. Swap: selecting the adapters of a batch / loading one adapter file / merging + unmerging one.

| date | machine | model | precision | adapters k | mixed tokens/s | separate tokens/s | ratio | memory mixed | memory k merged copies | select / load / merge+unmerge |
|---|---|---|---|---|---|---|---|---|---|---|
"""

# a LLaMA shape small enough for a CPU: 4 layers of width 512, the real 32k vocabulary
SMALL = dict(n_layer=4, n_head=8, n_embd=512, intermediate_size=1376, vocab_size=32000, block_size=512)


def main(
    model_size: Optional[str] = None,
    adapter_counts: List[int] = [1, 4, 16],
    requests: int = 16,
    max_new_tokens: int = 24,
    repeats: int = 3,
    device: str = "cpu",
    precision: str = "32-true",
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> None:
    """Measures mixed-adapter batches against merged copies, swap cost and memory.

    Args:
        model_size: A named size from lit_llama/model.py (e.g. 7B); default: a 4-layer, 512-wide LLaMA.
        adapter_counts: Numbers of adapters k, one row each.
        requests: Requests per measurement (request i uses adapter i mod k).
        max_new_tokens: New tokens per request.
        repeats: Timed repetitions (the median is reported) after one untimed warm-up.
        device: cpu or cuda.
        precision: 32-true or bf16-true.
        results_file: Markdown file to add the rows to (none: print only).
    """
    dev, dtype = torch.device(device), precision_dtype(precision)
    config = Config.from_name(model_size) if model_size else Config(**SMALL)
    shape = model_size or "4x512 (32k vocab)"
    torch.manual_seed(0)
    with dev, default_dtype(dtype):
        base = LLaMA(config).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (int(n),), generator=g).to(dev)
               for n in torch.randint(16, 49, (requests,), generator=g)]
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_adapters(config, max(adapter_counts), Path(tmp))
        for k in adapter_counts:
            names = [f"a{i}" for i in range(k)]
            row_names = [names[i % k] for i in range(requests)]

            with dev, default_dtype(dtype):
                multi = MultiLoRALLaMA(config).eval()
            multi.load_state_dict(base.state_dict(), strict=False)
            load_seconds = []
            for name in names:
                t0 = sync_time(dev)
                multi.add_adapter(name, files[name])
                load_seconds.append(sync_time(dev) - t0)
            t0 = sync_time(dev)
            multi.select(row_names)
            select_seconds = sync_time(dev) - t0
            mixed = median_seconds(lambda: generate_batch(multi, prompts, max_new_tokens, temperature=0), dev, repeats)

            merged = {}
            for name in names:
                with dev, default_dtype(dtype):
                    copy = LoRALLaMA(config, LoRAConfig(r=8, alpha=16, dropout=0.0)).eval()
                copy.load_state_dict(base.state_dict(), strict=False)
                copy.load_state_dict(torch.load(files[name], weights_only=True)["state_dict"], strict=False)
                copy.merge_lora()
                merged[name] = copy
            groups = {name: [p for p, n in zip(prompts, row_names) if n == name] for name in names}

            def separate() -> None:
                for name in names:
                    generate_batch(merged[name], groups[name], max_new_tokens, temperature=0)

            separate_seconds = median_seconds(separate, dev, repeats)
            copy = merged[names[0]]
            t0 = sync_time(dev)
            copy.unmerge_lora()
            copy.merge_lora()
            merge_seconds = sync_time(dev) - t0

            tokens = requests * max_new_tokens
            base_bytes = tensor_bytes(base.parameters())
            stack_bytes = tensor_bytes(multi.buffers())
            mixed_rate, separate_rate = tokens / mixed, tokens / separate_seconds
            print(f"k={k}: mixed {mixed_rate:.0f} tokens/s, separate {separate_rate:.0f} tokens/s "
                  f"({mixed_rate / separate_rate:.2f}x); memory {(base_bytes + stack_bytes) / 1e6:.1f} MB vs "
                  f"{k * base_bytes / 1e6:.1f} MB; select {select_seconds * 1e3:.2f} ms, load "
                  f"{statistics.median(load_seconds) * 1e3:.1f} ms, merge+unmerge {merge_seconds * 1e3:.1f} ms")
            rows.append(
                f"| {date.today()} | {machine} | {shape} | {precision} | {k} | {mixed_rate:.0f} | {separate_rate:.0f} | "
                f"{mixed_rate / separate_rate:.2f}x | {(base_bytes + stack_bytes) / 1e6:.1f} MB | "
                f"{k * base_bytes / 1e6:.1f} MB | {select_seconds * 1e3:.2f} / "
                f"{statistics.median(load_seconds) * 1e3:.1f} / {merge_seconds * 1e3:.1f} ms |"
            )
    if results_file:
        add_rows(results_file, RESULTS_HEADER, rows)
        print(f"rows added to {results_file}")


def write_adapters(config: Config, count: int, folder: Path) -> dict:
    """`count` LoRA files as finetune/lora.py writes them (r 8 on query and value), B random."""
    with torch.device("meta"):
        template = LoRALLaMA(config, LoRAConfig(r=8, alpha=16, dropout=0.0))
    files = {}
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        tensors = {name: torch.randn(t.shape, generator=g) * 0.02 for name, t in template.state_dict().items()
                   if "lora_" in name}
        checkpoint = lora_state_dict(template, tensors)
        files[f"a{i}"] = folder / f"a{i}.pth"
        torch.save(checkpoint, files[f"a{i}"])
    return files



def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)



if __name__ == "__main__":
    run_cli(main)
