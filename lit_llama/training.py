"""The finetuning loop shared by LoRA, the adapter and full finetuning (see lit_llama/finetune.py): batches
(padded to the longest sequence in the batch; optionally of examples of similar length, or packed into full
rows), the loss (optionally
in chunks), the learning-rate schedule, gradient accumulation, validation with a greedy sample, checkpoints at
intervals, the progress bar and metrics.csv.
"""

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from lightning.fabric.loggers import Logger
from tqdm import tqdm

from lit_llama.args import EvalArgs, TrainArgs
from lit_llama.batches import Sample, batch_indices, example_lengths, pack_batch, pad_batch
from lit_llama.cli import UserError, check_at_least, check_positive, check_range, describe_exception
from lit_llama.data import IGNORE_INDEX
from lit_llama.disk import disk_errors, write_text_atomic
from lit_llama.distributed import is_fsdp, peak_memory_gb, unwrap
from lit_llama.generation import generate_response
from lit_llama.prompts import DEFAULT_PROMPT_STYLE
from lit_llama.run_dir import (
    METRICS_NAME,
    RESUME_NAME,
    RUN_NAME,
    find_resume_state,
    load_resume_state,
    save_resume_state,
)
from lit_llama.tokenizer import Tokenizer

METRICS_FIELDS = ("iter", "tokens", "train_loss", "val_loss", "lr", "tokens_per_sec", "peak_memory")


@dataclass(kw_only=True)
class TrainingConfig(TrainArgs, EvalArgs):
    """What the loop needs: the training and evaluation flags (each described in lit_llama/args.py), with
    `max_seq_length` resolved against the model (see finetune.resolve_max_seq_length) and `warmup_iters`
    against the data."""

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
                for name in ("seed", "batch_size", "micro_batch_size", "max_seq_length", "group_by_length")} | (
                    {"packing": True} if self.packing else {})  # only when on: run.json files from before match

    def run_settings(self, precision: str, data_dir: Path) -> Dict[str, Any]:
        """The other settings that change what a run computes (the schedule, the optimizer, the numbers'
        precision and the data): run.json records them too, and --resume refuses other values."""
        return {"learning_rate": self.learning_rate, "weight_decay": self.weight_decay,
                "warmup_iters": self.warmup_iters, "max_iters": self.max_iters, "epochs": self.epochs,
                "precision": precision, "data_dir": str(Path(data_dir).resolve())} | (
                    {"compile": True} if self.compile else {})  # its dropout draws are not eager's

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


# --- the loss ----------------------------------------------------------------------------------------


def compute_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    chunked_ce: bool = False,
    tasks: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Next-token cross-entropy over the scored positions. Position t predicts token t+1, and only the
    positions whose next token is scored (the response, with --mask_inputs) go through the output layer.
    `chunked_ce`: through the output layer a chunk of positions at a time (see `chunked_cross_entropy`).
    `tasks` (a task index per row: several LoRAs at once, lit_llama/multi_task.py): the sum of each task's mean,
    so each task's adapter gets the gradient of its own mean loss, as if its rows were a batch of their own.
    `positions`: packed rows (see `pack_batch`)."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    output_mask = F.pad(scored, (0, 1), value=False)
    weights = None if tasks is None else task_mean_weights(scored, tasks)
    if chunked_ce:
        hidden = model(input_ids, output_mask=output_mask, head=False, positions=positions)  # (N, n_embd)
        total = chunked_cross_entropy(unwrap(model).lm_head, hidden, targets[scored], weights=weights)
    else:
        logits = model(input_ids, output_mask=output_mask, positions=positions)  # (N, vocab)
        total = _summed_cross_entropy(lambda h: h, logits, targets[scored], weights)
    return total if weights is not None else total / scored.sum().clamp(min=1)


def task_mean_weights(scored: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """Per scored position (in `scored`'s row-major order), 1 / the number of scored positions of its row's task."""
    per_row = scored.sum(dim=1)
    per_task = per_row.new_zeros(int(tasks.max()) + 1).index_add_(0, tasks, per_row)
    row_weight = 1.0 / per_task.clamp(min=1).float()[tasks]
    return row_weight[:, None].expand_as(scored)[scored]


def route_rows(fabric: L.Fabric, model: torch.nn.Module, samples: List[Sample]) -> Optional[torch.Tensor]:
    """Several LoRAs trained at once (lit_llama/multi_task.py): each sample names its task, and the model is told
    which task (which adapter) each row of the batch is. Returns the rows' tasks (for `compute_loss`), or None
    when the samples name none (every other run)."""
    if "task" not in samples[0]:
        return None
    tasks = torch.tensor([s["task"] for s in samples], device=fabric.device)
    unwrap(model).route_rows(tasks)
    return tasks


CE_CHUNK_ROWS = 256  # positions whose logits exist at once with chunked cross-entropy


def chunked_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                          chunk_rows: int = CE_CHUNK_ROWS, *, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The summed cross-entropy of `head(hidden)` against `targets`, `chunk_rows` positions at a time: each
    chunk's (chunk_rows, vocab) logits are freed after its loss and recomputed in the backward pass, so
    the full (N, vocab) float32 logits never exist. Costs one more forward pass of the output layer. `weights`:
    one per position, multiplying its cross-entropy (see `compute_loss`'s tasks)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    chunk_weights = [None] * len(targets.split(chunk_rows)) if weights is None else weights.split(chunk_rows)
    for chunk, chunk_targets, w in zip(hidden.split(chunk_rows), targets.split(chunk_rows), chunk_weights):
        total = total + torch.utils.checkpoint.checkpoint(_summed_cross_entropy, head, chunk, chunk_targets, w,
                                                          use_reentrant=False)
    return total


def _summed_cross_entropy(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                          weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return SummedCrossEntropy.apply(head(hidden).float(), targets, weights)


class SummedCrossEntropy(torch.autograd.Function):
    """sum_i w_i * cross_entropy(logits_i, target_i) (w_i = 1 without weights), as F.cross_entropy computes it
    (within float32 rounding), in a third of its extra time: the (N, vocab) logits are turned into exp(logit -
    row max) in place, which the backward pass scales in place into the gradient, softmax - one-hot. F.cross_entropy
    writes a log-softmax, then a zero-filled gradient, then the softmax gradient: three more passes over a tensor
    that, at 2,048 positions x 32k vocabulary, is 262 MB. On the 2-core CPU the loss of a 4x512 LoRA step cost
    ~270 ms beside F.cross_entropy's and ~70 ms beside this. The logits are overwritten: the caller made them for
    the loss alone (the output layer's backward needs its input and weight, not its output)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        target_logits = logits.gather(1, targets[:, None]).squeeze(1)
        row_max = logits.amax(dim=1, keepdim=True)
        exp = logits.sub_(row_max).exp_()  # in place: the softmax up to each row's sum
        row_sum = exp.sum(dim=1)
        losses = row_max.squeeze(1) + row_sum.log() - target_logits
        ctx.save_for_backward(exp, row_sum, targets, weights)
        return losses.sum() if weights is None else (losses * weights).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        exp, row_sum, targets, weights = ctx.saved_tensors
        grad_rows = grad.expand(row_sum.shape) if weights is None else grad * weights
        grad_logits = exp.mul_((grad_rows / row_sum)[:, None])  # softmax, times each row's gradient
        grad_logits.scatter_add_(1, targets[:, None], -grad_rows[:, None])  # minus the one-hot
        return grad_logits, None, None


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
    batches: Optional[Callable[[TrainingConfig, int, int, int], List[int]]] = None,
) -> Dict[str, float]:
    """Trains for `config.total_iters(...)` micro-batch iterations. `save_weights(path)` writes the
    method's own checkpoint (LoRA-only, adapter-only or full weights) and is called on every rank (under
    FSDP the weights are gathered); `final_name` is the last one's file name. `sharded_resume` writes the
    resume state as one folder of per-rank shards instead of one file. `run_info` (method, model config, method
    settings) goes to run.json, for `--resume` to check (see `claim_out_dir`). `batches(config, iter_num, rank,
    world)`: the example indices of a micro-batch, if not `batch_indices`'s (several tasks at once: a share of
    each). A parameter group's "peak_lr" replaces --learning_rate for it (a task's own rate). Returns the final
    metrics."""
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
            for group in optimizer.param_groups:  # a group with its own "peak_lr" (a task's) on the same schedule
                peak = group.get("peak_lr")
                group["lr"] = lr if peak is None else get_lr(state["step_count"], peak, warmup_steps, max_steps)
            if batches is None:
                idx = batch_indices(len(train_data), config.micro_batch_size, iter_num, fabric.global_rank, world,
                                    config.seed, lengths)
            else:
                idx = batches(config, iter_num, fabric.global_rank, world)
            samples = [train_data[i] for i in idx]
            if config.packing:
                # compiled blocks take the examples' mask, which grows with the square of the row: rows there
                packed = pack_batch(samples, config.max_seq_length, one_row=not config.compile)
                input_ids, labels, positions = fabric.to_device(packed)
            else:
                input_ids, labels = fabric.to_device(pad_batch(samples, config.max_seq_length))
                positions = None
            tasks = route_rows(fabric, model, samples)

            is_accumulating = (iter_num + 1) % accumulation != 0
            # not under FSDP: skipping the sync there keeps the whole model's gradients, unsharded, on every GPU
            skip_sync = is_accumulating and not is_fsdp(fabric)
            with fabric.no_backward_sync(model, enabled=skip_sync):
                loss = compute_loss(model, input_ids, labels, config.chunked_ce, tasks, positions)
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
                    train_loss=loss.item() / (1 if tasks is None else tasks.unique().numel()),  # a task's mean
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
        samples = val_data[start : start + batch]
        input_ids, labels = fabric.to_device(pad_batch(samples, config.max_seq_length))
        tasks = route_rows(fabric, model, samples)
        loss = compute_loss(model, input_ids, labels, config.chunked_ce, tasks)
        if tasks is not None:  # the mean over the batch's tasks, comparable with a one-task run's loss
            loss = loss / tasks.unique().numel()
        if k < num_batches:
            total += torch.stack([loss, torch.ones_like(loss)])
    model.train()
    total = fabric.all_reduce(total, reduce_op="sum")
    return (total[0] / total[1]).item()


def print_sample(fabric: L.Fabric, model: torch.nn.Module, tokenizer: Tokenizer, sample: Sample) -> None:
    """Greedy response to one validation instruction: a quick look at what training does."""
    route_rows(fabric, model, [sample])  # several tasks: the row goes through its task's adapter
    response = generate_response(model, tokenizer, sample["instruction"], sample.get("input", ""), fabric.device,
                                 prompt_style=sample.get("prompt_style", DEFAULT_PROMPT_STYLE))
    fabric.print(f"Instruction: {sample['instruction']}\nResponse: {response}\n")


# --- setup helpers used by every finetune script ---------------------------------------------------


