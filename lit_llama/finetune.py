"""Finetuning, once for every method: the scripts finetune/lora.py, adapter.py and full.py each give a method
(the model it trains, what is trainable, what is saved under which name) and its own flags; the shared flags
(lit_llama/args.py), the setup (devices, the run folder, data) and the loop (training.py) are the same.

    flags (finetune_cli) -> settings (finetune) -> processes (launch) -> model and data (train) -> the loop (fit)
"""

import inspect
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import lightning as L
import torch

from lit_llama.args import SHARED_ARGS, DataArgs, EvalArgs, OldArgs, RunArgs, TrainArgs
from lit_llama.checkpoint import (
    CONFIG_NAME,
    CheckpointPaths,
    check_vocab,
    copy_tokenizer,
    full_state_dict,
    load_model,
    num_parameters,
    resolve_checkpoint,
    save_sharded_weights,
    save_weights,
)
from lit_llama.cli import UserError, deprecated_flag, with_one_line_errors
from lit_llama.data import check_data_fits, load_prepared
from lit_llama.disk import write_text_atomic
from lit_llama.distributed import Precision, launch, load_device, make_fabric, unwrap, uses_fsdp
from lit_llama.model import Config
from lit_llama.run_dir import claim_out_dir
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import Sample, TrainingConfig, fit


class Method(Protocol):
    """What differs between LoRA (lora.py), the adapter (adapter.py) and full finetuning (below)."""

    name: str  # run.json's "method", and the script: finetune/<name>.py
    final_name: str  # the file name of the last checkpoint
    trains_every_weight: bool  # full finetuning: decides the default --precision
    sharded_resume: bool  # the resume state as a folder of per-rank shards instead of one file

    def configure(self, config: Config, run: RunArgs) -> Dict[str, Any]:
        """Checks the method's flags against the model and the run before any work; returns its settings, which
        run.json records (a resumed run must have the same)."""

    def default_out_dir(self) -> Path: ...

    def load(self, fabric: L.Fabric, paths: CheckpointPaths, dtype: torch.dtype) -> torch.nn.Module:
        """The model with the base weights loaded, in which only what trains requires gradients."""

    def saver(self, fabric: L.Fabric, model: torch.nn.Module, paths: CheckpointPaths, data_dir: Path,
              out_dir: Path) -> Callable[[Path], None]:
        """The function that writes the method's checkpoint (called on every rank: under FSDP it gathers)."""

    # Several LoRAs at once (multi_task.MultiTaskFinetune) also has `load_data` (one data folder per task, in
    # place of `load_tokenizer_and_data`), `param_groups` (one learning rate per task) and `batches` (each
    # micro-batch a share of every task; see `fit`). `train_method` uses them where a method has them.


def finetune_cli(method: Callable[..., Method], defaults: Dict[str, Any]) -> None:
    """The command line of a finetune script: the flags of `method` (a function of the method's flags that
    returns the method), then the shared ones of lit_llama/args.py, with the method's `defaults` for them."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    parser = flag_parser(method, defaults)
    with_one_line_errors(lambda: finetune_with_flags(method, parser.parse_args(sys.argv[1:])))


def finetune_from_python(method: Callable[..., Method], flags: Dict[str, Any], defaults: Dict[str, Any]) -> None:
    """The same run from Python (each script's `setup(**flags)`): the flags checked as on the command line."""
    finetune_with_flags(method, flag_parser(method, defaults).parse_object(flags))


def flag_parser(method: Callable[..., Method], defaults: Dict[str, Any]) -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)  # the method's docstring heads its group of flags
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of flags (any of those below).")
    parser.add_function_arguments(method, as_group=True)
    for group in SHARED_ARGS:
        parser.add_class_arguments(group, nested_key=None, as_group=True)
    parser.set_defaults(defaults)
    return parser


def finetune_with_flags(method: Callable[..., Method], flags: Any) -> None:
    """The parsed flags, each into its group's dataclass, then `finetune`."""
    own = {name: flags[name] for name in inspect.signature(method).parameters}
    shared = [group(**{f.name: flags[f.name] for f in fields(group)}) for group in SHARED_ARGS]
    finetune(method(**own), *shared)


def finetune(method: Method, run: RunArgs, data: DataArgs, train: TrainArgs, evaluation: EvalArgs,
             old: OldArgs) -> None:
    """Turns the flags into settings, checks them all, claims the run folder and starts the run's processes."""
    paths = resolve_checkpoint(run.checkpoint_dir, old.pretrained_path, old.tokenizer_path)
    method_settings = method.configure(paths.config, run)
    max_seq_length = resolve_max_seq_length(train.max_seq_length, old.block_size, paths.config)
    training = TrainingConfig(**{**asdict(train), **asdict(evaluation), "max_seq_length": max_seq_length})
    precision = Precision.from_flag(run.precision, method.trains_every_weight)
    out_dir = Path(run.out_dir) if run.out_dir is not None else method.default_out_dir()
    fabric = make_fabric(run, precision, out_dir)
    run_info = {"method": method.name, "model": asdict(paths.config), **method_settings,
                "batches": training.batch_settings(), "training": training.run_settings(precision.name, data.data_dir)}
    with claim_out_dir(out_dir, run.resume, run_info, fabric.world_size):
        launch(fabric, train_method, method, paths, precision.dtype, run_info, training, data.data_dir, out_dir,
               run.resume)


WARMUP_EPOCHS = 2  # --warmup_iters null: the article's (and LLaMA-Adapter's) warmup


def train_method(
    fabric: L.Fabric,
    method: Method,
    paths: CheckpointPaths,
    dtype: torch.dtype,
    run_info: Dict[str, Any],
    training: TrainingConfig,
    data_dir: Path,
    out_dir: Path,
    resume: bool,
) -> None:
    """In each process: the data, the model and its optimizer, then the loop."""
    load_data = getattr(method, "load_data", load_tokenizer_and_data)
    tokenizer, train_data, val_data = load_data(fabric, paths, data_dir, training.seed)
    if training.warmup_iters is None:  # fit() clamps it to the run's optimizer steps
        training = replace(training, warmup_iters=WARMUP_EPOCHS * len(train_data) // training.batch_size)
    model = method.load(fabric, paths, dtype)
    model, optimizer = setup_model_and_optimizer(fabric, model, training, getattr(method, "param_groups", None))
    save = method.saver(fabric, model, paths, data_dir, out_dir)
    fit(fabric, model, optimizer, train_data, val_data, tokenizer, training, out_dir, save, method.final_name, resume,
        sharded_resume=method.sharded_resume, run_info=run_info, batches=getattr(method, "batches", None))


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
    fabric: L.Fabric,
    model: torch.nn.Module,
    config: TrainingConfig,
    param_groups: Optional[Callable[[torch.nn.Module], List[Dict[str, Any]]]] = None,
) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Hands the model to Fabric (devices, strategy, precision) and builds AdamW over what trains (in the groups
    `param_groups(model)` makes of it, if given). When only some weights train (LoRA, adapter), those are kept
    in float32."""
    if any(not p.requires_grad for p in model.parameters()):
        # before Fabric wraps the model: DDP's gradient buckets and FSDP's shards take the dtypes they find
        keep_trainable_in_fp32(model)
    model.activation_checkpointing = config.activation_checkpointing
    model = fabric.setup_module(model)
    if config.compile:
        compile_blocks(unwrap(model))
    # after setup_module: FSDP2 replaces the parameters by sharded ones
    trainable = [p for p in model.parameters() if p.requires_grad] if param_groups is None else param_groups(model)
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    return model, fabric.setup_optimizers(optimizer)


def compile_blocks(model: torch.nn.Module) -> None:
    """--compile: each transformer block's forward compiled (one graph, shared by the blocks), in training mode
    only: validation and the greedy samples, with their other shapes and the KV cache, run eager instead of
    compiling more graphs. The blocks' hooks (FSDP's gathers, activation checkpointing) stay outside the graph,
    and the weights keep their names."""

    def with_mask(args: tuple) -> tuple:
        """Packed rows' spans (lit_llama.packed_attention: a list) as their mask tensor, made once per forward
        for all the blocks: traced, every new layout of spans would compile a new graph; a mask of any shape
        goes through the same one."""
        x, cos, sin, spans, *rest = args
        if not isinstance(spans, list):
            return args
        return (x, cos, sin, spans.mask(x.device), *rest)

    for block in model.transformer.h:
        eager, compiled = block.forward, torch.compile(block.forward, dynamic=True)  # any length: one graph
        block.forward = lambda *args, block=block, eager=eager, compiled=compiled: (
            compiled(*with_mask(args)) if block.training else eager(*args))


def keep_trainable_in_fp32(model: torch.nn.Module) -> None:
    """Frozen weights stay in bf16 (half the memory); the few trainable ones are kept in float32 so small
    updates are not lost to bf16 rounding."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


STATE_DICT_TYPES = ("full", "sharded")


class FullFinetune:
    """Every weight trains; each checkpoint is a whole model (as large as the base), with lit_config.json and the
    tokenizer beside it in --out_dir, so generate/full.py needs nothing else."""

    name, final_name, trains_every_weight = "full", "lit-llama-full-finetuned.pth", True
    flag_defaults = {"learning_rate": 3e-5, "weight_decay": 0.0, "warmup_iters": 100}

    def __init__(self, state_dict_type: str = "full") -> None:
        self.state_dict_type = state_dict_type
        self.sharded_resume = state_dict_type == "sharded"

    def configure(self, config: Config, run: RunArgs) -> Dict[str, Any]:
        if self.state_dict_type not in STATE_DICT_TYPES:
            raise UserError(f"--state_dict_type {self.state_dict_type!r} is not one of {', '.join(STATE_DICT_TYPES)}")
        if self.sharded_resume and not uses_fsdp(run):
            raise UserError("--state_dict_type sharded needs FSDP (--strategy fsdp, or --devices > 1); without it "
                            "checkpoints are always one full file")
        return {}

    def default_out_dir(self) -> Path:
        return Path("out/full/alpaca")

    def load(self, fabric: L.Fabric, paths: CheckpointPaths, dtype: torch.dtype) -> torch.nn.Module:
        model = load_model(paths, load_device(fabric), dtype)
        fabric.print(f"Full finetuning: all {num_parameters(model):,} parameters train")
        return model

    def saver(self, fabric: L.Fabric, model: torch.nn.Module, paths: CheckpointPaths, data_dir: Path,
              out_dir: Path) -> Callable[[Path], None]:
        if fabric.global_rank == 0:  # so that the checkpoints in out_dir describe themselves
            out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(paths.config.to_json_text(), out_dir / CONFIG_NAME)
            copy_tokenizer(paths.tokenizer, out_dir)

        def save_full(path: Path) -> None:
            if self.sharded_resume:  # FSDP only (see configure)
                save_sharded_weights(fabric, model, path)
            else:
                state_dict = full_state_dict(model)  # under FSDP gathered block by block into rank 0's CPU memory
                if fabric.global_rank == 0:
                    save_weights(state_dict, path)  # the format of a base lit-llama.pth
                fabric.barrier()
            fabric.print(f"Saved the finetuned weights to {path}")

        return save_full
