"""Finetune LLaMA with LoRA on an instruction dataset (one GPU in bf16, or several through Fabric).

    python scripts/prepare_alpaca.py --checkpoint_dir checkpoints/lit-llama/7B
    python finetune/lora.py --checkpoint_dir checkpoints/lit-llama/7B

Writes LoRA-only checkpoints (a few MB) and metrics.csv to --out_dir; see howto/finetune_lora.md.
"""

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.lora import LoRAConfig, LoRALLaMA, base_fingerprint, lora_state_dict, mark_only_lora_as_trainable
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

FINAL_NAME = "lit-llama-lora-finetuned.pth"


def setup(
    checkpoint_dir: Optional[Path] = Path("checkpoints/lit-llama/7B"),
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/lora/alpaca"),
    precision: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    cpu_offload: bool = False,
    quantize: Optional[str] = None,
    logger_name: str = "csv",
    learning_rate: float = 3e-4,
    batch_size: int = 128,
    micro_batch_size: int = 4,
    max_iters: Optional[int] = None,
    epochs: float = 5,
    warmup_iters: int = 100,
    weight_decay: float = 0.0,
    max_seq_length: Optional[int] = None,
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    lora_rslora: bool = False,
    lora_dora: bool = False,
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
    """Finetunes a pretrained checkpoint with LoRA. Defaults are the article's (7B on one 24 GB GPU).

    Args:
        checkpoint_dir: Converted base model folder (lit-llama.pth, lit_config.json, tokenizer.model).
        data_dir: Folder with train.pt and test.pt from scripts/prepare_alpaca.py or prepare_dolly.py.
        out_dir: Where checkpoints and logs/version_N/metrics.csv go.
        precision: bf16-true (default on a GPU with bf16: frozen weights in bf16, LoRA weights in float32),
            32-true (default on CPU), 16-mixed or bf16-mixed.
        devices: GPUs (or CPU processes) per node.
        num_nodes: Machines; multi-node runs are started on each machine by torchrun or SLURM (see
            howto/multi_gpu.md).
        strategy: auto (FSDP over several devices, nothing to distribute on one), fsdp (FSDP2: the frozen base
            and the LoRA weights sharded per transformer block among the devices; also on one device) or ddp (every
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
        warmup_iters: Optimizer steps of linear learning-rate warmup (then cosine decay).
        weight_decay: AdamW weight decay.
        max_seq_length: Longest training sequence in tokens; longer examples are cut. Default: 512, or the
            model's context if shorter.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha; updates are scaled by alpha / r.
        lora_dropout: Dropout on the LoRA branch's input.
        lora_query: Adapt the attention query projection.
        lora_key: Adapt the attention key projection.
        lora_value: Adapt the attention value projection.
        lora_projection: Adapt the attention output projection.
        lora_mlp: Adapt the three MLP projections.
        lora_head: Adapt the output layer. Refused for a model with tied input/output embeddings (SmolLM2,
            Llama 3.2, Qwen2.5 up to 3B): merged, it would change the input embedding too.
        lora_rslora: Rank-stabilised LoRA: scale updates by alpha / sqrt(r) instead of alpha / r (larger ranks
            then learn as fast as small ones).
        lora_dora: DoRA: also train a magnitude per output row of each adapted layer; the LoRA update then only
            changes the weight's direction. Somewhat slower steps; merges like LoRA.
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
    try:
        lora = LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, query=lora_query, key=lora_key,
                          value=lora_value, projection=lora_projection, mlp=lora_mlp, head=lora_head,
                          rslora=lora_rslora, dora=lora_dora)
    except ValueError as e:
        raise UserError(f"--lora_{e}")  # LoRAConfig's messages start with the field's (= the flag's) name
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
    run_info = {"method": "lora", "model": asdict(paths.config), "lora": asdict(lora), "quantize": quantize,
                "batches": training.batch_settings(), "training": training.run_settings(precision, data_dir)}
    with claim_out_dir(out_dir, resume, run_info, fabric.world_size):
        launch(fabric, main, paths, dtype, run_info, lora, training, data_dir, out_dir, resume, quantize)


def main(
    fabric: L.Fabric,
    paths: CheckpointPaths,
    dtype: torch.dtype,
    run_info: Dict[str, Any],
    lora: LoRAConfig,
    training: TrainingConfig,
    data_dir: Path,
    out_dir: Path,
    resume: bool,
    quantize: Optional[str],
) -> None:
    tokenizer, train_data, val_data = load_tokenizer_and_data(fabric, paths, data_dir, training.seed)
    prompt_style = prompt_style_of_data(data_dir)  # recorded in the LoRA file: generate/lora.py prompts the same way
    base_model = base_fingerprint(paths.weights)  # recorded too: the LoRA file is refused on another base model

    lora_model = load_model(paths, load_device(fabric, quantize), dtype, LoRALLaMA, lora=lora)
    mark_only_lora_as_trainable(lora_model)
    if quantize:
        quantize_frozen_linears(lora_model, fabric.device)
        fabric.print(f"Frozen block weights in NF4: {frozen_weight_bytes(lora_model):.3f} bytes per weight")
    fabric.print(
        f"LoRA r={lora.r} alpha={lora.alpha}: {num_parameters(lora_model, requires_grad=True):,} trainable of "
        f"{num_parameters(lora_model):,} parameters"
    )
    model, optimizer = setup_model_and_optimizer(fabric, lora_model, training)

    def save_lora(path: Path) -> None:
        trainable = full_state_dict(lora_model, trainable_only=True)  # under FSDP gathered from every rank
        if fabric.global_rank == 0:
            save_atomic(lora_state_dict(lora_model, trainable, prompt_style, base_model), path)
            fabric.print(f"Saved LoRA weights to {path}")

    fit(fabric, model, optimizer, train_data, val_data, tokenizer, training, out_dir, save_lora, FINAL_NAME, resume,
        run_info=run_info)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(setup)
