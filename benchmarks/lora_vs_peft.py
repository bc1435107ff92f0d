"""LoRA finetuning speed: our training step vs Hugging Face PEFT LoRA on the same model, same batches; and
the training speed levers, each against the same PEFT baseline in the same run.

    python benchmarks/lora_vs_peft.py                       # CPU, a small LLaMA shape
    python benchmarks/lora_vs_peft.py --levers true --steps 24      # and each lever, one at a time
    python benchmarks/lora_vs_peft.py --model_size 7B --device cuda --precision bf16-true --steps 10

Both sides get identical weights (ours converted to `LlamaForCausalLM` with lit_llama.convert), the same
LoRA settings (r 8, alpha 16, dropout 0.05 on query and value), the same AdamW, and the same micro-batches
of real Alpaca records tokenized with the real LLaMA tokenizer when ../shared has them (else random tokens
of Alpaca-like lengths), drawn by the finetune loop's sampler (lit_llama.training.batch_indices). Our side
runs the code finetune/lora.py runs (LoRALLaMA, pad_batch, compute_loss). The sides alternate step by step
so all see the same machine load. Reports tokens/s (real, unpadded tokens), step-0 losses (they must agree:
same model) and peak memory, and appends a row to benchmarks/RESULTS.md.

Levers (--compile, --chunked_ce, --group_by_length, --packing, or --levers for all four): each is one more copy
of our model, with the lever on and nothing else changed, stepping in turn with the others:
  compile          the blocks compiled as finetune/lora.py --compile does (lit_llama.finetune.compile_blocks; the
                   time of its first steps, beyond the plain model's, is reported apart and left out of tokens/s)
  chunked_ce       the loss through the output layer 256 positions at a time (compute_loss(chunked_ce=True))
  group_by_length  micro-batches of examples of similar length (batch_indices with the examples' lengths)
  packing          each plain micro-batch's examples packed into one row without padding (pack_batch, as the
                   finetune scripts' --packing does without --compile)
Each lever's row has its tokens/s against our plain model's and PEFT's, the step's peak memory and the
fraction of padded positions.
"""

import copy
import platform
import statistics
import sys
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows, hf_llama, matmul_peak_flops, step_peak_memory, sync_time, training_flops
from lit_llama.data import prepare_sample
from lit_llama.lora import LoRAConfig, LoRALLaMA, mark_only_lora_as_trainable
from lit_llama.model import Config
from lit_llama.tokenizer import Tokenizer
from lit_llama.checkpoint import default_dtype
from lit_llama.cli import UserError, run_cli
from lit_llama.distributed import peak_memory_gb, precision_dtype
from lit_llama.finetune import compile_blocks, keep_trainable_in_fp32
from lit_llama.training import batch_indices, compute_loss, pack_batch, pad_batch

RESULTS_HEADER = """
## LoRA finetuning speed: lit-llama vs Hugging Face PEFT

`python benchmarks/lora_vs_peft.py`: training steps (forward, backward, AdamW) alternating between the two
implementations on identical weights and batches; LoRA r 8, alpha 16, dropout 0.05 on query and value.
Tokens are real (unpadded) tokens. Both step-0 losses must agree: same model, same batch. Share of peak: the
timed steps' FLOPs (benchmarks/common.py `training_flops`, the same count for both) per second over
`torch.matmul`'s FLOP/s on large square matrices of the weights' dtype, timed in the same run.

| date | machine | model | precision | micro batch | data | lit-llama tokens/s | PEFT tokens/s | ratio | step-0 loss (ours / PEFT) | share of peak (ours / PEFT) |
|---|---|---|---|---|---|---|---|---|---|---|
"""

LEVERS_HEADER = """
## Training speed levers, one at a time

`python benchmarks/lora_vs_peft.py --levers true`: our LoRA training step (as above) with one lever on,
stepping in turn with our plain step and PEFT's on the same machine load; "plain" is our step without the
lever. Tokens/s counts real (unpadded) tokens over the timed steps. Step peak: the most memory one training
step (forward, backward, AdamW) takes above what it starts with (weights, AdamW states), on the batch with
the most positions (its longest micro-batch): on a GPU from the CUDA allocator, on a CPU the bytes of the tensors the step
creates that are alive together (benchmarks/common.py PeakTensorMemory; not measurable inside a compiled
graph: "-"). Padded: padded positions / all positions of the timed batches. Compile: the compiled model's
first (untimed) steps minus the plain model's. Step-0 loss: plain / with the lever, equal unless the lever
changes the batches (group_by_length; packing keeps them). Share of peak: as in the table above.

| date | machine | model | precision | micro batch | data | steps | lever | tokens/s plain -> lever | speedup | PEFT tokens/s | lever / PEFT | step peak plain -> lever | padded plain -> lever | compile | step-0 loss plain / lever | share of peak plain -> lever |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""

LEVERS = ("compile", "chunked_ce", "group_by_length", "packing")

# a LLaMA shape small enough for a CPU: 4 layers of width 512, the real 32k vocabulary
SMALL = dict(n_layer=4, n_head=8, n_embd=512, intermediate_size=1376, vocab_size=32000, block_size=512)

Batch = Tuple[torch.Tensor, torch.Tensor, List[int], Optional[torch.Tensor]]  # ids, labels, real lengths, positions


@dataclass
class Arm:
    """One side of the comparison: a model, its optimizer, its loss and the batches it trains on."""

    model: torch.nn.Module
    loss: Callable[..., torch.Tensor]  # (input_ids, labels, positions) -> loss
    batches: List[Batch]
    optimizer: Optional[torch.optim.Optimizer] = None  # AdamW over its trainable weights, built below
    times: List[float] = field(default_factory=list)  # timed steps
    warmup_seconds: float = 0.0
    first_loss: Optional[float] = None

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=3e-4)

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
        loss = self.loss(input_ids, labels, positions)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def timed(self, warmup_steps: int) -> List[Batch]:
        return self.batches[warmup_steps:]


def main(
    model_size: Optional[str] = None,
    micro_batch_size: int = 4,
    max_seq_length: int = 256,
    steps: int = 6,
    warmup_steps: int = 2,
    device: str = "cpu",
    precision: str = "32-true",
    data: str = "alpaca",
    data_file: Path = SHARED / "data" / "alpaca_sample.json",
    tokenizer_path: Path = SHARED / "tokenizers" / "llama" / "tokenizer.model",
    compile: bool = False,
    chunked_ce: bool = False,
    group_by_length: bool = False,
    packing: bool = False,
    levers: bool = False,
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> Dict[str, float]:
    """Times LoRA training steps of lit-llama and of PEFT side by side, and of our step with each lever asked
    for; returns the tokens/s of each.

    Args:
        model_size: A named size from lit_llama/model.py (e.g. 7B); default: a 4-layer, 512-wide LLaMA.
        micro_batch_size: Examples per step.
        max_seq_length: Examples are cut to this many tokens (the article prepares Alpaca at 256).
        steps: Timed steps per implementation (with --group_by_length, enough to cover the data once compares
            the same examples: 24 for the 102-record sample at micro batch 4).
        warmup_steps: Untimed steps first.
        device: cpu or cuda.
        precision: 32-true, or bf16-true (frozen weights in bf16; our LoRA weights stay float32).
        data: alpaca (real records, loss on the response only, as finetune/lora.py trains by default) or
            random (random tokens, loss on every position: no prompt positions for us to skip).
        data_file: With --data alpaca: Alpaca-format JSON records (default: ../shared's sample, beside the repo).
        tokenizer_path: With --data alpaca: the LLaMA tokenizer (32,000 pieces; default: ../shared's).
        compile: Also time our step with torch.compile of the model.
        chunked_ce: Also time our step with the cross-entropy computed 256 positions at a time.
        group_by_length: Also time our step on micro-batches of examples of similar length.
        packing: Also time our step on the same micro-batches packed into rows of --max_seq_length.
        levers: All four levers, each on its own.
        results_file: Markdown file to append the result rows to (none: print only).
    """
    try:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model
        import transformers  # noqa: F401
    except ImportError as e:
        raise UserError(f"this benchmark compares against Hugging Face PEFT: pip install transformers peft ({e})")
    for flag, value in (("steps", steps), ("micro_batch_size", micro_batch_size)):
        if value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if warmup_steps < 1:  # the first step allocates AdamW's states (and compiles): never timed
        raise UserError(f"--warmup_steps must be at least 1, got {warmup_steps}")
    chosen = [name for name, on in zip(LEVERS, (compile, chunked_ce, group_by_length, packing)) if on or levers]

    torch.manual_seed(0)
    dev, dtype = torch.device(device), precision_dtype(precision)
    try:
        config = Config.from_name(model_size) if model_size else Config(**SMALL)
    except ValueError as e:
        raise UserError(f"--model_size: {e}")
    lora = LoRAConfig(r=8, alpha=16, dropout=0.05)
    samples, source = make_samples(config, micro_batch_size * (warmup_steps + steps), max_seq_length, data,
                                   data_file, tokenizer_path)
    print(f"data: {source}")
    batches = make_batches(samples, micro_batch_size, max_seq_length, warmup_steps + steps)

    with dev, default_dtype(dtype):
        ours = LoRALLaMA(config, lora)
    mark_only_lora_as_trainable(ours)
    keep_trainable_in_fp32(ours)

    base = {k: v for k, v in ours.state_dict().items() if "lora_" not in k}
    hf = hf_llama(config, base, dev, dtype)
    theirs = get_peft_model(hf, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                               target_modules=["q_proj", "v_proj"], bias="none"))
    copy_lora_weights(ours, theirs, config)  # same starting point, so the losses can be compared

    arms = {
        "lit-llama": Arm(ours, lambda x, y, _: compute_loss(ours, x, y), batches),
        "peft": Arm(theirs, lambda x, y, _: theirs(input_ids=x, labels=y).loss, batches),
    }
    frozen = {id(p): p for p in ours.parameters() if not p.requires_grad}
    for lever in chosen:  # each a copy of our model as it starts, with this one lever on
        model = copy.deepcopy(ours, memo=dict(frozen))  # the frozen base is shared: only LoRA weights are copied
        if lever == "compile":
            compile_blocks(model)
            arms[lever] = Arm(model, lambda x, y, _, m=model: compute_loss(m, x, y), batches)
        elif lever == "chunked_ce":
            arms[lever] = Arm(model, lambda x, y, _, m=model: compute_loss(m, x, y, chunked_ce=True), batches)
        else:
            lever_batches = make_batches(samples, micro_batch_size, max_seq_length, warmup_steps + steps,
                                         grouped=lever == "group_by_length", packed=lever == "packing")
            arms[lever] = Arm(model, lambda x, y, p, m=model: compute_loss(m, x, y, positions=p), lever_batches)
    for arm in arms.values():
        arm.model.train()

    for i in range(warmup_steps + steps):
        for name, arm in arms.items():
            input_ids, labels, _, positions = to_device(arm.batches[i], dev)
            torch.manual_seed(i)  # same dropout masks are not possible across implementations; same seeds are
            t0 = sync_time(dev)
            loss = arm.step(input_ids, labels, positions)
            elapsed = sync_time(dev) - t0
            if arm.first_loss is None:
                arm.first_loss = loss.item()
            if i >= warmup_steps:
                arm.times.append(elapsed)
            else:
                arm.warmup_seconds += elapsed

    rate = {name: real_tokens(arm.timed(warmup_steps)) / sum(arm.times) for name, arm in arms.items()}
    peak_flops = matmul_peak_flops(dev, dtype)
    lora_params = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    share = {name: training_flops(config, [n for batch in arm.timed(warmup_steps) for n in batch[2]],
                                  lora_params) / sum(arm.times) / peak_flops for name, arm in arms.items()}
    shape = model_size or "4x512 (32k vocab)"
    print(f"model {shape}, {precision}, micro batch {micro_batch_size}, {source}, {steps} timed steps")
    for name, arm in arms.items():
        print(f"  {name:16s} {rate[name]:8.0f} tokens/s  (median step {statistics.median(arm.times):.3f} s, "
              f"step-0 loss {arm.first_loss:.4f})")
    print(f"  share of the matmul peak ({peak_flops / 1e9:.1f} GFLOP/s): "
          + ", ".join(f"{name} {value:.0%}" for name, value in share.items()))
    print(f"  ratio lit-llama / peft: {rate['lit-llama'] / rate['peft']:.2f}x; peak memory "
          f"{peak_memory_gb(dev):.2f} GB ({'GPU' if dev.type == 'cuda' else 'process RSS, all models'})")
    machine = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    add_rows(results_file, RESULTS_HEADER, [
        f"| {date.today()} | {machine} | {shape} | {precision} | {micro_batch_size} | {source} | "
        f"{rate['lit-llama']:.0f} | {rate['peft']:.0f} | {rate['lit-llama'] / rate['peft']:.2f}x | "
        f"{arms['lit-llama'].first_loss:.4f} / {arms['peft'].first_loss:.4f} | "
        f"{share['lit-llama']:.0%} / {share['peft']:.0%} of {peak_flops / 1e9:.1f} GFLOP/s |"
    ])
    if not chosen:
        return rate

    # memory, after the timing (on a CPU the tracking slows a step): one more step of each arm, on its batch
    # with the most positions
    memory: Dict[str, Optional[float]] = {}
    for name, arm in arms.items():
        if name == "compile" and dev.type != "cuda":
            memory[name] = None  # a compiled graph's buffers bypass the tracker
            continue
        input_ids, labels, _, positions = to_device(max(arm.timed(warmup_steps), key=lambda b: b[0].numel()), dev)
        memory[name] = step_peak_memory(lambda: arm.step(input_ids, labels, positions), dev)
    print(f"  step peak memory (GB): " + ", ".join(f"{n} {show_gb(m)}" for n, m in memory.items()))
    plain = arms["lit-llama"]
    rows = []
    for lever in chosen:
        arm = arms[lever]
        compile_seconds = f"{arm.warmup_seconds - plain.warmup_seconds:.1f} s" if lever == "compile" else "-"
        padded = f"{padded_fraction(plain.timed(warmup_steps)):.1%} -> {padded_fraction(arm.timed(warmup_steps)):.1%}"
        print(f"  {lever}: {rate[lever] / rate['lit-llama']:.2f}x our plain step, padded {padded}, "
              f"compile {compile_seconds}")
        rows.append(
            f"| {date.today()} | {machine} | {shape} | {precision} | {micro_batch_size} | {source} | {steps} | "
            f"{lever} | {rate['lit-llama']:.0f} -> {rate[lever]:.0f} | {rate[lever] / rate['lit-llama']:.2f}x | "
            f"{rate['peft']:.0f} | {rate[lever] / rate['peft']:.2f}x | "
            f"{show_gb(memory['lit-llama'])} -> {show_gb(memory[lever])} | {padded} | {compile_seconds} | "
            f"{plain.first_loss:.4f} / {arm.first_loss:.4f} | {share['lit-llama']:.0%} -> {share[lever]:.0%} |"
        )
    add_rows(results_file, LEVERS_HEADER, rows)
    return rate


def show_gb(gb: Optional[float]) -> str:
    return "-" if gb is None else f"{gb:.3f} GB"


def to_device(batch: Batch, dev: torch.device) -> Batch:
    input_ids, labels, lengths, positions = batch
    return input_ids.to(dev), labels.to(dev), lengths, None if positions is None else positions.to(dev)


def real_tokens(batches: List[Batch]) -> int:
    return sum(sum(batch[2]) for batch in batches)


def padded_fraction(batches: List[Batch]) -> float:
    return 1 - real_tokens(batches) / sum(batch[0].numel() for batch in batches)


def make_samples(
    config: Config, n: int, max_seq_length: int, data: str, data_file: Path, tokenizer_path: Path
) -> Tuple[List[dict], str]:
    """Real Alpaca records tokenized with the LLaMA tokenizer, or `n` examples of random tokens."""
    samples: List[dict]
    if data == "alpaca":
        for path, flag in ((data_file, "--data_file"), (tokenizer_path, "--tokenizer_path")):
            if not Path(path).is_file():
                raise UserError(f"--data alpaca: {flag} {path} not found; give the Alpaca records and the LLaMA "
                                "tokenizer, or use --data random")
        import json

        tokenizer = Tokenizer(tokenizer_path)
        if tokenizer.vocab_size > config.vocab_size:
            raise UserError(f"--tokenizer_path {tokenizer_path} has {tokenizer.vocab_size} tokens, the model "
                            f"{config.vocab_size}")
        records = [{"input": "", **r} for r in json.loads(Path(data_file).read_text())]
        samples = [prepare_sample(r, tokenizer, max_seq_length) for r in records]
        return samples, f"real Alpaca records ({Path(data_file).name}), response-only loss"
    if data == "random":
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(60, max_seq_length, (n,), generator=g)
        samples = []
        for length in lengths.tolist():
            ids = torch.randint(3, config.vocab_size, (length,), generator=g)
            samples.append({"input_ids": ids, "labels": ids.clone()})
        return samples, "random tokens, loss on all positions"
    raise UserError(f"--data {data!r} is not one of alpaca, random")


def make_batches(samples: List[dict], micro_batch_size: int, max_seq_length: int, n: int, grouped: bool = False,
                 packed: bool = False) -> List[Batch]:
    """The first `n` padded micro-batches the finetune loop would train on (seed 1337, one device), with
    `grouped` those of --group_by_length, with `packed` those of --packing."""
    lengths = tuple(min(len(s["input_ids"]), max_seq_length) for s in samples) if grouped else None
    batches = []
    for i in range(n):
        chunk = [samples[j] for j in batch_indices(len(samples), micro_batch_size, i, 0, 1, 1337, lengths)]
        input_ids, labels, *positions = (pack_batch if packed else pad_batch)(chunk, max_seq_length)
        real = [min(len(s["input_ids"]), max_seq_length) for s in chunk]
        batches.append((input_ids, labels, real, positions[0] if packed else None))
    return batches


def copy_lora_weights(ours: LoRALLaMA, theirs, config: Config) -> None:
    """Gives PEFT's q/v LoRA A and B our initial values (B is zero on both sides; A differs by seed)."""
    hf_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for i, block in enumerate(ours.transformer.h):
            layer = block.attn.c_attn
            (A_q, A_v), (B_q, B_v) = layer.lora_A.split(layer.r), layer.lora_B.split(layer.adapted_sizes)
            prefix = f"base_model.model.model.layers.{i}.self_attn"
            for proj, A, B in (("q_proj", A_q, B_q), ("v_proj", A_v, B_v)):
                hf_params[f"{prefix}.{proj}.lora_A.default.weight"].copy_(A)
                hf_params[f"{prefix}.{proj}.lora_B.default.weight"].copy_(B)



if __name__ == "__main__":
    run_cli(main)
