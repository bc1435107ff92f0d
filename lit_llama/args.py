"""The flags every finetune script shares, each described once. The scripts add their method's own flags and
their defaults (a learning rate, an output folder) and list all of them in `--help` under these groups; the
names are flat (`--learning_rate`, not `--train.learning_rate`), on the command line and in a `--config` YAML.

A flag's value is checked where it becomes a setting: the training ones in `TrainingConfig` (training.py),
the run ones in distributed.py and run_dir.py."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(kw_only=True)
class RunArgs:
    """Where the run reads and writes, and on what

    Args:
        checkpoint_dir: Converted base model folder (lit-llama.pth, lit_config.json, tokenizer.model).
        out_dir: Where the checkpoints, run.json, summary.json and metrics.csv go (default: out/<method>/alpaca).
        precision: bf16-true (on a GPU with bf16 the default for LoRA and the adapter: frozen weights in bf16,
            trained ones in float32), bf16-mixed (the default for full finetuning on such a GPU: float32 weights
            and AdamW states, bf16 computation), 32-true (the default on a CPU) or 16-mixed.
        devices: GPUs (or CPU processes) per node.
        num_nodes: Machines; multi-node runs are started on each machine by torchrun or SLURM (see
            howto/multi_gpu.md).
        strategy: auto (FSDP over several devices, nothing to distribute on one), fsdp (FSDP2: the weights, and
            what trains with its AdamW states, sharded per transformer block among the devices; also on one
            device) or ddp (every device holds the whole model; gradients are averaged).
        cpu_offload: With FSDP, keep the weight shards and the optimizer step in CPU memory and copy each block
            to the GPU when it runs: fits larger models, runs slower.
        logger_name: Where metrics go besides <out_dir>/metrics.csv, which every run writes: csv (nowhere else),
            tensorboard (<out_dir>/logs/version_N/, for `tensorboard --logdir <out_dir>/logs`) or wandb (Weights &
            Biases; WANDB_MODE=offline keeps it local).
        resume: Continue the run in --out_dir from its last checkpoint.
    """

    checkpoint_dir: Optional[Path] = Path("checkpoints/lit-llama/7B")
    out_dir: Optional[Path] = None
    precision: Optional[str] = None
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    cpu_offload: bool = False
    logger_name: str = "csv"
    resume: bool = False


@dataclass(kw_only=True)
class DataArgs:
    """The data

    Args:
        data_dir: Folder with train.pt and test.pt from scripts/prepare_alpaca.py, prepare_dolly.py or
            prepare_json.py.
    """

    data_dir: Path = Path("data/alpaca")


@dataclass(kw_only=True)
class TrainArgs:
    """How the model trains

    Args:
        learning_rate: Peak AdamW learning rate.
        batch_size: Examples per optimizer step over all devices (gradient accumulation makes up the rest).
        micro_batch_size: Examples per forward/backward pass on one device; lower it if memory runs out.
        max_iters: Micro-batch iterations per device; default: --epochs over the training set.
        epochs: Passes over the training set when --max_iters is not given.
        warmup_iters: Optimizer steps of linear learning-rate warmup (then cosine decay); null: 2 epochs' worth
            (2 x training examples / --batch_size). Never more than the run's optimizer steps.
        weight_decay: AdamW weight decay.
        max_seq_length: Longest training sequence in tokens; longer examples are cut here (prepared data keeps
            them whole up to its --max_example_tokens). Default: 512, or the model's context if shorter.
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
        packing: Concatenate each micro-batch's examples into one row with no padding at all, instead of one
            padded row each (with --compile: into rows of at most --max_seq_length, the row length that leaves
            the least padding). Attention stays within each example (on a CPU example by example; on a GPU
            through a block mask, or flash attention's variable-length kernel for rows of 1024 tokens or more)
            and positions restart at each one, so every example's loss is the one it has alone, and the
            micro-batches hold the same examples as without packing (measured in benchmarks/RESULTS.md).
        compile: Compile the transformer blocks for training with torch.compile (validation and samples stay
            eager): faster steps on a GPU after a compile time at the start (and after a resume). Deterministic
            and resumable, but its dropout draws differ from eager ones, so with dropout the run is not the
            eager run. Needs a C compiler on a CPU.
    """

    learning_rate: float = 3e-4
    batch_size: int = 128
    micro_batch_size: int = 4
    max_iters: Optional[int] = None
    epochs: float = 5
    warmup_iters: Optional[int] = 100
    weight_decay: float = 0.0
    max_seq_length: Optional[int] = None
    seed: int = 1337
    activation_checkpointing: bool = False
    chunked_ce: bool = False
    group_by_length: bool = False
    packing: bool = False
    compile: bool = False


@dataclass(kw_only=True)
class EvalArgs:
    """Validation, checkpoints and logging

    Args:
        eval_interval: Optimizer steps between validations (loss and one greedy sample); 0: only before and
            after training.
        eval_iters: Validation micro-batches per validation.
        save_interval: Optimizer steps between checkpoints; 0: only the final one.
        log_interval: Iterations between metric rows.
    """

    eval_interval: int = 100
    eval_iters: int = 100
    save_interval: int = 100
    log_interval: int = 1


@dataclass(kw_only=True)
class OldArgs:
    """Lit-LLaMA's original flag names, still accepted

    Args:
        pretrained_path: The base weights .pth (instead of --checkpoint_dir).
        tokenizer_path: The tokenizer (default: beside the weights).
        block_size: Deprecated name of --max_seq_length.
    """

    pretrained_path: Optional[Path] = None
    tokenizer_path: Optional[Path] = None
    block_size: Optional[int] = None


SHARED_ARGS = (RunArgs, DataArgs, TrainArgs, EvalArgs, OldArgs)  # in the order --help lists them
