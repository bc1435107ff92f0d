"""Peak memory and speed of a finetuning step at a given model size: does 7B fit a 24 GB GPU?

    python benchmarks/finetune_memory.py --model_size 7B --device cuda --precision bf16-true
    python benchmarks/finetune_memory.py --model_size tiny                                     # CPU smoke run

Builds a randomly initialised model of the named size directly on the device (no checkpoint needed; random
weights cost the same memory and time as real ones), sets it up the way the finetune scripts do (frozen
weights in the precision's dtype, trainable LoRA / adapter weights in float32, AdamW), and times
forward + backward + optimizer steps at micro batch 4 for each sequence length. Every position is scored
(the worst case: with --mask_inputs the output layer sees only the response). Appends the rows to
benchmarks/RESULTS.md with the device's name.
"""

import platform
import statistics
import sys
from datetime import date
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows, matmul_peak_flops, sync_time, training_flops
from lit_llama.adapter import AdapterConfig, AdapterLLaMA, mark_only_adapter_as_trainable
from lit_llama.lora import LoRAConfig, LoRALLaMA, mark_only_lora_as_trainable
from lit_llama.model import Config
from lit_llama.quantize import check_quantize, frozen_weight_bytes, quantize_frozen_linears
from lit_llama.checkpoint import default_dtype, num_parameters
from lit_llama.cli import UserError, run_cli
from lit_llama.distributed import precision_dtype
from lit_llama.finetune import keep_trainable_in_fp32
from lit_llama.training import compute_loss

RESULTS_HEADER = """
## Finetuning step: peak memory and speed

`python benchmarks/finetune_memory.py`: random weights of the named size, frozen weights in the precision's
dtype, trainable weights in float32, AdamW; every position of every sequence scored (worst case). Share of
peak: the step's FLOPs (benchmarks/common.py `training_flops`) per second over `torch.matmul`'s FLOP/s on large
square matrices of the frozen weights' dtype, timed in the same run.

| date | device | model | method | precision | micro batch | seq length | peak memory | tokens/s | trainable params | share of peak |
|---|---|---|---|---|---|---|---|---|---|---|
"""


def main(
    model_size: str = "7B",
    method: str = "lora",
    device: str = "cuda",
    precision: str = "bf16-true",
    micro_batch_size: int = 4,
    seq_lengths: List[int] = [256, 512],
    steps: int = 5,
    estimate: bool = False,
    activation_checkpointing: bool = False,
    quantize: Optional[str] = None,
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> None:
    """Measures finetuning steps of one method at one model size.

    Args:
        model_size: A named size from lit_llama/model.py (7B, Llama-2-7b, tiny, ...).
        method: lora (the article's r 8 on query and value), adapter (v1) or adapter_v2.
        device: cuda or cpu.
        precision: bf16-true, 16-true or 32-true.
        micro_batch_size: Sequences per step.
        seq_lengths: Sequence lengths to measure, each a separate row.
        steps: Timed steps per length (after one untimed step).
        estimate: Without the GPU: measure the bytes the forward pass keeps for backward in a 1- and a 2-layer
            model of the same width on this device, extrapolate to all layers, and add the weights and the
            optimizer state. A lower bound of the GPU peak (no allocator slack or transient buffers).
        activation_checkpointing: As finetune/lora.py --activation_checkpointing.
        quantize: nf4: the frozen block weights in NF4, as finetune/lora.py --quantize nf4 (QLoRA).
        results_file: Markdown file to append the rows to (none: print only).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU here (use --device cpu with a small --model_size)")
    dev, dtype = torch.device(device), precision_dtype(precision)
    config = Config.from_name(model_size)
    check_quantize(quantize)
    if estimate:
        return estimate_memory(config, model_size, method, dev, dtype, precision, micro_batch_size, seq_lengths,
                               activation_checkpointing, results_file, quantize)
    model = build(config, method, dev, dtype)
    if quantize:
        quantize_frozen_linears(model, dev)
        print(f"frozen block weights in {quantize}: {frozen_weight_bytes(model):.4f} bytes per weight")
    model.activation_checkpointing = activation_checkpointing
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    trainable = num_parameters(model, requires_grad=True)
    name = device_name(dev)
    peak_flops = matmul_peak_flops(dev, dtype)

    rows = []
    for length in seq_lengths:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for step in range(steps + 1):
            input_ids = torch.randint(0, config.vocab_size, (micro_batch_size, length), device=dev)
            t0 = sync_time(dev)
            loss = compute_loss(model, input_ids, input_ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:  # the first step allocates the optimizer state and warms up kernels
                times.append(sync_time(dev) - t0)
        peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else float("nan")
        rate = micro_batch_size * length / statistics.median(times)
        # frozen base: 4 N T + 6 per trained weight (for the adapters an approximation: their prefix attention
        # is left out); activation checkpointing's recomputed forward is not counted (not useful work)
        share = training_flops(config, [length], trainable) * rate / length / peak_flops
        rows.append(row(model_size, method + (f" + {quantize}" if quantize else ""), precision, micro_batch_size,
                        length, activation_checkpointing, name, f"{peak:.2f} GB", f"{rate:.0f}", trainable,
                        f"{share:.0%} of {peak_flops / 1e9:.1f} GFLOP/s"))
        print(rows[-1])
    write_rows(rows, results_file)


def build(
    config: Config, method: str, dev: torch.device, dtype: torch.dtype, adapter_start_layer: int = 2
) -> torch.nn.Module:
    """The model as the finetune script sets it up: frozen weights in `dtype`, trainable ones in float32."""
    with dev, default_dtype(dtype):
        if method == "lora":
            model = LoRALLaMA(config, LoRAConfig(r=8, alpha=16, dropout=0.05))
            mark_only_lora_as_trainable(model)
        elif method in ("adapter", "adapter_v2"):
            start = min(adapter_start_layer, config.n_layer - 1)
            version = 2 if method == "adapter_v2" else 1
            model = AdapterLLaMA(AdapterConfig.from_config(config, adapter_version=version, adapter_start_layer=start))
            mark_only_adapter_as_trainable(model)
        else:
            raise UserError(f"--method {method!r} is not one of lora, adapter, adapter_v2")
    keep_trainable_in_fp32(model)
    return model


def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes the forward pass keeps for the backward pass, weights excluded, each storage counted once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute_loss(model, input_ids, input_ids)
    return sum(storages.values())


def estimate_memory(config, model_size, method, dev, dtype, precision, micro_batch_size, seq_lengths,
                    activation_checkpointing, results_file, quantize=None) -> None:
    with torch.device("meta"):
        full = build(config, method, torch.device("meta"), dtype)
    trainable = num_parameters(full, requires_grad=True)
    frozen_bytes = (num_parameters(full) - trainable) * dtype.itemsize
    if quantize:  # the blocks' linear weights at the bytes per weight measured on one real block
        one_block = build(replace(config, n_layer=1), method, dev, dtype)
        quantize_frozen_linears(one_block, dev)
        bytes_per_weight = frozen_weight_bytes(one_block)
        linear = sum(m.weight.numel() for m in full.transformer.h.modules()
                     if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)
        frozen_bytes -= linear * (dtype.itemsize - bytes_per_weight)
        del one_block
    optimizer_bytes = trainable * 16  # float32 weight, gradient and two AdamW moments
    rows = []
    for length in seq_lengths:
        input_ids = torch.randint(0, config.vocab_size, (micro_batch_size, length), device=dev)
        saved = []
        for n_layer in (1, 2):
            torch.manual_seed(0)
            # every layer adapted in the small models: a slight overestimate for the adapters
            model = build(replace(config, n_layer=n_layer), method, dev, dtype, adapter_start_layer=0).train()
            saved.append(saved_activation_bytes(model, input_ids))
            del model
        per_layer = saved[1] - saved[0]
        if activation_checkpointing:  # every block keeps only its input; one block at a time is recomputed
            block_input = micro_batch_size * length * config.n_embd * dtype.itemsize
            activations = saved[0] + (config.n_layer - 1) * block_input
        else:
            activations = saved[0] + (config.n_layer - 1) * per_layer
        total = frozen_bytes + optimizer_bytes + activations
        note = (f"estimate: {frozen_bytes / 1e9:.1f} weights + {optimizer_bytes / 1e9:.2f} trainable/AdamW + "
                f"{activations / 1e9:.1f} activations ({per_layer / 1e6:.0f} MB/layer)")
        if quantize:
            note += f"; frozen block weights in {quantize}: {bytes_per_weight:.3f} bytes/weight, measured on one block"
        rows.append(row(model_size, method + (f" + {quantize}" if quantize else ""), precision, micro_batch_size,
                        length, activation_checkpointing, f"{device_name(dev)}, {note}", f">= {total / 1e9:.1f} GB",
                        "-", trainable))
        print(rows[-1])
    write_rows(rows, results_file)


def row(model_size, method, precision, micro_batch_size, length, checkpointing, name, peak, rate, trainable,
        share: str = "-") -> str:
    method = method + (" + act. ckpt" if checkpointing else "")
    return (f"| {date.today()} | {name} | {model_size} | {method} | {precision} | {micro_batch_size} | {length} | "
            f"{peak} | {rate} | {trainable:,} | {share} |")


def write_rows(rows: List[str], results_file: Optional[Path]) -> None:
    if results_file:
        add_rows(results_file, RESULTS_HEADER, rows)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"



if __name__ == "__main__":
    run_cli(main)
