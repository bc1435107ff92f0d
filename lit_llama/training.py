"""The finetuning loop shared by finetune/lora.py, finetune/adapter.py and finetune/full.py.

Each script builds its model, says which parameters train and how to save them; everything else lives
here once: the strategy (one device, DDP or FSDP2 sharding), batching (padded to the longest sequence in
the batch; optionally of examples of similar length), the loss (optionally in chunks), the learning-rate schedule, gradient accumulation, validation with a greedy sample,
checkpointing, resuming, the progress bar and CSV metrics.
"""

import csv
import fcntl
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import lightning as L
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import torch.utils.checkpoint
from lightning.fabric.loggers import Logger
from lightning.fabric.strategies import ModelParallelStrategy, Strategy
from lightning.fabric.wrappers import _FabricModule, _FabricOptimizer
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from lit_llama.checks import check_at_least, check_positive, check_range
from lit_llama.checks import check_out_dir as check_writable_dir
from lit_llama.data import IGNORE_INDEX, load_prepared
from lit_llama.generation import generate_response
from lit_llama.model import Config
from lit_llama.prompts import DEFAULT_PROMPT_STYLE
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import (
    CheckpointPaths,
    UserError,
    check_finite,
    check_vocab,
    dcp_load_weights_only,
    deprecated_flag,
    describe_exception,
    disk_errors,
    verify_checksums,
    write_text_atomic,
)

Sample = Dict[str, Any]
RESUME_NAME = "resume.pth"  # trainable weights, optimizer, counters and RNG of the last save
RESUME_META = "meta.pth"  # in a sharded resume folder: the counters and RNG beside the shards
RUN_NAME = "run.json"  # what the run in a folder is (method, model, method settings): --resume compares it
LOCK_NAME = "run.lock"  # held by the running process: a second run on the same folder stops at once
METRICS_NAME = "metrics.csv"  # one row per logged iteration, every row once, over all resumed parts
METRICS_FIELDS = ("iter", "tokens", "train_loss", "val_loss", "lr", "tokens_per_sec", "peak_memory")
STRATEGIES = ("auto", "ddp", "fsdp")  # what every finetune script offers; the tests run each one


@dataclass(kw_only=True)  # 16 settings: named where built, never by position
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
    chunked_ce: bool = False  # the loss through the output layer a chunk of positions at a time: less memory
    group_by_length: bool = False  # micro-batches of examples of similar length: less padding

    def __post_init__(self) -> None:
        """Every value is checked when the config is built, before any work: one line naming the flag."""
        check_range("learning_rate", self.learning_rate, 0, 1, low_inclusive=False)
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("micro_batch_size", self.micro_batch_size, 1)
        if self.micro_batch_size > self.batch_size:
            raise UserError(
                f"--micro_batch_size {self.micro_batch_size} is larger than --batch_size {self.batch_size}"
            )
        check_at_least("max_iters", self.max_iters, 1, optional=True)
        check_positive("epochs", self.epochs)
        check_at_least("warmup_iters", self.warmup_iters, 0, optional=True)  # None: the script's default
        check_range("weight_decay", self.weight_decay, 0, 1)
        check_at_least("max_seq_length", self.max_seq_length, 2)  # an input token and the one it predicts
        check_at_least("eval_interval", self.eval_interval, 0)
        check_at_least("eval_iters", self.eval_iters, 1)
        check_at_least("save_interval", self.save_interval, 0)
        check_at_least("log_interval", self.log_interval, 1)
        check_range("seed", self.seed, 0, 2**63 - 1)

    def batch_settings(self) -> Dict[str, Any]:
        """The settings that decide which examples each step trains on, in which order: a resumed run must
        keep them (run.json records them) to be the run it continues."""
        return {name: getattr(self, name)
                for name in ("seed", "batch_size", "micro_batch_size", "max_seq_length", "group_by_length")}

    def run_settings(self, precision: str, data_dir: Path) -> Dict[str, Any]:
        """The other settings that change what a run computes (the schedule, the optimizer, the numbers'
        precision and the data): run.json records them too, and --resume refuses other values."""
        return {"learning_rate": self.learning_rate, "weight_decay": self.weight_decay,
                "warmup_iters": self.warmup_iters, "max_iters": self.max_iters, "epochs": self.epochs,
                "precision": precision, "data_dir": str(Path(data_dir).resolve())}

    def gradient_accumulation_iters(self, world_size: int) -> int:
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


DEFAULT_MAX_SEQ_LENGTH = 512  # the article's


def resolve_max_seq_length(max_seq_length: Optional[int], block_size: Optional[int], config: Config) -> int:
    """--max_seq_length (or its deprecated name --block_size); by default 512, or the model's context if that
    is shorter. A longer value than the model's context is refused: the model has no positions for it."""
    max_seq_length = deprecated_flag("max_seq_length", max_seq_length, "block_size", block_size)
    if max_seq_length is None:
        return min(DEFAULT_MAX_SEQ_LENGTH, config.context_length)
    if max_seq_length > config.context_length:
        raise UserError(
            f"--max_seq_length {max_seq_length} is longer than the model's context ({config.context_length} tokens, "
            "block_size or sliding_window in lit_config.json)"
        )
    return max_seq_length


# --- batches ---------------------------------------------------------------------------------------


def batch_indices(
    n: int, batch: int, iter_num: int, rank: int, world_size: int, seed: int, lengths: Optional[Tuple[int, ...]] = None
) -> List[int]:
    """Example indices of micro-batch `iter_num` on device `rank`: consecutive slices of a seeded
    permutation per epoch. With `lengths` (the examples' token counts: --group_by_length), each epoch's
    permutation is rearranged so that a micro-batch holds examples of similar length (see
    `grouped_epoch_order`). A pure function of its arguments, so a resumed run sees the same batches."""
    start = (iter_num * world_size + rank) * batch
    indices = []
    while len(indices) < batch:
        epoch, offset = divmod(start + len(indices), n)
        if lengths is None:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        else:
            order = grouped_epoch_order(lengths, batch, seed, epoch)
        indices.extend(order[offset : offset + batch - len(indices)])
    return indices


def example_lengths(data: List[Sample], max_seq_length: int) -> Tuple[int, ...]:
    """Each example's token count in a batch (cut at max_seq_length), for --group_by_length."""
    return tuple(min(len(s["input_ids"]), max_seq_length) for s in data)


GROUP_WINDOW = 64  # --group_by_length: micro-batches whose examples are sorted by length together


@lru_cache(maxsize=4)  # one order per epoch, asked for once per iteration
def grouped_epoch_order(lengths: Tuple[int, ...], batch: int, seed: int, epoch: int) -> List[int]:
    """The epoch's seeded permutation (the one `batch_indices` uses without grouping), in windows of
    GROUP_WINDOW micro-batches: within a window the examples are sorted by length, cut into micro-batches,
    and those micro-batches shuffled, so that each holds examples of similar length (little padding) while
    an optimizer step still mixes short and long ones. Every example stays once in its epoch."""
    n = len(lengths)
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    # the micro-batch slices of the stream start at multiples of `batch`: this epoch's first examples finish
    # the micro-batch the previous epoch's last ones started, and the windows begin at the next boundary
    first = (-epoch * n) % batch
    grouped = order[:first]
    window = GROUP_WINDOW * batch
    for start in range(first, n, window):
        by_length = sorted(order[start : start + window], key=lambda i: lengths[i])
        groups = [by_length[i : i + batch] for i in range(0, len(by_length), batch)]
        full, partial = [g for g in groups if len(g) == batch], [g for g in groups if len(g) < batch]
        shuffled = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
        grouped += [i for group in shuffled + partial for i in group]  # a partial one continues next epoch
    return grouped


def pad_batch(samples: List[Sample], max_seq_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pads to the longest example in the batch (not to the block size): inputs with 0, labels
    with IGNORE_INDEX, so padding is neither attended to by real tokens (causal) nor scored."""
    inputs = [s["input_ids"][:max_seq_length] for s in samples]
    labels = [s["labels"][:max_seq_length] for s in samples]
    length = max(len(x) for x in inputs)
    input_ids = torch.stack([F.pad(x, (0, length - len(x)), value=0) for x in inputs])
    label_ids = torch.stack([F.pad(y, (0, length - len(y)), value=IGNORE_INDEX) for y in labels])
    return input_ids, label_ids


def compute_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunked_ce: bool = False
) -> torch.Tensor:
    """Next-token cross-entropy over the scored positions. Position t predicts token t+1, and only the
    positions whose next token is scored (the response, with --mask_inputs) go through the output layer.
    `chunked_ce`: through the output layer a chunk of positions at a time (see `chunked_cross_entropy`)."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    output_mask = F.pad(scored, (0, 1), value=False)
    if chunked_ce:
        hidden = model(input_ids, output_mask=output_mask, head=False)  # (N, n_embd)
        total = chunked_cross_entropy(unwrap(model).lm_head, hidden, targets[scored])
    else:
        logits = model(input_ids, output_mask=output_mask)  # (N, vocab)
        total = F.cross_entropy(logits.float(), targets[scored], reduction="sum")
    return total / scored.sum().clamp(min=1)


CE_CHUNK_ROWS = 256  # positions whose logits exist at once with chunked cross-entropy


def chunked_cross_entropy(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int = CE_CHUNK_ROWS
) -> torch.Tensor:
    """The summed cross-entropy of `head(hidden)` against `targets`, `chunk_rows` positions at a time: each
    chunk's (chunk_rows, vocab) logits are freed after its loss and recomputed in the backward pass, so
    the full (N, vocab) float32 logits never exist. Costs one more forward pass of the output layer."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for chunk, chunk_targets in zip(hidden.split(chunk_rows), targets.split(chunk_rows)):
        total = total + torch.utils.checkpoint.checkpoint(_summed_cross_entropy, head, chunk, chunk_targets,
                                                          use_reentrant=False)
    return total


def _summed_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def get_lr(step: int, learning_rate: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to `learning_rate`, then cosine decay to zero at `max_steps`."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def check_response_tokens(fabric: L.Fabric, data: List[Sample], name: str, max_seq_length: int) -> None:
    """Examples cut at --max_seq_length before their response (a prompt at least that long) have no scored
    position left: they add nothing to the loss. A warning when some do; refused when all do, since the
    losses would then be exactly 0 and nothing would train."""
    first_scored = []  # per example: the first position whose label is scored (position 0 predicts nothing)
    for sample in data:
        scored = (sample["labels"][1:] != IGNORE_INDEX).nonzero()
        first_scored.append(int(scored[0]) + 1 if len(scored) else None)
    lost = sum(1 for first in first_scored if first is None or first >= max_seq_length)
    if lost == len(data):
        needed = min((first for first in first_scored if first is not None), default=None)
        hint = f": raise it to at least {needed + 1}" if needed is not None else ""
        raise UserError(f"--max_seq_length {max_seq_length} cuts away the response of all {lost} {name} examples "
                        f"(their prompts are as long or longer), so nothing would be learned{hint}")
    if lost and fabric.global_rank == 0:
        print(f"warning: --max_seq_length {max_seq_length} cuts away the response of {lost} of {len(data)} {name} "
              "examples: they add nothing to the loss", file=sys.stderr)


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
    sharded_resume: bool = False,
    run_info: Optional[Dict[str, Any]] = None,
) -> Dict[str, float]:
    """Trains for `config.total_iters(...)` micro-batch iterations. `save_weights(path)` writes the
    method's own checkpoint (LoRA-only, adapter-only or full weights) and is called on every rank (under
    FSDP the weights are gathered); `final_name` is the last one's file name. `sharded_resume` writes the
    resume state as one folder of per-rank shards instead of one file. `run_info` (method, model config, method
    settings) goes to run.json, for `--resume` to check (see `claim_out_dir`). Returns the final metrics."""
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
    for name, split in (("training", train_data), ("validation", val_data)):
        check_response_tokens(fabric, split, name, config.max_seq_length)
    max_steps = max_iters // accumulation
    warmup_steps = min(config.warmup_iters, max_steps)

    state = {"iter_num": 0, "step_count": 0, "tokens": 0, "train_seconds": 0.0}  # what --resume restores
    fit_start = time.perf_counter()
    resume_path = out_dir / RESUME_NAME
    metrics_log = MetricsLog(out_dir / METRICS_NAME, enabled=fabric.global_rank == 0, loggers=fabric.loggers)
    found = find_resume_state(resume_path) if resume else None
    if found is not None:
        state = load_resume_state(fabric, model, optimizer, found)
        fabric.print(f"Resuming from iteration {state['iter_num']} (step {state['step_count']})")
    elif resume:  # see claim_out_dir: the run was stopped before its first resume state
        fabric.print(f"No resume state in {out_dir} yet: starting that run from the beginning")
    # rows after the resumed iteration were logged by the interrupted part after its last save: they come again
    metrics_log.start(keep_until=state["iter_num"])
    if fabric.global_rank == 0 and run_info is not None:
        write_text_atomic(json.dumps(run_info, indent=2) + "\n", out_dir / RUN_NAME)
    resumed_finished = state["iter_num"] >= max_iters  # stopped between the final resume state and the summary

    # --group_by_length: the token counts the examples are padded from, once (the batches are a function of them)
    lengths = example_lengths(train_data, config.max_seq_length) if config.group_by_length else None
    fabric.print(
        f"Training {max_iters} iterations ({max_steps} optimizer steps of {config.batch_size} examples, "
        f"{accumulation} accumulation iterations each) on {len(train_data)} examples"
    )
    if state["iter_num"] == 0:
        val_loss = validate(fabric, model, val_data, config)
        metrics_log.log({"iter": 0, "tokens": 0, "val_loss": val_loss})
        fabric.print(f"Validation loss before training: {val_loss:.4f}")

    metrics: Dict[str, float] = {}
    bar = tqdm(total=max_iters, initial=state["iter_num"], disable=fabric.global_rank != 0, desc="finetune")
    window_tokens, window_seconds = 0, 0.0  # training throughput, validation and saving excluded
    try:  # closed also when a step fails: its error line then starts a line of its own
        for iter_num in range(state["iter_num"], max_iters):
            iter_start = time.perf_counter()
            lr = get_lr(state["step_count"], config.learning_rate, warmup_steps, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = batch_indices(len(train_data), config.micro_batch_size, iter_num, fabric.global_rank, world,
                                config.seed, lengths)
            input_ids, labels = pad_batch([train_data[i] for i in idx], config.max_seq_length)
            input_ids, labels = fabric.to_device((input_ids, labels))

            is_accumulating = (iter_num + 1) % accumulation != 0
            # not under FSDP: skipping the sync there keeps the whole model's gradients, unsharded, on every GPU
            skip_sync = is_accumulating and not is_fsdp(fabric)
            with fabric.no_backward_sync(model, enabled=skip_sync):
                loss = compute_loss(model, input_ids, labels, config.chunked_ce)
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
            step = state["step_count"]
            if not is_accumulating and config.eval_interval and step % config.eval_interval == 0 and step < max_steps:
                row["val_loss"] = validate(fabric, model, val_data, config)
                fabric.print(f"\nstep {step}: val loss {row['val_loss']:.4f}")
                print_sample(fabric, model, tokenizer, val_data[0])

            if (iter_num + 1) % config.log_interval == 0 or row:
                row.update(
                    iter=iter_num + 1,
                    tokens=state["tokens"],
                    train_loss=loss.item(),
                    lr=lr,
                    tokens_per_sec=window_tokens / window_seconds,
                    peak_memory=peak_memory_gb(fabric.device),
                )
                metrics_log.log(row)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}")
                metrics.update(row)
                window_tokens, window_seconds = 0, 0.0
            if not is_accumulating and config.save_interval and step % config.save_interval == 0 and step < max_steps:
                metrics_log.flush()  # before the checkpoint: a run resumed from it has every row up to it
                save_weights(out_dir / f"iter-{iter_num + 1:06d}-ckpt.pth")
                save_resume_state(fabric, model, optimizer, state, resume_path, sharded_resume)
            bar.update(1)
    finally:
        bar.close()

    val_loss = validate(fabric, model, val_data, config)
    if not resumed_finished:  # else that row is in the file already
        metrics_log.log({"iter": max_iters, "tokens": state["tokens"], "val_loss": val_loss})
    metrics_log.finalize()
    fabric.print(f"Validation loss after training: {val_loss:.4f}")
    print_sample(fabric, model, tokenizer, val_data[0])
    save_weights(out_dir / final_name)
    save_resume_state(fabric, model, optimizer, state, resume_path, sharded_resume)
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
        write_text_atomic(json.dumps(summary, indent=2) + "\n", out_dir / "summary.json")
    return summary


class MetricsLog:
    """`metrics.csv` in the run's folder: one row per logged iteration, with fixed columns, appended in
    place. A resumed run keeps the rows up to the iteration it resumes from and logs the rest again, so the
    file has every row once. Only rank 0 writes (`enabled`). Each row also goes to `loggers` (Fabric's
    TensorBoard or W&B logger, from --logger_name)."""

    def __init__(self, path: Path, enabled: bool = True, loggers: Sequence[Logger] = ()) -> None:
        self.path, self.enabled, self.pending, self.loggers = path, enabled, [], list(loggers)

    def start(self, keep_until: int) -> None:
        """Keeps the rows of iterations up to `keep_until` (none for a new run) and drops the others."""
        if not self.enabled:
            return
        kept = []
        if keep_until > 0 and self.path.is_file():
            try:
                with open(self.path, newline="", encoding="utf-8") as f:
                    rows = csv.DictReader(f)
                    kept = [row for row in rows if (row.get("iter") or "").isdigit() and int(row["iter"]) <= keep_until]
            except (UnicodeDecodeError, csv.Error) as e:  # the run's own file, edited or damaged since
                raise UserError(f"--resume: {self.path} is not a UTF-8 CSV file of metrics ({describe_exception(e)}): "
                                "repair it, or move it away to start a new one") from None
        text = io.StringIO()  # header and kept rows replace the file in one piece: a kill now loses no row
        writer = csv.DictWriter(text, fieldnames=METRICS_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        write_text_atomic(text.getvalue(), self.path)

    def log(self, row: Dict[str, Any]) -> None:
        if self.enabled:
            self.pending.append(row)
            if len(self.pending) >= 10:  # now and then, for a look at a running job
                self.flush()
            for logger in self.loggers:
                logger.log_metrics({k: v for k, v in row.items() if k != "iter"}, step=int(row["iter"]))

    def finalize(self) -> None:
        self.flush()
        for logger in self.loggers:
            logger.finalize("success")

    def flush(self) -> None:
        if not self.enabled or not self.pending:
            return
        with disk_errors(self.path), open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRICS_FIELDS, extrasaction="ignore").writerows(self.pending)
            f.flush()
            os.fsync(f.fileno())
        self.pending = []


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
        loss = compute_loss(model, input_ids, labels, config.chunked_ce)
        if k < num_batches:
            total += torch.stack([loss, torch.ones_like(loss)])
    model.train()
    total = fabric.all_reduce(total, reduce_op="sum")
    return (total[0] / total[1]).item()


def print_sample(fabric: L.Fabric, model: torch.nn.Module, tokenizer: Tokenizer, sample: Sample) -> None:
    """Greedy response to one validation instruction: a quick look at what training does."""
    response = generate_response(model, tokenizer, sample["instruction"], sample.get("input", ""), fabric.device,
                                 prompt_style=sample.get("prompt_style", DEFAULT_PROMPT_STYLE))
    fabric.print(f"Instruction: {sample['instruction']}\nResponse: {response}\n")


def save_resume_state(
    fabric: L.Fabric,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    counters: Dict[str, Any],
    path: Path,
    sharded: bool = False,
) -> None:
    """Everything `--resume` needs: the trainable weights, the AdamW states, the counters and every rank's
    random generators. One file, gathered on rank 0; or with `sharded` a torch.distributed.checkpoint folder
    in which each rank writes its own shards (no gathering: for full finetuning of large models). Written
    under a temporary name and renamed when complete, so a crash never leaves half a resume state."""
    options = StateDictOptions(full_state_dict=not sharded, cpu_offload=True, ignore_frozen_params=True)
    weights, optimizer_state = get_state_dict(unwrap(model), unwrap(optimizer), options=options)
    meta = {**counters, "world_size": fabric.world_size, "rng": gather_rng_states(fabric)}
    tmp = path.with_name(path.name + ".tmp")
    with disk_errors(path, tmp):
        if sharded:
            dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=tmp)
            if fabric.global_rank == 0:
                torch.save(meta, tmp / RESUME_META)
        elif fabric.global_rank == 0:
            torch.save({"model": weights, "optimizer": optimizer_state, **meta}, tmp)
        fabric.barrier()
        if fabric.global_rank == 0:
            replace_checkpoint(tmp, path)
    fabric.barrier()


def replace_checkpoint(tmp: Path, path: Path) -> None:
    """Puts the complete file or folder `tmp` in the place of `path` so that a kill at any instruction leaves a
    complete one: a file is replaced in one rename; a folder cannot be, so the old one is first renamed to
    `<path>.old` and deleted only once the new one has its name (`find_resume_state` falls back to it)."""
    old = path.with_name(path.name + ".old")
    if not path.is_dir() and not tmp.is_dir():
        os.replace(tmp, path)
        return
    if path.exists():
        if old.exists():  # left by a kill while it was being deleted: `path` is complete
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def find_resume_state(path: Path) -> Optional[Path]:
    """The resume state at `path`, or the previous one at `<path>.old` if a kill came between the renames of
    `replace_checkpoint`; None when there is none."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        return path
    return old if old.exists() else None


def load_resume_state(
    fabric: L.Fabric, model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path
) -> Dict[str, Any]:
    """Restores what `save_resume_state` wrote (a file or a sharded folder, on any strategy) into the set-up
    model and optimizer, and this rank's random generators; returns the counters. Only tensors and plain
    values are read (`weights_only`): a resume file cannot run code."""
    if path.is_file():
        verify_checksums(path)
    try:
        if path.is_dir():
            # the set-up model's own (sharded) state dicts are the templates the shards are read into
            weights, optimizer_state = get_state_dict(
                unwrap(model), unwrap(optimizer), options=StateDictOptions(ignore_frozen_params=True)
            )
            saved = {"model": weights, "optimizer": optimizer_state}
            dcp_load_weights_only(saved, path)
            meta = torch.load(path / RESUME_META, weights_only=True)
            options = StateDictOptions(ignore_frozen_params=True)
        else:
            saved = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
            meta = saved
            options = StateDictOptions(full_state_dict=True, strict=False)  # frozen weights are not in it
    except Exception as e:  # noqa: BLE001 - any unreadable resume state is the user's file
        raise UserError(f"--resume: {path} is not a resume state this version can read ({describe_exception(e)})")
    if not isinstance(meta, dict) or "world_size" not in meta or "rng" not in meta:
        raise UserError(f"--resume: {path} was written by an older version; start a new run in another --out_dir")
    if meta["world_size"] != fabric.world_size:
        raise UserError(
            f"--resume: {path} was written by {meta['world_size']} processes; resume it with as many "
            f"(--devices x --num_nodes), not {fabric.world_size}"
        )
    trainable = {name for name, p in unwrap(model).named_parameters() if p.requires_grad}
    if set(saved["model"]) != trainable:
        unexpected = sorted(set(saved["model"]) ^ trainable)
        raise UserError(f"--resume: {path} holds the weights of another model or method (e.g. {unexpected[0]!r})")
    check_finite({name: t.to_local() if isinstance(t, DTensor) else t for name, t in saved["model"].items()}, path)
    set_state_dict(
        unwrap(model), unwrap(optimizer), model_state_dict=saved["model"],
        optim_state_dict=saved["optimizer"], options=options,
    )
    rng = meta["rng"][fabric.global_rank]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and fabric.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], fabric.device)
    return {key: meta[key] for key in ("iter_num", "step_count", "tokens", "train_seconds")}


def gather_rng_states(fabric: L.Fabric) -> List[Dict[str, torch.Tensor]]:
    """Every rank's CPU (and CUDA) random generator state, in rank order: LoRA dropout draws from the
    generator of the device it runs on, and each rank has its own."""
    mine = {"cpu": torch.get_rng_state()}
    if fabric.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(fabric.device)
    if fabric.world_size == 1:
        return [mine]
    states: List[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(states, mine)
    return states


def full_state_dict(model: torch.nn.Module, trainable_only: bool = False) -> Dict[str, torch.Tensor]:
    """The model's weights (or only those that train), whole, in CPU memory on rank 0; the other ranks get
    an empty dict. Under FSDP they are gathered from the shards, so every rank must call this."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(unwrap(model), options=options)


def save_sharded_weights(fabric: L.Fabric, model: torch.nn.Module, path: Path) -> None:
    """A torch.distributed.checkpoint folder of the weights (under "model"; each rank writes its shards, no
    gathering), written under a temporary name and renamed when complete. generate/full.py reads it."""
    tmp = path.with_name(path.name + ".tmp")
    with disk_errors(path, tmp):
        dcp.save({"model": get_model_state_dict(unwrap(model))}, checkpoint_id=tmp)
        fabric.barrier()
        if fabric.global_rank == 0:
            replace_checkpoint(tmp, path)
    fabric.barrier()


def unwrap(obj: Any) -> Any:
    """The model or optimizer itself, from Fabric's wrapper (under FSDP2 the model is sharded in place)."""
    if isinstance(obj, _FabricModule):
        return obj.module
    if isinstance(obj, _FabricOptimizer):
        return obj.optimizer
    return obj


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


# --- setup helpers used by every finetune script ---------------------------------------------------


def make_fabric(
    devices: int,
    num_nodes: int,
    strategy: str,
    precision: str,
    out_dir: Path,
    cpu_offload: bool = False,
    logger_name: str = "csv",
) -> L.Fabric:
    """Fabric with the devices, strategy (see `choose_strategy`) and precision of a run, and for --logger_name
    tensorboard or wandb the logger that gets every metrics.csv row too (see `make_logger`)."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count() or 1
    check_at_least("devices", devices, 1)
    check_at_least("num_nodes", num_nodes, 1)
    if devices > available and num_nodes == 1:
        raise UserError(f"--devices {devices} is more than the {available} devices available on this machine")
    logger = make_logger(logger_name, out_dir)
    return L.Fabric(
        devices=devices,
        num_nodes=num_nodes,
        strategy=choose_strategy(strategy, devices, num_nodes, precision, cpu_offload),
        # the scripts load the weights in their dtype themselves (with the trainable ones in float32, see
        # setup_model_and_optimizer): Fabric's "-true" precisions would cast every weight once more
        precision="32-true" if precision.endswith("-true") else precision,
        loggers=[logger] if logger is not None else None,
    )


LOGGER_NAMES = ("csv", "tensorboard", "wandb")


def make_logger(logger_name: str, out_dir: Path) -> Optional[Logger]:
    """Where the metrics of a run go besides out_dir/metrics.csv, which every run writes. csv (default): nowhere
    else. tensorboard: out_dir/logs/version_N/events.out.tfevents.* (`tensorboard --logdir out_dir/logs`).
    wandb: a Weights & Biases run, its local files in out_dir/wandb; with WANDB_MODE=offline nothing leaves the
    machine (`wandb sync` uploads the run later)."""
    if logger_name == "csv":
        return None
    if logger_name == "tensorboard":
        from lightning.fabric.loggers import TensorBoardLogger

        try:
            return TensorBoardLogger(root_dir=out_dir, name="logs")
        except ModuleNotFoundError:
            raise UserError("--logger_name tensorboard needs the tensorboard package: pip install tensorboard")
    if logger_name == "wandb":
        try:
            import wandb  # noqa: F401
            from lightning.pytorch.loggers import WandbLogger
        except ModuleNotFoundError:
            raise UserError("--logger_name wandb needs the wandb package: pip install wandb")

        class FinishingWandbLogger(WandbLogger):
            """Lightning's Trainer finishes the W&B run at the end; under Fabric the logger's finalize does."""

            def finalize(self, status: str) -> None:
                super().finalize(status)
                if self._experiment is not None:
                    self._experiment.finish()

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return FinishingWandbLogger(project="lit-llama", name=Path(out_dir).name, save_dir=str(out_dir))
    raise UserError(f"--logger_name {logger_name!r} is not one of {', '.join(LOGGER_NAMES)}")


def choose_strategy(
    strategy: str, devices: int, num_nodes: int, precision: str, cpu_offload: bool = False
) -> Union[str, Strategy]:
    """--strategy as Fabric takes it. auto: FSDP over several devices, nothing to distribute on one. ddp:
    every device holds the whole model and its AdamW states; gradients are averaged. fsdp: FSDP2 sharding
    (see `shard_model`), also on one device, over NCCL on GPUs or gloo on CPUs."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    fsdp = strategy == "fsdp" or (strategy == "auto" and devices * num_nodes > 1)
    if cpu_offload and not fsdp:
        raise UserError("--cpu_offload needs FSDP: add --strategy fsdp")
    if not fsdp:
        return strategy
    if precision == "16-mixed":
        raise UserError("--precision 16-mixed does not work with FSDP (its gradient scaler cannot unscale sharded "
                        "gradients): use bf16-mixed, bf16-true or 32-true")
    # bf16-mixed: float32 shards, gathered for computation in bf16 (half the traffic and memory of float32)
    param_dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    parallelize = partial(shard_model, param_dtype=param_dtype, cpu_offload=cpu_offload)
    return ModelParallelStrategy(parallelize, data_parallel_size=devices * num_nodes, tensor_parallel_size=1)


def shard_model(
    model: torch.nn.Module, device_mesh: Any, param_dtype: Optional[torch.dtype], cpu_offload: bool
) -> torch.nn.Module:
    """FSDP2: every transformer block is one unit, gathered whole only while it runs (forward, and again in
    backward), then the root unit holds the rest (embedding, final norm, output layer). Weights, gradients
    and AdamW states are split among all processes. Each shard keeps its weight's dtype, so LoRA and adapter
    weights stay float32 beside a bf16 base; gradients are averaged in float32. With `cpu_offload` the
    shards (and the AdamW step) live in CPU memory and each block is copied to the GPU when it runs."""
    mesh = device_mesh["data_parallel"]
    options: Dict[str, Any] = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype, torch.float32)}
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in model.transformer.h:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def is_fsdp(fabric: L.Fabric) -> bool:
    return isinstance(fabric.strategy, ModelParallelStrategy)


def load_device(fabric: L.Fabric, quantize: Optional[str] = None) -> torch.device:
    """Where a script loads the weights: under FSDP (or to quantize them) into CPU memory, from which sharding
    (or quantization) moves each block to its device, so no GPU ever holds the whole model at full size;
    else straight onto the device."""
    return torch.device("cpu") if is_fsdp(fabric) or quantize else fabric.device


def check_data_fits(data: List[Sample], vocab_size: int, data_dir: Path) -> None:
    """Token ids past the model's vocabulary mean the data was prepared with another tokenizer."""
    largest = max(max(int(s["input_ids"].max()), int(s["labels"].max())) for s in data)
    if largest >= vocab_size:
        raise UserError(
            f"{data_dir} holds token id {largest} but the model's vocabulary has {vocab_size} tokens: "
            "prepare the data with this checkpoint's tokenizer"
        )


@contextmanager
def claim_out_dir(out_dir: Path, resume: bool, run_info: Dict[str, Any], world_size: int) -> Iterator[None]:
    """Makes `out_dir` this run's own for as long as the run lasts. The folder must be writable; a lock file
    keeps a second run out while this one runs (the lock goes with the process, also when it is killed). A
    new run refuses a folder with checkpoints in it; `--resume` refuses a folder whose `run.json` describes
    another method, model or method settings than `run_info` (`fit` writes it when training starts). Only
    the launching process (global rank 0) does this: the processes Fabric starts for the other devices run
    the script again and skip it. `world_size` is the number of processes the flags ask for (devices x nodes):
    a one-process run is always the launching process, whatever RANK or SLURM_PROCID its environment holds."""
    check_writable_dir(out_dir)
    if world_size > 1 and not is_launching_process():
        yield
        return
    if resume and not out_dir.is_dir():
        raise UserError(f"--resume: {out_dir} does not exist: there is no run to continue")
    with disk_errors(out_dir / LOCK_NAME):  # only the lock's own writing: not the run it guards
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / LOCK_NAME, "a+")
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            raise UserError(
                f"--out_dir {out_dir} is in use by another run ({owner}): wait for it to end or choose another "
                "--out_dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        lock.flush()
        try:
            check_run_dir(out_dir, resume, run_info)
            yield
        finally:
            # removed while still held: a run starting now creates a new lock file, and this one is done
            with suppress(OSError):
                (out_dir / LOCK_NAME).unlink()
            fcntl.flock(lock, fcntl.LOCK_UN)


def launch(fabric: L.Fabric, function: Callable, *args: Any) -> Any:
    """`fabric.launch(function, *args)`. When it fails in the process the user started, the processes Fabric
    started for the other devices are stopped with it: they may be waiting in a collective for this one, and
    would wait for a timeout of many minutes (NCCL) or print a traceback of a lost connection (gloo)."""
    try:
        return fabric.launch(function, *args)
    except BaseException:
        launched = getattr(getattr(fabric.strategy, "launcher", None), "procs", [])
        processes = list(launched)
        # emptied in place: Fabric's observer thread watches this list, and would kill this process too (before
        # it prints its error) when it sees the others ended
        launched.clear()
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + 10
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # hanging in a collective: only SIGKILL ends it
                process.kill()
        raise


def is_launching_process() -> bool:
    """In a launch of several processes: the process a user started (global rank 0), not one Fabric, torchrun or
    SLURM started for another device. Asked only when the run has several processes: left over in the
    environment of a one-process run (an interactive SLURM shell, say), these variables mean nothing."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def check_run_dir(out_dir: Path, resume: bool, run_info: Dict[str, Any]) -> None:
    """A finished or interrupted run in `out_dir` is never overwritten by a new one, and only the same kind of
    run continues it."""
    if not resume:
        if any(out_dir.glob("*.pth")):
            raise UserError(
                f"--out_dir {out_dir} already holds checkpoints: pass --resume true to continue that run, "
                "or choose another --out_dir"
            )
        return
    run_file = out_dir / RUN_NAME
    if not run_file.is_file():
        if (out_dir / RESUME_NAME).exists():
            return  # written before run.json existed: load_resume_state still checks what it holds
        raise UserError(f"--resume: {out_dir} holds no run to continue (no {RUN_NAME}); start without --resume")
    try:
        there = json.loads(run_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--resume: {run_file} is not valid JSON ({e})")
    if not isinstance(there, dict):
        raise UserError(f"--resume: {run_file} is not a run description")
    for key, ours in run_info.items():
        theirs = there.get(key)
        if theirs == ours or key not in there:  # a key newer than the run.json: nothing to compare with
            continue
        if key == "method":
            raise UserError(f"--resume: {out_dir} holds a run of finetune/{theirs}.py, not of finetune/{ours}.py")
        if isinstance(theirs, dict) and isinstance(ours, dict):  # name only the settings that differ
            differ = [k for k in {**theirs, **ours} if theirs.get(k) != ours.get(k)]
            theirs = ", ".join(f"{k}={theirs.get(k)}" for k in differ)
            ours = ", ".join(f"{k}={ours.get(k)}" for k in differ)
        raise UserError(f"--resume: {out_dir} holds a run with {key} {theirs}; this run has {ours}")


def load_tokenizer_and_data(
    fabric: L.Fabric, paths: CheckpointPaths, data_dir: Path, seed: int
) -> Tuple[Tokenizer, List[Sample], List[Sample]]:
    """Seeds everything, then loads the tokenizer and the prepared data, both checked against the model."""
    fabric.seed_everything(seed)
    tokenizer = Tokenizer(paths.tokenizer)
    check_vocab(tokenizer, paths)
    train_data, val_data = load_prepared(data_dir, tokenizer)
    check_data_fits(train_data + val_data, paths.config.vocab_size, data_dir)
    return tokenizer, train_data, val_data


def setup_model_and_optimizer(
    fabric: L.Fabric, model: torch.nn.Module, config: TrainingConfig
) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Hands the model to Fabric (devices, strategy, precision) and builds AdamW over what trains. When
    only some weights train (LoRA, adapter), those are kept in float32."""
    if any(not p.requires_grad for p in model.parameters()):
        # before Fabric wraps the model: DDP's gradient buckets and FSDP's shards take the dtypes they find
        keep_trainable_in_fp32(model)
    model.activation_checkpointing = config.activation_checkpointing
    model = fabric.setup_module(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    return model, fabric.setup_optimizers(optimizer)


def keep_trainable_in_fp32(model: torch.nn.Module) -> None:
    """Frozen weights stay in bf16 (half the memory); the few trainable ones are kept in float32 so small
    updates are not lost to bf16 rounding."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
