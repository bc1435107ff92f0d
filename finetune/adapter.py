"""Finetune LLaMA with LLaMA-Adapter (v1, or v2 with --adapter_version 2) on an instruction dataset (one GPU
in bf16, or several through Fabric).

    python scripts/prepare_alpaca.py --checkpoint_dir checkpoints/lit-llama/7B
    python finetune/adapter.py --checkpoint_dir checkpoints/lit-llama/7B

Writes adapter-only checkpoints (a few MB) and metrics.csv to --out_dir; see howto/finetune_adapter.md.
"""

import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.adapter import AdapterConfig, AdapterLLaMA, adapter_state_dict, mark_only_adapter_as_trainable
from lit_llama.prompts import prompt_style_of_data
from lit_llama.quantize import check_quantize, frozen_weight_bytes, quantize_frozen_linears
from lit_llama.training import (
    TrainingConfig,
    claim_out_dir,
    fit,
    full_state_dict,
    launch,
    load_device,
    load_tokenizer_and_data,
    make_fabric,
    resolve_max_seq_length,
    setup_model_and_optimizer,
)
from lit_llama.utils import (
    CheckpointPaths,
    UserError,
    default_precision,
    load_model,
    num_parameters,
    precision_dtype,
    resolve_checkpoint,
    run_cli,
    save_atomic,
)

FINAL_NAME = "lit-llama-adapter-finetuned.pth"
WARMUP_EPOCHS = 2  # the article's (and LLaMA-Adapter's) default warmup
DEFAULT_START_LAYER = 2  # the article's: the two lowest layers keep plain attention


def setup(
    checkpoint_dir: Optional[Path] = Path("checkpoints/lit-llama/7B"),
    data_dir: Path = Path("data/alpaca"),
    out_dir: Optional[Path] = None,
    precision: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    cpu_offload: bool = False,
    quantize: Optional[str] = None,
    logger_name: str = "csv",
    learning_rate: float = 9e-3,
    batch_size: int = 128,
    micro_batch_size: int = 4,
    max_iters: Optional[int] = None,
    epochs: float = 5,
    warmup_iters: Optional[int] = None,
    weight_decay: float = 0.02,
    max_seq_length: Optional[int] = None,
    adapter_prompt_length: int = 10,
    adapter_start_layer: Optional[int] = None,
    adapter_version: int = 1,
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
    """Finetunes a pretrained checkpoint with LLaMA-Adapter. Defaults are the article's (7B on one GPU).

    Args:
        checkpoint_dir: Converted base model folder (lit-llama.pth, lit_config.json, tokenizer.model).
        data_dir: Folder with train.pt and test.pt from scripts/prepare_alpaca.py or prepare_dolly.py.
        out_dir: Where checkpoints and logs/version_N/metrics.csv go; default out/adapter/alpaca
            (out/adapter_v2/alpaca with --adapter_version 2).
        precision: bf16-true (default on a GPU with bf16: frozen weights in bf16, adapter weights in float32),
            32-true (default on CPU), 16-mixed or bf16-mixed.
        devices: GPUs (or CPU processes) per node.
        num_nodes: Machines; multi-node runs are started on each machine by torchrun or SLURM (see
            howto/multi_gpu.md).
        strategy: auto (FSDP over several devices, nothing to distribute on one), fsdp (FSDP2: the frozen base
            and the adapter weights sharded per transformer block among the devices; also on one device) or ddp (every
            device holds the whole model; gradients are averaged).
        cpu_offload: With FSDP, keep the weight shards and the optimizer step in CPU memory and copy each block
            to the GPU when it runs: fits larger models, runs slower.
        quantize: nf4: store the frozen linear weights of the transformer blocks in 4-bit NormalFloat (QLoRA;
            about 0.52 bytes per weight instead of 2 in bf16). One device only. Needs torchao.
        logger_name: Where metrics go: csv (metrics.csv only), tensorboard (also logs/version_N/, for
            `tensorboard --logdir <out_dir>/logs`) or wandb (also Weights & Biases; WANDB_MODE=offline keeps it local).
        learning_rate: Peak AdamW learning rate.
        batch_size: Examples per optimizer step over all devices (gradient accumulation makes up the rest).
        micro_batch_size: Examples per forward/backward pass on one device; lower it if memory runs out.
        max_iters: Micro-batch iterations per device; default: --epochs over the training set.
        epochs: Passes over the training set when --max_iters is not given.
        warmup_iters: Optimizer steps of linear learning-rate warmup (then cosine decay); default: 2 epochs'
            worth (2 x training examples / --batch_size), never more than the run's optimizer steps.
        weight_decay: AdamW weight decay.
        max_seq_length: Longest training sequence in tokens; longer examples are cut. Default: 512, or the
            model's context if shorter.
        adapter_prompt_length: Learnable prompt vectors per adapted layer.
        adapter_start_layer: First layer with a prompt (0-based); the layers below keep plain attention. Default:
            2 (the article's), or the last layer of a model with fewer than 3 layers.
        adapter_version: 1 (LLaMA-Adapter) or 2 (LLaMA-Adapter v2: also a scale and bias on every linear
            layer of the blocks and trainable RMSNorm weights).
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
            about 10% slower).
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
    if adapter_start_layer is None:
        adapter_start_layer = min(DEFAULT_START_LAYER, paths.config.n_layer - 1)
    try:
        adapter = AdapterConfig.from_config(
            paths.config,
            adapter_prompt_length=adapter_prompt_length,
            adapter_start_layer=adapter_start_layer,
            adapter_version=adapter_version,
        )
    except ValueError as e:
        raise UserError(f"--{e}")  # AdapterConfig's messages start with the field's (= the flag's) name
    if out_dir is None:
        out_dir = Path("out/adapter/alpaca" if adapter_version == 1 else "out/adapter_v2/alpaca")
    training = TrainingConfig(
        learning_rate=learning_rate, batch_size=batch_size, micro_batch_size=micro_batch_size, max_iters=max_iters,
        epochs=epochs, warmup_iters=warmup_iters, weight_decay=weight_decay,
        max_seq_length=resolve_max_seq_length(max_seq_length, block_size, paths.config),
        eval_interval=eval_interval, eval_iters=eval_iters, save_interval=save_interval, log_interval=log_interval,
        seed=seed, activation_checkpointing=activation_checkpointing, chunked_ce=chunked_ce,
        group_by_length=group_by_length,
    )
    precision = precision or default_precision()
    dtype = precision_dtype(precision)  # the dtype the frozen weights are loaded in
    check_quantize(quantize, devices * num_nodes, strategy)
    fabric = make_fabric(devices, num_nodes, strategy, precision, out_dir, cpu_offload, logger_name)
    run_info = {"method": "adapter", "model": asdict(paths.config), "adapter": asdict(adapter), "quantize": quantize,
                "batches": training.batch_settings(), "training": training.run_settings(precision, data_dir)}
    with claim_out_dir(out_dir, resume, run_info, fabric.world_size):
        launch(fabric, main, paths, dtype, run_info, adapter, training, data_dir, out_dir, resume, quantize)


def main(
    fabric: L.Fabric,
    paths: CheckpointPaths,
    dtype: torch.dtype,
    run_info: Dict[str, Any],
    adapter: AdapterConfig,
    training: TrainingConfig,
    data_dir: Path,
    out_dir: Path,
    resume: bool,
    quantize: Optional[str],
) -> None:
    tokenizer, train_data, val_data = load_tokenizer_and_data(fabric, paths, data_dir, training.seed)
    prompt_style = prompt_style_of_data(data_dir)  # recorded in the adapter file for generate/adapter.py
    if training.warmup_iters is None:  # fit() clamps it to the run's optimizer steps
        training = replace(training, warmup_iters=WARMUP_EPOCHS * len(train_data) // training.batch_size)

    adapter_model = load_model(replace(paths, config=adapter), load_device(fabric, quantize), dtype, AdapterLLaMA)
    mark_only_adapter_as_trainable(adapter_model)
    if quantize:
        quantize_frozen_linears(adapter_model, fabric.device)
        fabric.print(f"Frozen block weights in NF4: {frozen_weight_bytes(adapter_model):.3f} bytes per weight")
    fabric.print(
        f"LLaMA-Adapter v{adapter.adapter_version} (prompt length {adapter.adapter_prompt_length}, from layer "
        f"{adapter.adapter_start_layer}): {num_parameters(adapter_model, requires_grad=True):,} trainable of "
        f"{num_parameters(adapter_model):,} parameters"
    )
    model, optimizer = setup_model_and_optimizer(fabric, adapter_model, training)

    def save_adapter(path: Path) -> None:
        trainable = full_state_dict(adapter_model, trainable_only=True)  # under FSDP gathered from every rank
        if fabric.global_rank == 0:
            save_atomic(adapter_state_dict(adapter_model, trainable, prompt_style), path)
            fabric.print(f"Saved adapter weights to {path}")

    fit(fabric, model, optimizer, train_data, val_data, tokenizer, training, out_dir, save_adapter, FINAL_NAME, resume,
        run_info=run_info)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(setup)
