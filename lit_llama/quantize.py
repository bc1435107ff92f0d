"""Quantized weights: QLoRA's 4-bit NormalFloat (NF4) base under LoRA or adapter training, and int8 / int4
weight-only generation.

QLoRA (Dettmers et al., 2023) stores each frozen weight of the transformer blocks in 4 bits: blocks of 64
values share one scale, each value is the nearest of 16 levels spaced as quantiles of a normal distribution,
and the scales themselves are quantized to 8 bits ("double quantization"): about 0.52 bytes per weight
instead of 2 in bf16. In the forward pass each weight is dequantized to the input's dtype for its matmul;
the trainable LoRA / adapter weights stay float32, and gradients flow through the dequantized weights.

The NF4 tensor is torchao's (`NF4Tensor`, the implementation torchtune uses), which runs on CPUs as well as
GPUs. Only the linear layers inside the transformer blocks are quantized; the embedding, the norms and the
output layer keep their precision. The model file does not change: `F.linear` dispatches on the tensor.

Under FSDP2 (several processes, lit_llama/distributed.py) the NF4 weights are sharded like any other: torchao's
NF4Tensor splits its codes and scales by rows (`torch.chunk`), and each block's all-gather before it runs
rebuilds exactly the tensor quantized on one device, so sharding changes where the bytes live, never the
numbers. Each process's share of rows must hold whole groups of scales: `scaler_block_size` picks the group
size for that (QLoRA's 256 for every LLaMA shape).
"""

import logging
from typing import Any, Optional

import torch
import torch.nn as nn

from lit_llama.args import RunArgs
from lit_llama.cli import UserError
from lit_llama.distributed import uses_fsdp
from lit_llama.model import Config, LLaMA

QUANTIZE_MODES = ("nf4",)  # finetune/lora.py, finetune/adapter.py --quantize
GENERATE_QUANTIZE_MODES = ("int8", "int4")  # generate.py, generate/*.py --quantize
NF4_BLOCK_SIZE = 64  # values sharing one scale (QLoRA's)
NF4_SCALER_BLOCK_SIZE = 256  # scales sharing one second-level scale (QLoRA's)
FSDP_GROUPS = 8  # see scaler_block_size


def check_quantize(quantize: Any, run: Optional[RunArgs] = None, config: Optional[Config] = None) -> None:
    """--quantize against the run's flags and, when the run shards its weights (FSDP), against the shapes of the
    model's frozen block weights, before any work."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_MODES:
        raise UserError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZE_MODES)}")
    if run is not None and run.strategy == "ddp":
        raise UserError(f"--quantize {quantize} does not work with --strategy ddp (DDP copies whole weights, which an "
                        "NF4 tensor is not): use --strategy fsdp, the default over several devices")
    if run is not None and run.cpu_offload:
        raise UserError(f"--quantize {quantize} does not work with --cpu_offload: the NF4 base is small enough to "
                        "stay on the devices")
    _to_nf4()  # torchao is there (or one line saying how to get it)
    if run is not None and config is not None and uses_fsdp(run):
        with torch.device("meta"):
            model = LLaMA(config)  # the shapes only; LoRA and adapter models have the same linears
        for layer in model.transformer.h.modules():
            if isinstance(layer, nn.Linear):
                scaler_block_size(layer.weight, shards=run.devices * run.num_nodes)


def quantize_frozen_linears(model: nn.Module, device: torch.device, fsdp_shards: Optional[int] = None) -> None:
    """Replaces the frozen weight of every nn.Linear inside the transformer blocks by its NF4 form, quantized on
    `device` one layer at a time (so the device never holds more than one full-precision layer). On one device
    the whole model then moves there. Under FSDP over `fsdp_shards` processes the NF4 weights go back to CPU
    memory instead: FSDP's fully_shard moves each process's rows to its device, so no GPU ever holds the whole
    NF4 base. Call it on a model loaded into CPU memory, after marking what trains."""
    to_nf4 = _to_nf4()
    for block in model.transformer.h:
        for layer in block.modules():
            if isinstance(layer, nn.Linear) and not layer.weight.requires_grad:
                weight = layer.weight.detach().to(device)
                nf4 = to_nf4(weight, NF4_BLOCK_SIZE, scaler_block_size(weight, fsdp_shards or 1))
                layer.weight = nn.Parameter(nf4 if fsdp_shards is None else nf4.to("cpu"), requires_grad=False)
    if fsdp_shards is None:
        model.to(device)


def scaler_block_size(weight: torch.Tensor, shards: int = 1) -> int:
    """QLoRA's 256 scales per second-level scale, or for shapes it does not divide (small test models) the
    largest divisor of the number of blocks below it, preferring one that leaves a multiple of 8 groups: then
    up to 8 FSDP processes split every weight into whole groups. The choice never depends on `shards`, so a
    sharded run quantizes exactly as a one-device run; `shards` is only checked."""
    if weight.numel() % NF4_BLOCK_SIZE:
        raise UserError(f"a weight of shape {tuple(weight.shape)} cannot be stored in NF4: its size is not a "
                        f"multiple of {NF4_BLOCK_SIZE}")
    blocks = weight.numel() // NF4_BLOCK_SIZE
    divisors = [d for d in range(1, NF4_SCALER_BLOCK_SIZE + 1) if blocks % d == 0]
    size = max([d for d in divisors if (blocks // d) % FSDP_GROUPS == 0] or divisors)
    if (blocks // size) % shards or weight.shape[0] % shards:
        raise UserError(f"a weight of shape {tuple(weight.shape)} cannot be sharded in NF4 over {shards} processes: "
                        f"its rows and its {blocks // size} groups of {size * NF4_BLOCK_SIZE} values must split "
                        "evenly; use fewer --devices")
    return size


def frozen_weight_bytes(model: nn.Module) -> float:
    """Bytes per frozen weight value of the quantized layers' storage (4-bit codes plus their scales)."""
    values = stored = 0
    for param in model.parameters():
        if type(param).__name__ == "NF4Tensor":
            values += param.numel()
            inner = (param.quantized_data, param.quantized_scalers, param.quantization_factor, param.scaler_mean,
                     param.nf4)
            stored += sum(t.numel() * t.element_size() for t in inner)
    return stored / max(values, 1)


def _to_nf4():
    # importing torchao logs warnings about its optional GPU kernels and torch.compile registrations, which
    # read like errors but concern nothing used here
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        except ImportError:  # torchao before 0.18
            from torchao.dtypes.nf4tensor import to_nf4
    except ImportError:
        raise UserError("--quantize nf4 needs torchao: pip install torchao")
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return to_nf4


def check_generate_quantize(quantize: Any) -> None:
    """--quantize of the generate scripts, checked before any weights load."""
    if quantize is None:
        return
    if quantize not in GENERATE_QUANTIZE_MODES:
        raise UserError(f"--quantize {quantize!r} is not one of {', '.join(GENERATE_QUANTIZE_MODES)}")
    if quantize == "int4" and not torch.cuda.is_available():
        raise UserError("--quantize int4 needs a CUDA GPU (torchao's int4 kernels); on this machine use int8")
    _to_nf4()  # torchao is there (or one line saying how to get it)


def quantize_for_generation(model: nn.Module, quantize: str) -> None:
    """Weight-only quantization of every nn.Linear for generation (LoRA merged into the weights first): int8,
    one scale per output row (CPU and GPU), or int4 in groups of 128 (CUDA). Activations stay in the model's
    dtype; each matmul reads the small weights and dequantizes them on the fly, which is what decoding is
    bound by: bytes of weights read per token."""
    _to_nf4()  # torchao, imported quietly
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    # compiling torchao's tensors logs a deprecation notice about how torchao registers an enum with torch, which
    # reads like an error in generate.py's output and concerns nothing the user can change
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # int4: torch's own tinygemm kernel (_weight_int4pack_mm). torchao's default int4 layout needs its separate mslk
    # kernel package (torchao 0.18: "Requires mslk >= 1.0.0"), which a plain install doesn't bring
    config = (Int8WeightOnlyConfig() if quantize == "int8"
              else Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    with torch.no_grad():
        quantize_(model, config)
