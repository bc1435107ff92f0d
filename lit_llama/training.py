"""The finetuning loop shared by finetune/lora.py, finetune/adapter.py and finetune/full.py.

Each script builds its model, says which parameters train and how to save them; everything else lives
here once: the strategy (one device, DDP or FSDP2 sharding), batching (padded to the longest sequence in
the batch), the learning-rate schedule, gradient accumulation, validation with a greedy sample,
checkpointing, resuming, the progress bar and CSV metrics.
"""

import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import lightning as L
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from lightning.fabric.loggers import CSVLogger, Logger
from lightning.fabric.strategies import ModelParallelStrategy, Strategy
from lightning.fabric.wrappers import _FabricModule, _FabricOptimizer
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from lit_llama.data import IGNORE_INDEX, load_prepared
from lit_llama.generation import generate_response
from lit_llama.prompts import DEFAULT_PROMPT_STYLE
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import CheckpointPaths, UserError, check_vocab

Sample = Dict[str, Any]
RESUME_NAME = "resume.pth"  # trainable weights, optimizer, counters and RNG of the last save
RESUME_META = "meta.pth"  # in a sharded resume folder: the counters and RNG beside the shards
STRATEGIES = ("auto", "ddp", "fsdp")  # what every finetune script offers; the tests run each one


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
    sharded_resume: bool = False,
) -> Dict[str, float]:
    """Trains for `config.total_iters(...)` micro-batch iterations. `save_weights(path)` writes the
    method's own checkpoint (LoRA-only, adapter-only or full weights) and is called on every rank (under
    FSDP the weights are gathered); `final_name` is the last one's file name. `sharded_resume` writes the
    resume state as one folder of per-rank shards instead of one file. Returns the final metrics."""
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

    state = {"iter_num": 0, "step_count": 0, "tokens": 0, "train_seconds": 0.0}  # what --resume restores
    fit_start = time.perf_counter()
    resume_path = out_dir / RESUME_NAME
    if resume:
        if not resume_path.exists():
            raise UserError(f"--resume: {resume_path} not found; there is no earlier run to continue")
        state = load_resume_state(fabric, model, optimizer, resume_path)
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
        skip_sync = is_accumulating and not is_fsdp(fabric)
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
                save_resume_state(fabric, model, optimizer, state, resume_path, sharded_resume)

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
    save_resume_state(fabric, model, optimizer, state, resume_path, sharded_resume)
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
    if sharded:
        dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=tmp)
        if fabric.global_rank == 0:
            torch.save(meta, tmp / RESUME_META)
    elif fabric.global_rank == 0:
        torch.save({"model": weights, "optimizer": optimizer_state, **meta}, tmp)
    fabric.barrier()
    if fabric.global_rank == 0:
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    fabric.barrier()


def load_resume_state(
    fabric: L.Fabric, model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path
) -> Dict[str, Any]:
    """Restores what `save_resume_state` wrote (a file or a sharded folder, on any strategy) into the set-up
    model and optimizer, and this rank's random generators; returns the counters. Only tensors and plain
    values are read (`weights_only`): a resume file cannot run code."""
    try:
        if path.is_dir():
            # the set-up model's own (sharded) state dicts are the templates the shards are read into
            weights, optimizer_state = get_state_dict(
                unwrap(model), unwrap(optimizer), options=StateDictOptions(ignore_frozen_params=True)
            )
            saved = {"model": weights, "optimizer": optimizer_state}
            dcp.load(saved, checkpoint_id=path)
            meta = torch.load(path / RESUME_META, weights_only=True)
            options = StateDictOptions(ignore_frozen_params=True)
        else:
            saved = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
            meta = saved
            options = StateDictOptions(full_state_dict=True, strict=False)  # frozen weights are not in it
    except Exception as e:  # noqa: BLE001 - any unreadable resume state is the user's file
        raise UserError(f"--resume: {path} is not a resume state this version can read ({type(e).__name__}: {e})")
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
    dcp.save({"model": get_model_state_dict(unwrap(model))}, checkpoint_id=tmp)
    fabric.barrier()
    if fabric.global_rank == 0:
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
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
    """Fabric with the devices, strategy (see `choose_strategy`), precision and logger (see `make_logger`) of a run."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count() or 1
    if devices < 1 or num_nodes < 1:
        raise UserError(f"--devices and --num_nodes must be at least 1, got {devices} and {num_nodes}")
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
        loggers=logger,
    )


LOGGER_NAMES = ("csv", "tensorboard", "wandb")


def make_logger(logger_name: str, out_dir: Path) -> Logger:
    """Where the metrics of a run go. csv (default): out_dir/logs/version_N/metrics.csv. tensorboard:
    out_dir/logs/version_N/events.out.tfevents.* (`tensorboard --logdir out_dir/logs`). wandb: a Weights & Biases
    run, its local files in out_dir/wandb; with WANDB_MODE=offline nothing leaves the machine (`wandb sync` uploads
    the run later)."""
    if logger_name == "csv":
        return CSVLogger(root_dir=out_dir, name="logs", flush_logs_every_n_steps=10)
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


def load_device(fabric: L.Fabric) -> torch.device:
    """Where a script loads the weights: under FSDP into CPU memory, from which sharding moves each block's
    shard to its device (no GPU ever holds the whole model); else straight onto the device."""
    return torch.device("cpu") if is_fsdp(fabric) else fabric.device


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
