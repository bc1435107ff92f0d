"""Finetune every weight of LLaMA on an instruction dataset (FSDP over several GPUs, or one device).

    python scripts/prepare_alpaca.py --checkpoint_dir checkpoints/lit-llama/7B
    python finetune/full.py --checkpoint_dir checkpoints/lit-llama/7B --devices 4

Writes full checkpoints (as large as the base model), lit_config.json, tokenizer.model and metrics.csv to
--out_dir, so `python generate/full.py --checkpoint_path OUT_DIR/lit-llama-full-finetuned.pth` needs nothing
else; see howto/finetune_full.md.
"""

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.strategies import FSDPStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.model import Block
from lit_llama.training import (
    TrainingConfig,
    check_out_dir,
    fit,
    load_tokenizer_and_data,
    make_fabric,
    setup_model_and_optimizer,
)
from lit_llama.utils import (
    CONFIG_NAME,
    CheckpointPaths,
    UserError,
    copy_tokenizer,
    default_precision,
    load_model,
    num_parameters,
    precision_dtype,
    resolve_checkpoint,
    run_cli,
    save_atomic,
)

FINAL_NAME = "lit-llama-full-finetuned.pth"
STRATEGIES = ("auto", "fsdp", "ddp")
STATE_DICT_TYPES = ("full", "sharded")


def setup(
    checkpoint_dir: Optional[Path] = Path("checkpoints/lit-llama/7B"),
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/full/alpaca"),
    precision: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    state_dict_type: str = "full",
    learning_rate: float = 3e-5,
    batch_size: int = 128,
    micro_batch_size: int = 4,
    max_iters: Optional[int] = None,
    epochs: float = 5,
    warmup_iters: int = 100,
    weight_decay: float = 0.0,
    block_size: int = 512,
    eval_interval: int = 100,
    eval_iters: int = 100,
    save_interval: int = 100,
    log_interval: int = 1,
    seed: int = 1337,
    activation_checkpointing: bool = False,
    resume: bool = False,
    pretrained_path: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
) -> None:
    """Finetunes all weights of a pretrained checkpoint. Defaults are the article's (7B on 4 GPUs with FSDP).

    Args:
        checkpoint_dir: Converted base model folder (lit-llama.pth, lit_config.json, tokenizer.model).
        data_dir: Folder with train.pt and test.pt from scripts/prepare_alpaca.py or prepare_dolly.py.
        out_dir: Where checkpoints, lit_config.json, tokenizer.model and logs/version_N/metrics.csv go.
        precision: bf16-mixed (default on a GPU with bf16: float32 weights and optimizer states, bf16
            computation), bf16-true (half the memory, but bf16 weights round away most updates of a
            learning rate this small), 32-true (default on CPU) or 16-mixed.
        devices: GPUs (or CPU processes) per node. More than one shards the model with FSDP.
        num_nodes: Machines; multi-node runs are launched by a cluster launcher (SLURM, torchrun).
        strategy: auto (FSDP over several GPUs: one unit and activation checkpointing per transformer block;
            DDP over several CPU processes; none on one device), fsdp (the same FSDP, also on one GPU) or ddp
            (every GPU holds the whole model and its AdamW states).
        state_dict_type: With FSDP: full (each checkpoint one file, gathered on rank 0) or sharded (a folder
            with one file per process: faster to write, no gathering; generate/full.py reads both).
        learning_rate: Peak AdamW learning rate.
        batch_size: Examples per optimizer step over all devices (gradient accumulation makes up the rest).
        micro_batch_size: Examples per forward/backward pass on one device; lower it if memory runs out.
        max_iters: Micro-batch iterations per device; default: --epochs over the training set.
        epochs: Passes over the training set when --max_iters is not given.
        warmup_iters: Optimizer steps of linear learning-rate warmup (then cosine decay).
        weight_decay: AdamW weight decay.
        block_size: Longest training sequence in tokens; longer examples are cut.
        eval_interval: Optimizer steps between validation (loss and one greedy sample).
        eval_iters: Validation micro-batches per validation.
        save_interval: Optimizer steps between checkpoints.
        log_interval: Iterations between metric rows.
        seed: Random seed (same seed, same losses).
        activation_checkpointing: On one device, recompute each block's activations in the backward pass
            instead of storing them (under FSDP this is always on).
        resume: Continue the run in --out_dir from its last checkpoint.
        pretrained_path: Lit-LLaMA's original flag: the base weights .pth (instead of --checkpoint_dir).
        tokenizer_path: Lit-LLaMA's original flag: the tokenizer (default: beside the weights).
    """
    paths = resolve_checkpoint(checkpoint_dir, pretrained_path, tokenizer_path)
    training = TrainingConfig(learning_rate, batch_size, micro_batch_size, max_iters, epochs, warmup_iters,
                              weight_decay, block_size, eval_interval, eval_iters, save_interval, log_interval, seed,
                              activation_checkpointing)
    precision = precision or default_training_precision()
    dtype = precision_dtype(precision)  # the dtype the weights are loaded (and trained) in
    check_out_dir(out_dir, resume)
    fabric = make_fabric(devices, num_nodes, choose_strategy(strategy, devices, num_nodes, state_dict_type),
                         precision, out_dir)
    fabric.launch(main, paths, dtype, training, data_dir, out_dir, resume, state_dict_type == "sharded")


def default_training_precision() -> str:
    """bf16-mixed on a GPU with bf16: weights and AdamW states stay float32, since an AdamW step of about the
    learning rate (3e-5) is less than half the bf16 spacing at a weight of 0.02 (1.2e-4): rounded away."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return default_precision()


def choose_strategy(strategy: str, devices: int, num_nodes: int, state_dict_type: str) -> Any:
    """The Fabric strategy: over several GPUs, FSDP sharded per transformer block."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if state_dict_type not in STATE_DICT_TYPES:
        raise UserError(f"--state_dict_type {state_dict_type!r} is not one of {', '.join(STATE_DICT_TYPES)}")
    several = devices > 1 or num_nodes > 1
    fsdp = strategy == "fsdp" or (strategy == "auto" and several)
    if fsdp and not torch.cuda.is_available():
        if strategy == "fsdp":
            raise UserError("--strategy fsdp needs GPUs; on CPU use --strategy ddp (or auto)")
        # Neither Lightning nor PyTorch shards over CPU processes: Fabric(accelerator="cpu",
        # strategy=FSDPStrategy(...)) raises "FSDP is only available on GPU", and torch's FSDP itself
        # "FSDP needs a non-CPU accelerator device" (torch 2.13, lightning 2.6). Every CPU process then
        # holds the whole model and DDP (gloo) averages the gradients: same results, no memory saved.
        fsdp, strategy = False, "ddp"
    if state_dict_type == "sharded" and not fsdp:
        raise UserError("--state_dict_type sharded needs FSDP (--devices > 1 on GPUs); without it checkpoints are "
                        "always one full file")
    if not fsdp:
        return strategy
    return FSDPStrategy(
        auto_wrap_policy={Block},  # one FSDP unit per transformer block: only one block is ever gathered whole
        activation_checkpointing_policy={Block},  # recompute each block's activations in the backward pass
        state_dict_type=state_dict_type,
        # sharding_strategy FULL_SHARD (the default): weights, gradients and AdamW states all sharded
    )


def main(
    fabric: L.Fabric,
    paths: CheckpointPaths,
    dtype: torch.dtype,
    training: TrainingConfig,
    data_dir: Path,
    out_dir: Path,
    resume: bool,
    sharded: bool,
) -> None:
    tokenizer, train_data, val_data = load_tokenizer_and_data(fabric, paths, data_dir, training.seed)

    fsdp = isinstance(fabric.strategy, FSDPStrategy)
    # With FSDP every process loads the weights into CPU memory and `setup_module` moves them to its GPU one
    # block at a time, keeping only its shard: no GPU ever holds the whole model.
    model = load_model(paths, torch.device("cpu") if fsdp else fabric.device, dtype)
    fabric.print(f"Full finetuning: all {num_parameters(model):,} parameters train")
    model, optimizer = setup_model_and_optimizer(fabric, model, training)

    if fabric.global_rank == 0:  # so that the checkpoints in out_dir describe themselves
        out_dir.mkdir(parents=True, exist_ok=True)
        paths.config.to_json(out_dir / CONFIG_NAME)
        copy_tokenizer(paths.tokenizer, out_dir)

    def save_full(path: Path) -> None:
        if sharded:  # FSDP only (see choose_strategy)
            save_sharded(fabric, model, path)
        else:
            # Fabric keeps the FSDP (or DDP) wrapped model as `_forward_module`; from it this gathers the
            # shards block by block into rank 0's CPU memory (the other ranks get an empty dict)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state_dict = get_model_state_dict(model._forward_module, options=options)
            if fabric.global_rank == 0:
                save_atomic(state_dict, path)  # the same keys as a base lit-llama.pth
            fabric.barrier()
        fabric.print(f"Saved the finetuned weights to {path}")

    fit(fabric, model, optimizer, train_data, val_data, tokenizer, training, out_dir, save_full, FINAL_NAME, resume)


def save_sharded(fabric: L.Fabric, model: torch.nn.Module, path: Path) -> None:
    """A torch.distributed.checkpoint folder (one file of weights per process, plus meta.pt), written under
    a temporary name and renamed when complete."""
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(tmp, {"model": model})
    fabric.barrier()
    if fabric.global_rank == 0:
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    fabric.barrier()


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(setup)
