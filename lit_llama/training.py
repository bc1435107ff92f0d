"""The finetuning loop shared by finetune/lora.py, finetune/adapter.py and finetune/full.py.

Each script builds its model, says which parameters train and how to save them; everything else lives
here once: batching (padded to the longest sequence in the batch), the learning-rate schedule, gradient
accumulation, validation with a greedy sample, checkpointing, resuming, the progress bar and CSV metrics.
"""

import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.strategies import FSDPStrategy
from tqdm import tqdm

from lit_llama.data import IGNORE_INDEX, load_prepared
from lit_llama.generation import generate_response
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import CheckpointPaths, UserError, check_vocab

Sample = Dict[str, Any]
RESUME_NAME = "resume.pth"  # trainable weights, optimizer, step and RNG of the last save


@dataclass
class TrainingConfig:
    learning_rate: float
    batch_size: int  # examples per optimizer step, over all devices
    micro_batch_size: int  # examples per forward/backward pass on one device
    max_iters: Optional[int]  # micro-batch iterations per device; None = `epochs` over the training set
    epochs: float
    warmup_iters: int  # optimizer steps of linear warmup
    weight_decay: float
    max_seq_length: int  # longer examples are cut (the article's block size)
    eval_interval: int  # optimizer steps between validations (0 = only at start and end)
    eval_iters: int  # validation batches per validation
    save_interval: int  # optimizer steps between checkpoints (0 = only the final one)
    log_interval: int = 1  # iterations between metric rows
    seed: int = 1337
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory

    def gradient_accumulation_iters(self, world_size: int) -> int:
        if self.micro_batch_size > self.batch_size:
            raise UserError(
                f"--micro_batch_size {self.micro_batch_size} is larger than --batch_size {self.batch_size}"
            )
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise UserError(
                f"--batch_size {self.batch_size} must be a multiple of --micro_batch_size x devices ({per_step})"
            )
        return self.batch_size // per_step

    def total_iters(self, train_size: int, world_size: int) -> int:
        if self.max_iters is not None:
            return self.max_iters
        return int(self.epochs * train_size) // (self.micro_batch_size * world_size)


# --- batches ---------------------------------------------------------------------------------------


def batch_indices(n: int, batch: int, iter_num: int, rank: int, world_size: int, seed: int) -> List[int]:
    """Example indices of micro-batch `iter_num` on device `rank`: consecutive slices of a seeded
    permutation per epoch. A pure function of its arguments, so a resumed run sees the same batches."""
    start = (iter_num * world_size + rank) * batch
    indices = []
    while len(indices) < batch:
        epoch, offset = divmod(start + len(indices), n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        indices.extend(order[offset : offset + batch - len(indices)].tolist())
    return indices


def pad_batch(samples: List[Sample], max_seq_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pads to the longest example in the batch (not to the block size): inputs with 0, labels
    with IGNORE_INDEX, so padding is neither attended to by real tokens (causal) nor scored."""
    inputs = [s["input_ids"][:max_seq_length] for s in samples]
    labels = [s["labels"][:max_seq_length] for s in samples]
    length = max(len(x) for x in inputs)
    input_ids = torch.stack([F.pad(x, (0, length - len(x)), value=0) for x in inputs])
    label_ids = torch.stack([F.pad(y, (0, length - len(y)), value=IGNORE_INDEX) for y in labels])
    return input_ids, label_ids


def compute_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the scored positions. Position t predicts token t+1, and only the
    positions whose next token is scored (the response, with --mask_inputs) go through the output layer."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    logits = model(input_ids, output_mask=F.pad(scored, (0, 1), value=False))  # (N, vocab)
    total = F.cross_entropy(logits.float(), targets[scored], reduction="sum")
    return total / scored.sum().clamp(min=1)


def get_lr(step: int, learning_rate: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to `learning_rate`, then cosine decay to zero at `max_steps`."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# --- the loop --------------------------------------------------------------------------------------


def fit(
    fabric: L.Fabric,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: List[Sample],
    val_data: List[Sample],
    tokenizer: Tokenizer,
    config: TrainingConfig,
    out_dir: Path,
    save_weights: Callable[[Path], None],
    final_name: str,
    resume: bool = False,
) -> Dict[str, float]:
    """Trains for `config.total_iters(...)` micro-batch iterations. `save_weights(path)` writes the
    method's own checkpoint (LoRA-only, adapter-only or full weights); `final_name` is the last one's
    file name. Returns the final metrics."""
    world = fabric.world_size
    accumulation = config.gradient_accumulation_iters(world)
    max_iters = config.total_iters(len(train_data), world)
    if max_iters < accumulation:
        raise UserError(
            f"--max_iters {max_iters} is fewer than one optimizer step ({accumulation} iterations of "
            f"--micro_batch_size {config.micro_batch_size} make --batch_size {config.batch_size})"
        )
    if len(val_data) == 0:
        raise UserError("the validation set is empty; prepare the data with a --test_split_size of at least 1")
    max_steps = max_iters // accumulation
    warmup_steps = min(config.warmup_iters, max_steps)

    # names as in the unwrapped model's state dict; None (save everything) when all weights train
    named = list(getattr(model, "module", model).named_parameters())
    trainable = {name for name, p in named if p.requires_grad} if not all(p.requires_grad for _, p in named) else None
    state = {"model": model, "optimizer": optimizer, "iter_num": 0, "step_count": 0, "tokens": 0, "train_seconds": 0.0}
    fit_start = time.perf_counter()
    resume_path = out_dir / RESUME_NAME
    if resume:
        if not resume_path.exists():
            raise UserError(f"--resume: {resume_path} not found; there is no earlier run to continue")
        remainder = fabric.load(resume_path, state, strict=False)  # fills `state` in place
        torch.set_rng_state(remainder["rng"])
        fabric.print(f"Resuming from iteration {state['iter_num']} (step {state['step_count']})")

    fabric.print(
        f"Training {max_iters} iterations ({max_steps} optimizer steps of {config.batch_size} examples, "
        f"{accumulation} accumulation iterations each) on {len(train_data)} examples"
    )
    if state["iter_num"] == 0:
        val_loss = validate(fabric, model, val_data, config)
        fabric.log_dict({"iter": 0, "tokens": 0, "val_loss": val_loss}, step=0)
        fabric.print(f"Validation loss before training: {val_loss:.4f}")

    metrics: Dict[str, float] = {}
    bar = tqdm(total=max_iters, initial=state["iter_num"], disable=fabric.global_rank != 0, desc="finetune")
    window_tokens, window_seconds = 0, 0.0  # training throughput, validation and saving excluded
    for iter_num in range(state["iter_num"], max_iters):
        iter_start = time.perf_counter()
        lr = get_lr(state["step_count"], config.learning_rate, warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = batch_indices(len(train_data), config.micro_batch_size, iter_num, fabric.global_rank, world, config.seed)
        input_ids, labels = pad_batch([train_data[i] for i in idx], config.max_seq_length)
        input_ids, labels = fabric.to_device((input_ids, labels))

        is_accumulating = (iter_num + 1) % accumulation != 0
        # not under FSDP: skipping the sync there keeps the whole model's gradients, unsharded, on every GPU
        skip_sync = is_accumulating and not isinstance(fabric.strategy, FSDPStrategy)
        with fabric.no_backward_sync(model, enabled=skip_sync):
            loss = compute_loss(model, input_ids, labels)
            fabric.backward(loss / accumulation)
        batch_tokens = sum(min(len(train_data[i]["input_ids"]), config.max_seq_length) for i in idx) * world
        window_tokens += batch_tokens
        state["tokens"] += batch_tokens
        state["iter_num"] = iter_num + 1

        row: Dict[str, float] = {}
        if not is_accumulating:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step_count"] += 1
        window_seconds += time.perf_counter() - iter_start
        state["train_seconds"] += time.perf_counter() - iter_start
        if not is_accumulating:
            step = state["step_count"]
            if config.eval_interval and step % config.eval_interval == 0 and step < max_steps:
                row["val_loss"] = validate(fabric, model, val_data, config)
                fabric.print(f"\nstep {step}: val loss {row['val_loss']:.4f}")
                print_sample(fabric, model, tokenizer, val_data[0])
            if config.save_interval and step % config.save_interval == 0 and step < max_steps:
                save_weights(out_dir / f"iter-{iter_num + 1:06d}-ckpt.pth")
                save_resume_state(fabric, state, resume_path, trainable)

        if (iter_num + 1) % config.log_interval == 0 or row:
            row.update(
                iter=iter_num + 1,
                tokens=state["tokens"],
                train_loss=loss.item(),
                lr=lr,
                tokens_per_sec=window_tokens / window_seconds,
                peak_memory=peak_memory_gb(fabric.device),
            )
            fabric.log_dict(row, step=iter_num + 1)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}")
            metrics.update(row)
            window_tokens, window_seconds = 0, 0.0
        bar.update(1)
    bar.close()

    val_loss = validate(fabric, model, val_data, config)
    fabric.log_dict({"iter": max_iters, "tokens": state["tokens"], "val_loss": val_loss}, step=max_iters)
    fabric.print(f"Validation loss after training: {val_loss:.4f}")
    print_sample(fabric, model, tokenizer, val_data[0])
    save_weights(out_dir / final_name)
    save_resume_state(fabric, state, resume_path, trainable)
    for logger in fabric.loggers:
        logger.finalize("success")
    summary = {
        "iters": max_iters,
        "tokens": state["tokens"],
        "train_seconds": state["train_seconds"],  # training iterations only, over all resumed parts
        "wall_seconds": time.perf_counter() - fit_start,  # this process, with validation and saving
        "tokens_per_sec": state["tokens"] / max(state["train_seconds"], 1e-9),
        "final_train_loss": metrics.get("train_loss"),
        "val_loss": val_loss,
        "peak_memory_gb": peak_memory_gb(fabric.device),
        "devices": world,
    }
    if fabric.global_rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@torch.no_grad()
def validate(fabric: L.Fabric, model: torch.nn.Module, val_data: List[Sample], config: TrainingConfig) -> float:
    """Mean loss over the first `eval_iters` micro-batches of the validation set (the same every time),
    shared among the devices: the same value on any number of them."""
    model.eval()
    batch, world = config.micro_batch_size, fabric.world_size
    num_batches = min(config.eval_iters, math.ceil(len(val_data) / batch))
    total = torch.zeros(2, device=fabric.device)  # sum of batch losses, number of batches
    # every device runs as many forward passes (under FSDP they are collective): spare ones are not counted
    for k in range(fabric.global_rank, math.ceil(num_batches / world) * world, world):
        start = k * batch if k < num_batches else 0
        input_ids, labels = fabric.to_device(pad_batch(val_data[start : start + batch], config.max_seq_length))
        loss = compute_loss(model, input_ids, labels)
        if k < num_batches:
            total += torch.stack([loss, torch.ones_like(loss)])
    model.train()
    total = fabric.all_reduce(total, reduce_op="sum")
    return (total[0] / total[1]).item()


def print_sample(fabric: L.Fabric, model: torch.nn.Module, tokenizer: Tokenizer, sample: Sample) -> None:
    """Greedy response to one validation instruction: a quick look at what training does."""
    response = generate_response(model, tokenizer, sample["instruction"], sample.get("input", ""), fabric.device)
    fabric.print(f"Instruction: {sample['instruction']}\nResponse: {response}\n")


def save_resume_state(fabric: L.Fabric, state: Dict[str, Any], path: Path, trainable: Optional[set]) -> None:
    """Everything `--resume` needs (only the trainable weights of the model), written under a temporary
    name and renamed when complete."""
    tmp = path.with_name(path.name + ".tmp")
    to_save = {**state, "rng": torch.get_rng_state()}
    keep = None if trainable is None else {"model": lambda name, _: name in trainable}
    fabric.save(tmp, to_save, filter=keep)
    fabric.barrier()
    if fabric.global_rank == 0:
        if path.is_dir():  # sharded (FSDP) checkpoints are folders
            shutil.rmtree(path)
        os.replace(tmp, path)
    fabric.barrier()


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


# --- setup helpers used by every finetune script ---------------------------------------------------


def make_fabric(
    devices: int, num_nodes: int, strategy: Any, precision: str, out_dir: Path
) -> L.Fabric:
    available = torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count() or 1
    if devices > available and num_nodes == 1:
        raise UserError(f"--devices {devices} is more than the {available} devices available on this machine")
    logger = CSVLogger(root_dir=out_dir, name="logs", flush_logs_every_n_steps=10)
    return L.Fabric(
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        loggers=logger,
    )


def check_data_fits(data: List[Sample], vocab_size: int, data_dir: Path) -> None:
    """Token ids past the model's vocabulary mean the data was prepared with another tokenizer."""
    largest = max(int(s["input_ids"].max()) for s in data)
    if largest >= vocab_size:
        raise UserError(
            f"{data_dir} holds token id {largest} but the model's vocabulary has {vocab_size} tokens: "
            "prepare the data with this checkpoint's tokenizer"
        )


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """A finished or interrupted run in `out_dir` is never overwritten by a new one."""
    if not resume and out_dir.is_dir() and any(out_dir.glob("*.pth")):
        raise UserError(
            f"--out_dir {out_dir} already holds checkpoints: pass --resume true to continue that run, "
            "or choose another --out_dir"
        )


def load_tokenizer_and_data(
    fabric: L.Fabric, paths: CheckpointPaths, data_dir: Path, seed: int
) -> Tuple[Tokenizer, List[Sample], List[Sample]]:
    """Seeds everything, then loads the tokenizer and the prepared data, both checked against the model."""
    fabric.seed_everything(seed)
    tokenizer = Tokenizer(paths.tokenizer)
    check_vocab(tokenizer, paths)
    train_data, val_data = load_prepared(data_dir)
    check_data_fits(train_data, paths.config.vocab_size, data_dir)
    return tokenizer, train_data, val_data


def setup_model_and_optimizer(
    fabric: L.Fabric, model: torch.nn.Module, config: TrainingConfig
) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Hands the model to Fabric (devices, precision, strategy) and builds AdamW over what trains. When
    only some weights train (LoRA, adapter), those are kept in float32."""
    frozen_some = any(not p.requires_grad for p in model.parameters())
    if config.activation_checkpointing and not isinstance(fabric.strategy, FSDPStrategy):  # FSDP has its own
        model.activation_checkpointing = True
    model = fabric.setup_module(model)
    if frozen_some:
        keep_trainable_in_fp32(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    return model, fabric.setup_optimizers(optimizer)


def keep_trainable_in_fp32(model: torch.nn.Module) -> None:
    """Frozen weights stay in bf16 (half the memory); the few trainable ones are kept in float32 so small
    updates are not lost to bf16 rounding."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
