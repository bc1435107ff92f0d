"""Checkpoint I/O, precision helpers and the command-line error handling every script shares."""

import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from lit_llama.model import Config, LLaMA, llama_configs

WEIGHTS_NAME = "lit-llama.pth"
CONFIG_NAME = "lit_config.json"
TOKENIZER_NAME = "tokenizer.model"


class UserError(Exception):
    """A mistake in the user's input (a path, a flag, a file): printed as one line, exit code 1."""


def run_cli(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """`jsonargparse.CLI(fn)` that turns `UserError`s into one clear line on stderr and exit code 1."""
    from jsonargparse import CLI

    try:
        return CLI(fn, *args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


@dataclass
class CheckpointPaths:
    weights: Path
    config: Config
    tokenizer: Path


def resolve_checkpoint(
    checkpoint_dir: Optional[Path] = None,
    checkpoint_path: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
) -> CheckpointPaths:
    """Finds weights, model config and tokenizer.

    The usual way is one self-describing directory (`--checkpoint_dir`) holding `lit-llama.pth`,
    `lit_config.json` and `tokenizer.model`. Lit-LLaMA's original flags (`--checkpoint_path X.pth
    --tokenizer_path Y`) also work: the config is then read from `lit_config.json` beside the weights,
    or from the name of their folder (`checkpoints/lit-llama/7B/lit-llama.pth` -> size "7B").
    """
    if checkpoint_path is None and checkpoint_dir is None:
        raise UserError("give --checkpoint_dir (a folder made by scripts/convert_hf_checkpoint.py)")
    if checkpoint_path is None:
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise UserError(f"--checkpoint_dir {checkpoint_dir} does not exist or is not a directory")
        checkpoint_path = checkpoint_dir / WEIGHTS_NAME
        if not checkpoint_path.is_file():
            raise UserError(
                f"--checkpoint_dir {checkpoint_dir} has no {WEIGHTS_NAME}; "
                "convert weights first with scripts/convert_hf_checkpoint.py"
            )
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise UserError(f"--checkpoint_path {checkpoint_path} does not exist")
    folder = checkpoint_path.parent

    config_file = folder / CONFIG_NAME
    if config_file.is_file():
        try:
            config = Config.from_json(config_file)
        except (ValueError, TypeError) as e:
            raise UserError(f"{config_file} is not a valid model config: {e}")
    elif folder.name in llama_configs:
        config = Config.from_name(folder.name)
    else:
        raise UserError(
            f"no {CONFIG_NAME} beside {checkpoint_path} and its folder name {folder.name!r} is not a known size "
            f"({', '.join(llama_configs)})"
        )

    if tokenizer_path is None:
        tokenizer_path = folder / TOKENIZER_NAME
        if not tokenizer_path.is_file() and (folder.parent / TOKENIZER_NAME).is_file():
            tokenizer_path = folder.parent / TOKENIZER_NAME  # lit-llama layout: checkpoints/lit-llama/tokenizer.model
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise UserError(f"tokenizer {tokenizer_path} not found (give --tokenizer_path or put it in the checkpoint dir)")
    return CheckpointPaths(checkpoint_path, config, tokenizer_path)


def check_vocab(tokenizer: Any, paths: CheckpointPaths) -> None:
    """The tokenizer must not produce ids the model has no embedding for (a few padding rows are fine)."""
    model_vocab, tokenizer_vocab = paths.config.vocab_size, tokenizer.vocab_size
    if not 0 <= model_vocab - tokenizer_vocab <= 128:
        raise UserError(
            f"tokenizer {paths.tokenizer} has {tokenizer_vocab} tokens but the model has {model_vocab}: "
            "they do not belong together"
        )


def load_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Memory-maps a `.pth` file: tensors are read from disk only when used, never all copied to RAM."""
    try:
        state_dict = torch.load(str(path), mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})")
    if not isinstance(state_dict, dict):
        raise UserError(f"{path} does not hold a state dict")
    return state_dict


def load_model(
    paths: CheckpointPaths,
    device: torch.device,
    dtype: torch.dtype,
    model_class: Callable[..., LLaMA] = LLaMA,
    **model_kwargs: Any,
) -> LLaMA:
    """Builds the model without allocating memory (meta device), then loads the weights straight into
    `dtype` on `device`, tensor by tensor. Keys the model has but the file lacks (LoRA or adapter
    parameters) keep a fresh initialisation."""
    with torch.device("meta"), default_dtype(dtype):
        model = model_class(paths.config, **model_kwargs)
    state_dict = load_state_dict(paths.weights)
    check_state_dict_fits(model, state_dict, paths.weights)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in state_dict:
                tensor.copy_(state_dict[name])
        # LoRA / adapter parameters are not in a base checkpoint: give them their initial values
        for module in model.modules():
            if hasattr(module, "reset_extra_parameters"):
                module.reset_extra_parameters()
    return model


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Creates modules directly in `dtype` (no float32 copy of a 7B model first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def check_state_dict_fits(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], path: Path) -> None:
    """A base checkpoint must give every base weight, with the right shape."""
    expected = model.state_dict()
    for name, tensor in state_dict.items():
        if name not in expected and name.endswith((".rms_1.scale", ".rms_2.scale", "ln_f.scale")):
            raise UserError(
                f"{path} is a Lit-LLaMA checkpoint (RMSNorm .scale weights, Meta's rotary layout): convert it with "
                "scripts/convert_lit_llama_checkpoint.py"
            )
        if name not in expected:
            raise UserError(f"{path}: unexpected tensor {name!r}; is it a checkpoint of this model family?")
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise UserError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model config expects "
                f"{tuple(expected[name].shape)}"
            )
    base_names = [n for n in expected if not is_extra_parameter(n)]
    missing = [n for n in base_names if n not in state_dict]
    if missing:
        raise UserError(f"{path}: missing {len(missing)} weights, e.g. {missing[0]!r}")


def is_extra_parameter(name: str) -> bool:
    """Parameters added on top of the base model by LoRA or the adapter."""
    return "lora_" in name or "adapter_" in name


def save_atomic(obj: Any, path: Path, save: Callable[[Any, Path], None] = torch.save) -> None:
    """`save(obj, temporary name)`, then rename: an interrupted save never leaves half a file, and an
    existing file is only replaced by a complete one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save(obj, tmp)
    os.replace(tmp, path)


def check_output_dir(output_dir: Path, overwrite: bool = False, filename: str = WEIGHTS_NAME) -> None:
    """Refuses to replace an existing checkpoint unless asked to."""
    if (Path(output_dir) / filename).exists() and not overwrite:
        raise UserError(f"{Path(output_dir) / filename} already exists; pass --overwrite true to replace it")


def save_checkpoint_dir(
    output_dir: Path, state_dict: Dict[str, torch.Tensor], config: Config, tokenizer_path: Path
) -> None:
    """Writes a self-describing checkpoint folder: weights, model config and tokenizer."""
    output_dir = Path(output_dir)
    save_atomic(state_dict, output_dir / WEIGHTS_NAME)
    config.to_json(output_dir / CONFIG_NAME)
    copy_tokenizer(tokenizer_path, output_dir)


def copy_tokenizer(tokenizer_path: Path, output_dir: Path) -> None:
    if Path(tokenizer_path).resolve() != (Path(output_dir) / TOKENIZER_NAME).resolve():  # may be the same folder
        shutil.copyfile(tokenizer_path, Path(output_dir) / TOKENIZER_NAME)


PRECISION_DTYPES = {
    "32-true": torch.float32,
    "16-true": torch.float16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float32,
    "bf16-mixed": torch.float32,
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_precision() -> str:
    """bf16 where the GPU supports it, full precision on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-true"
    return "32-true"


def precision_dtype(precision: Optional[str]) -> torch.dtype:
    precision = precision or default_precision()
    if precision not in PRECISION_DTYPES:
        raise UserError(f"--precision {precision!r} is not one of {', '.join(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[precision]


def num_parameters(module: torch.nn.Module, requires_grad: Optional[bool] = None) -> int:
    return sum(p.numel() for p in module.parameters() if requires_grad is None or p.requires_grad == requires_grad)
