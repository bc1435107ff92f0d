"""How long each stage of the GPU suite (benchmarks/gpu_suite.py) will take, before it starts: arithmetic on
the stage's work (matmul FLOPs, bytes of weights moved, kernel launches) and two figures of the machine, its
matmul rate and its memory bandwidth, measured at the suite's start in a second or two. `--budget_s` skips
a stage whose estimate does not fit the time left; `--dry_run` prints the plan only, also for a machine
described by figures (`--assume_matmul_tflops`, `--assume_bandwidth_tbps`) instead of the one here.

The estimates are rough on purpose (about 2x either way is expected) and err long: a stage skipped for lack of
time costs less than a slot that ends in the middle of one. What cannot be derived from FLOPs or bytes (the
Python work of building a model, compiling) is a fixed number of seconds below, each one stated.
"""

import time
from dataclasses import dataclass
from typing import Dict

import torch

from lit_llama.model import Config, LLaMA

# --- what arithmetic cannot give: assumptions, in seconds or shares, each stated once ---------------------------
TRAIN_SHARE = 0.35  # share of the matmul rate a LoRA step reaches at micro batch 4 (norms, RoPE, softmax, AdamW
#                     and the loss run at bandwidth, not matmul speed; the CPU reaches ~0.74, GPUs less)
BANDWIDTH_SHARE = 0.7  # share of the measured copy bandwidth an eager decode step reaches (small kernels)
LAUNCH_S = 25e-6  # one eager CUDA kernel launch, with PyTorch's dispatch around it (10 us was assumed; 7B eager
#                  decoding on an H200 ran at 25-45 tokens/s, 20-40 us per launch on that machine's host)
KERNELS_PER_LAYER = 30  # kernels of one transformer block in an eager decode step (LoRA unmerged: +12)
BUILD_S = 4.0  # Python work of building one model (module objects, random init calls), beyond its bytes
INIT_PASSES = 4  # random init writes each weight about this many times (init in float32 work, cast, copy)
NF4_BYTES_PER_VALUE = 12  # dequantizing one NF4 weight value for a matmul: codes, scales, lookup, bf16 out, read
NF4_QUANTIZE_BYTES_PER_VALUE = 200  # torchao's to_nf4: distances to the 16 levels, argmin, packing (unfused)
COMPILE_S = 120.0  # torch.compile of one 7B training step (graph capture, Inductor, autotuning off): first-step
#                   cost (the peft stage's compile lever took 90.7 s on an H200)
DECODE_COMPILE_S = 40.0  # compiling one 7B decode step (ours with the prefill eager: 31.9 s on an H200;
#                          transformers' static cache + compile: 19.3 s)
FABRIC_START_S = 30.0  # the fsdp stage's Fabric launch, process group and checkpoint round trip (its
#                        estimate without it was 24 s; it took 55-61 s on an H200)
STAGE_START_S = 5.0  # a stage's imports, allocator warm-up, synchronisations, the rows printed and written
SAFETY = 1.25  # every estimate is this much longer than its arithmetic: skipping is cheaper than overrunning


@dataclass(frozen=True)
class Machine:
    """The two figures the estimates need: matmul FLOP/s in the suite's dtype and memory bandwidth (bytes/s)."""

    name: str
    matmul_flops: float
    bandwidth: float

    def describe(self) -> str:
        giga = lambda x: f"{x / 1e9:,.0f}" if x >= 1e12 else f"{x / 1e9:.3g}"  # noqa: E731 - a CPU's figures are small
        return f"{self.name}: matmul {giga(self.matmul_flops)} GFLOP/s, bandwidth {giga(self.bandwidth)} GB/s"


# An H100-class GPU as the 6-minute claim of howto/gpu_suite.md assumes it: below an H100 PCIe's data sheet
# (756 TFLOP/s dense bf16, 2.0 TB/s) by what a plain torch.matmul and a tensor copy reach in practice.
H100_CLASS = Machine("H100-class (assumed)", matmul_flops=600e12, bandwidth=1.8e12)


def measure_machine(device: torch.device, dtype: torch.dtype, name: str) -> Machine:
    """torch.matmul FLOP/s on square matrices and the bandwidth of a large copy, on `device` (1-2 s on a GPU;
    smaller sizes on a CPU). The peers' share-of-peak column measures the matmul rate the same way."""
    n, copy_bytes = (8192, 2 ** 30) if device.type == "cuda" else (256, 2 ** 23)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_s = _best_time(lambda: a @ b, device)
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_s = _best_time(lambda: dst.copy_(src), device)
    return Machine(name, 2 * n ** 3 / matmul_s, 2 * copy_bytes / copy_s)  # a copy reads and writes every byte


def _best_time(fn, device: torch.device, repeats: int = 5) -> float:
    fn()  # warm-up: kernels chosen, memory allocated
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass(frozen=True)
class Shape:
    """What the estimates read from a model size: matmul weights, all weights, layers, width."""

    matmul_params: int  # the nn.Linear weights of the blocks and the output layer: 2 FLOPs each per token
    params: int
    n_layer: int
    n_embd: int

    @classmethod
    def of(cls, size: str) -> "Shape":
        config = Config.from_name(size)
        with torch.device("meta"):
            model = LLaMA(config)
        matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        return cls(matmul, sum(p.numel() for p in model.parameters()), config.n_layer, config.n_embd)

    def lora_step_flops_per_token(self, seq_length: int, checkpointing: bool = False) -> float:
        """A LoRA (or adapter) training step, frozen base: forward 2 FLOPs per matmul weight, backward 2 more
        for the input gradients (no weight gradients), the LoRA matmuls negligible; attention (QK^T and AV,
        2 * 2 * T * d per token and layer, counted without the causal half) forward once and backward twice;
        activation checkpointing runs the forward once more. The peers' shared FLOPs-per-token formula (issue 20
        point 4) replaces this one when it lands: the estimates need only its value."""
        forward = 2 * self.matmul_params + 4 * seq_length * self.n_embd * self.n_layer
        backward = 2 * self.matmul_params + 8 * seq_length * self.n_embd * self.n_layer
        return forward * (2 if checkpointing else 1) + backward

    def full_step_flops_per_token(self, seq_length: int) -> float:
        """Full finetuning: the weight gradients too (2 FLOPs per weight more in backward)."""
        return self.lora_step_flops_per_token(seq_length) + 2 * self.matmul_params


class Estimator:
    """Seconds for the pieces stages are made of, on one machine, for weights of `bytes_per_weight` bytes."""

    def __init__(self, machine: Machine, bytes_per_weight: int = 2) -> None:
        self.machine, self.bytes_per_weight = machine, bytes_per_weight

    def build(self, shape: Shape) -> float:
        """Building a model of random weights on the device."""
        return BUILD_S + INIT_PASSES * shape.params * self.bytes_per_weight / self.machine.bandwidth

    def train_steps(self, shape: Shape, tokens: int, seq_length: int, checkpointing: bool = False,
                    full: bool = False, nf4: bool = False) -> float:
        flops_per_token = (shape.full_step_flops_per_token(seq_length) if full
                           else shape.lora_step_flops_per_token(seq_length, checkpointing))
        seconds = tokens * flops_per_token / (self.machine.matmul_flops * TRAIN_SHARE)
        if nf4:  # each weight dequantized for the forward and again for the backward matmul, every step
            steps = tokens / (4 * seq_length)
            seconds += steps * 2 * shape.matmul_params * NF4_BYTES_PER_VALUE / self.machine.bandwidth
        return seconds

    def quantize_nf4(self, shape: Shape) -> float:
        return shape.matmul_params * NF4_QUANTIZE_BYTES_PER_VALUE / self.machine.bandwidth

    def decode(self, shape: Shape, tokens: int, bytes_per_weight: float = 2, lora_unmerged: bool = False) -> float:
        """Eager batch-1 decoding: every token reads every weight once, and launches each block's kernels."""
        read = shape.params * bytes_per_weight / (self.machine.bandwidth * BANDWIDTH_SHARE)
        kernels = shape.n_layer * (KERNELS_PER_LAYER + (12 if lora_unmerged else 0))
        return tokens * (read + kernels * LAUNCH_S)


def stage_estimates(suite, machine: Machine) -> Dict[str, float]:
    """Seconds per stage of `suite` (a gpu_suite.Suite: its sizes, lengths, steps and token counts), each with
    STAGE_START_S and SAFETY. Keep in step with the stages' code: each line below mirrors one stage."""
    est = Estimator(machine)
    big, small = Shape.of(suite.size_7b), Shape.of(suite.size_1b)
    mb, lengths, steps = suite.micro_batch_size, suite.lengths, suite.train_steps + 1  # + the untimed first step
    lora_steps = lambda checkpointing, nf4=False: sum(  # noqa: E731 - one line per stage below
        est.train_steps(big, mb * n * steps, n, checkpointing, nf4=nf4) for n in lengths)
    peft_tokens = mb * lengths[0] * (suite.peft_steps + suite.peft_warmup)
    generate_tokens = 4 + 3 * suite.new_tokens  # warm-up, then three timed runs
    seconds = {
        # with and without activation checkpointing, each its own model
        "lora": 2 * est.build(big) + lora_steps(False) + lora_steps(True),
        "qlora": est.build(big) + est.quantize_nf4(big) + lora_steps(False, nf4=True),
        # base, then LoRA unmerged and merged (a second model, then merged in place)
        "generate": 2 * est.build(big) + est.decode(big, generate_tokens)
        + est.decode(big, generate_tokens, lora_unmerged=True) + est.decode(big, generate_tokens),
        # ours, PEFT's (transformers' model), and each lever: compile, chunked cross-entropy, grouped batches
        "peft": 2 * est.build(big) + COMPILE_S + 5 * est.train_steps(big, peft_tokens, lengths[0]),
        # at each length: ours and PEFT's, then three arms stepping in turn: plain, grouped, packed (and PEFT)
        "packing": sum(2 * est.build(big) + 4 * est.train_steps(
            big, mb * n * (suite.packing_steps + suite.packing_warmup), n) for n in lengths),
        "adapter": 2 * (est.build(big) + est.train_steps(big, mb * lengths[0] * steps, lengths[0])),
        # write, load and shard a random 1.1B checkpoint (float32 AdamW states), then 40 iterations
        "fsdp": FABRIC_START_S + 3 * est.build(small) + est.train_steps(small, suite.fsdp_tokens, lengths[1], full=True),
        # bf16, int8 and int4: a perplexity pass over the text and decoding each
        "quantized": 3 * est.build(big) + 3 * est.decode(big, suite.text_tokens)
        + est.decode(big, suite.text_tokens, 1) + est.decode(big, suite.text_tokens, 0.5),
        # ours eager, compiled, int8 and int4 eager and compiled, transformers eager and static + compile: 4
        # compiles, repeats of each decode
        "decode": 3 * est.build(big) + (0 if suite.smoke else 4 * DECODE_COMPILE_S)
        + suite.decode_repeats * 8 * est.decode(big, suite.decode_tokens),
    }
    return {stage: SAFETY * (STAGE_START_S + s) for stage, s in seconds.items()}
