"""--packing against padded batches and --group_by_length, side by side: our LoRA training step on the same
model three times (the frozen base shared, each arm its own LoRA weights and AdamW), the arms taking turns step
by step, and nothing else in between (benchmarks/lora_vs_peft.py's lever table steps PEFT's model between
them too).

    python benchmarks/packing.py --max_seq_length 256        # real Alpaca records, micro batch 4
    python benchmarks/packing.py --max_seq_length 512 --micro_batch_size 8 --steps 12

Padded: the micro-batches finetune/lora.py trains on (seed 1337), each example its own row padded to the
longest. Grouped: --group_by_length's micro-batches (examples of similar length together). Packed: the padded
arm's micro-batches with --packing (one row per micro-batch, no padding). Tokens/s counts real tokens over the
timed steps; step peak: the most memory one step takes above what it starts with, on the arm's micro-batch
with the most positions, after the timing.
"""

import copy
import platform
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Dict, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows, step_peak_memory, sync_time  # noqa: E402
from benchmarks.lora_vs_peft import (  # noqa: E402
    SHARED, SMALL, Arm, make_batches, make_samples, padded_fraction, real_tokens, to_device)
from lit_llama.checkpoint import default_dtype  # noqa: E402
from lit_llama.cli import UserError, run_cli  # noqa: E402
from lit_llama.distributed import precision_dtype  # noqa: E402
from lit_llama.finetune import keep_trainable_in_fp32  # noqa: E402
from lit_llama.lora import LoRAConfig, LoRALLaMA, mark_only_lora_as_trainable  # noqa: E402
from lit_llama.model import Config  # noqa: E402
from lit_llama.training import compute_loss  # noqa: E402

RESULTS_HEADER = """
## Packing against padded and grouped batches

`python benchmarks/packing.py`: our LoRA step (r 8, query and value) on padded micro-batches, on
--group_by_length's and on --packing's (the padded ones' examples, one row each, no padding), the three arms on
the same frozen model taking turns step by step. Tokens/s: real tokens over the timed steps. Step peak: one
step's memory above its start, on the arm's largest micro-batch. Padded: positions that are padding.

| date | machine | model | precision | micro batch | max length | data | steps | tokens/s padded / grouped / packed | packed / grouped | step peak padded / grouped / packed | padded positions |
|---|---|---|---|---|---|---|---|---|---|---|---|
"""
ARMS = ("padded", "grouped", "packed")


def main(
    model_size: Optional[str] = None,
    micro_batch_size: int = 4,
    max_seq_length: int = 256,
    steps: int = 24,
    warmup_steps: int = 2,
    device: str = "cpu",
    precision: str = "32-true",
    data: str = "alpaca",
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> Dict[str, float]:
    """Times our LoRA step on padded, grouped and packed micro-batches, taking turns; returns tokens/s of each.

    Args:
        model_size: A named size from lit_llama/model.py (e.g. 7B); default: a 4-layer, 512-wide LLaMA.
        micro_batch_size: Examples per micro-batch.
        max_seq_length: Examples are cut to this many tokens.
        steps: Timed steps per arm (24 of 4 cover the 102-record Alpaca sample, so grouped batches see the same
            examples as the others).
        warmup_steps: Untimed steps first.
        device: cpu or cuda.
        precision: 32-true, or bf16-true (frozen weights in bf16, LoRA weights float32).
        data: alpaca (../shared's records and LLaMA tokenizer, loss on the response) or random.
        results_file: Markdown file to add the row to ("" for none).
    """
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU here")
    for flag, value in (("steps", steps), ("warmup_steps", warmup_steps), ("micro_batch_size", micro_batch_size),
                        ("max_seq_length", max_seq_length)):
        if value < 1:
            raise UserError(f"--{flag} {value}: expected at least 1")
    dev, dtype = torch.device(device), precision_dtype(precision)
    try:
        config = Config.from_name(model_size) if model_size else Config(**SMALL)
    except ValueError as e:
        raise UserError(f"--model_size: {e}")
    torch.manual_seed(0)
    samples, source = make_samples(config, micro_batch_size * (warmup_steps + steps), max_seq_length, data,
                                   SHARED / "data" / "alpaca_sample.json",
                                   SHARED / "tokenizers" / "llama" / "tokenizer.model")
    with dev, default_dtype(dtype):
        model = LoRALLaMA(config, LoRAConfig(r=8, alpha=16, dropout=0.05))
    mark_only_lora_as_trainable(model)
    keep_trainable_in_fp32(model)
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
    arms = {}
    for name in ARMS:
        copy_ = copy.deepcopy(model, memo=dict(frozen)).train()  # the frozen base is shared
        batches = make_batches(samples, micro_batch_size, max_seq_length, warmup_steps + steps,
                               grouped=name == "grouped", packed=name == "packed")
        arms[name] = Arm(copy_, lambda x, y, p, m=copy_: compute_loss(m, x, y, positions=p), batches)

    for i in range(warmup_steps + steps):
        for arm in arms.values():
            input_ids, labels, _, positions = to_device(arm.batches[i], dev)
            torch.manual_seed(i)
            t0 = sync_time(dev)
            arm.step(input_ids, labels, positions)
            if i >= warmup_steps:
                arm.times.append(sync_time(dev) - t0)
    rate = {name: real_tokens(arm.timed(warmup_steps)) / sum(arm.times) for name, arm in arms.items()}
    memory = {}
    for name, arm in arms.items():  # after the timing: on a CPU the tracking slows a step
        input_ids, labels, _, positions = to_device(max(arm.timed(warmup_steps), key=lambda b: b[0].numel()), dev)
        memory[name] = step_peak_memory(lambda: arm.step(input_ids, labels, positions), dev)
    padded = {name: padded_fraction(arm.timed(warmup_steps)) for name, arm in arms.items()}

    shape = model_size or "4x512 (32k vocab)"
    print(f"model {shape}, {precision}, micro batch {micro_batch_size}, {max_seq_length} tokens, {source}, "
          f"{steps} timed steps")
    for name, arm in arms.items():
        print(f"  {name:8s} {rate[name]:8.0f} tokens/s  (median step {statistics.median(arm.times):.3f} s)  "
              f"step peak {memory[name]:.3f} GB  padded {padded[name]:.1%}")
    print(f"  packed / grouped {rate['packed'] / rate['grouped']:.2f}x, packed / padded "
          f"{rate['packed'] / rate['padded']:.2f}x")
    machine = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    add_rows(results_file, RESULTS_HEADER, [
        f"| {date.today()} | {machine} | {shape} | {precision} | {micro_batch_size} | {max_seq_length} | "
        f"{data} | {steps} | {' / '.join(f'{rate[n]:.0f}' for n in ARMS)} | "
        f"{rate['packed'] / rate['grouped']:.2f}x | {' / '.join(f'{memory[n]:.3f}' for n in ARMS)} GB | "
        f"{' / '.join(f'{padded[n]:.1%}' for n in ARMS)} |"
    ])
    return rate


if __name__ == "__main__":
    run_cli(main)
