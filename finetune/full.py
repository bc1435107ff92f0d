"""Finetune every weight of LLaMA on an instruction dataset (FSDP2 over several GPUs, or one device).

    python scripts/prepare_alpaca.py --checkpoint_dir checkpoints/lit-llama/7B
    python finetune/full.py --checkpoint_dir checkpoints/lit-llama/7B --devices 4

Writes full checkpoints (as large as the base model), lit_config.json, tokenizer.model and metrics.csv to
--out_dir, so `python generate/full.py --checkpoint_path OUT_DIR/lit-llama-full-finetuned.pth` needs nothing
else; see howto/finetune_full.md.
"""

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.training import (
    TrainingConfig,
    claim_out_dir,
    choose_strategy,
    fit,
    full_state_dict,
    launch,
    load_device,
    load_tokenizer_and_data,
    make_fabric,
    resolve_max_seq_length,
    save_sharded_weights,
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
    write_text_atomic,
)

FINAL_NAME = "lit-llama-full-finetuned.pth"
STATE_DICT_TYPES = ("full", "sharded")


def setup(
    checkpoint_dir: Optional[Path] = Path("checkpoints/lit-llama/7B"),
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/full/alpaca"),
    precision: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    cpu_offload: bool = False,
    logger_name: str = "csv",
    state_dict_type: str = "full",
    learning_rate: float = 3e-5,
    batch_size: int = 128,
    micro_batch_size: int = 4,
    max_iters: Optional[int] = None,
    epochs: float = 5,
    warmup_iters: int = 100,
    weight_decay: float = 0.0,
    max_seq_length: Optional[int] = None,
    eval_interval: int = 100,
    eval_iters: int = 100,
    save_interval: int = 100,
    log_interval: int = 1,
    seed: int = 1337,
    activation_checkpointing: bool = False,
    chunked_ce: bool = False,
    group_by_length: bool = False,
    resume: bool = False,
    pretrained_path: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
    block_size: Optional[int] = None,
) -> None:
    """Finetunes all weights of a pretrained checkpoint. Defaults are the article's (7B on 4 GPUs with FSDP).

    Args:
        checkpoint_dir: Converted base model folder (lit-llama.pth, lit_config.json, tokenizer.model).
        data_dir: Folder with train.pt and test.pt from scripts/prepare_alpaca.py or prepare_dolly.py.
        out_dir: Where checkpoints, lit_config.json, tokenizer.model and logs/version_N/metrics.csv go.
        precision: bf16-mixed (default on a GPU with bf16: float32 weights and optimizer states, bf16
            computation), bf16-true (half the memory, but bf16 weights round away most updates of a
            learning rate this small), 32-true (default on CPU) or 16-mixed.
        devices: GPUs (or CPU processes) per node.
        num_nodes: Machines; multi-node runs are started on each machine by torchrun or SLURM (see
            howto/multi_gpu.md).
        strategy: auto (FSDP over several devices, nothing to distribute on one), fsdp (FSDP2: weights,
            gradients and AdamW states sharded per transformer block among the devices; also on one device)
            or ddp (every device holds the whole model and its AdamW states; gradients are averaged).
        cpu_offload: With FSDP, keep the weight shards, gradients and AdamW states in CPU memory and copy each
            block to the GPU when it runs: fits larger models, runs slower.
        logger_name: Where metrics go: csv (logs/version_N/metrics.csv), tensorboard (logs/version_N/, for
            `tensorboard --logdir <out_dir>/logs`) or wandb (Weights & Biases; WANDB_MODE=offline keeps it local).
        state_dict_type: With FSDP: full (each checkpoint one file, gathered on rank 0) or sharded (a folder
            with one file per process: faster to write, no gathering; generate/full.py reads both; the resume
            state is sharded the same way).
        learning_rate: Peak AdamW learning rate.
        batch_size: Examples per optimizer step over all devices (gradient accumulation makes up the rest).
        micro_batch_size: Examples per forward/backward pass on one device; lower it if memory runs out.
        max_iters: Micro-batch iterations per device; default: --epochs over the training set.
        epochs: Passes over the training set when --max_iters is not given.
        warmup_iters: Optimizer steps of linear learning-rate warmup (then cosine decay).
        weight_decay: AdamW weight decay.
        max_seq_length: Longest training sequence in tokens; longer examples are cut. Default: 512, or the
            model's context if shorter.
        eval_interval: Optimizer steps between validation (loss and one greedy sample).
        eval_iters: Validation micro-batches per validation.
        save_interval: Optimizer steps between checkpoints.
        log_interval: Iterations between metric rows.
        seed: Random seed (same seed, same losses).
        activation_checkpointing: Recompute each block's activations in the backward pass instead of storing
            them: much less memory for long sequences, about a third more compute.
        chunked_ce: Compute the loss through the output layer 256 positions at a time, recomputing each chunk's
            logits in the backward pass, so the (positions x vocabulary) float32 logits never exist at once: the
            same loss and gradients with less memory (measured on a CPU: the step's peak 0.30 -> 0.25 GB, steps
            about 10% slower). With bf16-mixed the chunks run outside autocast, in float32.
        group_by_length: Put examples of similar length in the same micro-batch (sorted by length within windows
            of 64 micro-batches, which are then shuffled): less padding, so faster steps (measured on a CPU: 33%
            -> 4% padded positions, 1.31x tokens/s, but a step peak 0.30 -> 0.44 GB: the longest micro-batch
            holds four long examples); still every example once per epoch, and resumable.
        resume: Continue the run in --out_dir from its last checkpoint.
        pretrained_path: Lit-LLaMA's original flag: the base weights .pth (instead of --checkpoint_dir).
        tokenizer_path: Lit-LLaMA's original flag: the tokenizer (default: beside the weights).
        block_size: Deprecated name of --max_seq_length.
    """
    paths = resolve_checkpoint(checkpoint_dir, pretrained_path, tokenizer_path)
    training = TrainingConfig(
        learning_rate=learning_rate, batch_size=batch_size, micro_batch_size=micro_batch_size, max_iters=max_iters,
        epochs=epochs, warmup_iters=warmup_iters, weight_decay=weight_decay,
        max_seq_length=resolve_max_seq_length(max_seq_length, block_size, paths.config),
        eval_interval=eval_interval, eval_iters=eval_iters, save_interval=save_interval, log_interval=log_interval,
        seed=seed, activation_checkpointing=activation_checkpointing, chunked_ce=chunked_ce,
        group_by_length=group_by_length,
    )
    precision = precision or default_training_precision()
    dtype = precision_dtype(precision)  # the dtype the weights are loaded (and trained) in
    if state_dict_type not in STATE_DICT_TYPES:
        raise UserError(f"--state_dict_type {state_dict_type!r} is not one of {', '.join(STATE_DICT_TYPES)}")
    sharded = state_dict_type == "sharded"
    if sharded and choose_strategy(strategy, devices, num_nodes, precision) in ("auto", "ddp"):
        raise UserError("--state_dict_type sharded needs FSDP (--strategy fsdp, or --devices > 1); without it "
                        "checkpoints are always one full file")
    fabric = make_fabric(devices, num_nodes, strategy, precision, out_dir, cpu_offload, logger_name)
    run_info = {"method": "full", "model": asdict(paths.config), "batches": training.batch_settings(),
                "training": training.run_settings(precision, data_dir)}
    with claim_out_dir(out_dir, resume, run_info, fabric.world_size):
        launch(fabric, main, paths, dtype, run_info, training, data_dir, out_dir, resume, sharded)


def default_training_precision() -> str:
    """bf16-mixed on a GPU with bf16: weights and AdamW states stay float32, since an AdamW step of about the
    learning rate (3e-5) is less than half the bf16 spacing at a weight of 0.02 (1.2e-4): rounded away."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return default_precision()


def main(
    fabric: L.Fabric,
    paths: CheckpointPaths,
    dtype: torch.dtype,
    run_info: Dict[str, Any],
    training: TrainingConfig,
    data_dir: Path,
    out_dir: Path,
    resume: bool,
    sharded: bool,
) -> None:
    tokenizer, train_data, val_data = load_tokenizer_and_data(fabric, paths, data_dir, training.seed)

    model = load_model(paths, load_device(fabric), dtype)
    fabric.print(f"Full finetuning: all {num_parameters(model):,} parameters train")
    model, optimizer = setup_model_and_optimizer(fabric, model, training)

    if fabric.global_rank == 0:  # so that the checkpoints in out_dir describe themselves
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(paths.config.to_json_text(), out_dir / CONFIG_NAME)
        copy_tokenizer(paths.tokenizer, out_dir)

    def save_full(path: Path) -> None:
        if sharded:  # FSDP only (see setup)
            save_sharded_weights(fabric, model, path)
        else:
            state_dict = full_state_dict(model)  # under FSDP gathered block by block into rank 0's CPU memory
            if fabric.global_rank == 0:
                save_atomic(state_dict, path)  # the same keys as a base lit-llama.pth
            fabric.barrier()
        fabric.print(f"Saved the finetuned weights to {path}")

    fit(fabric, model, optimizer, train_data, val_data, tokenizer, training, out_dir, save_full, FINAL_NAME, resume,
        sharded_resume=sharded, run_info=run_info)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(setup)
