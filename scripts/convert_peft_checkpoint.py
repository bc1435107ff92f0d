"""Import a PEFT LoRA adapter trained on a LLaMA-architecture model as our LoRA file.

    python scripts/convert_peft_checkpoint.py --adapter_dir path/to/adapter --checkpoint_dir checkpoints/lit-llama/7B \
        --out_dir out/lora/imported

The adapter folder holds adapter_config.json and adapter_model.safetensors (or adapter_model.bin); the
output works with generate/lora.py, scripts/merge_lora.py and scripts/export_peft.py. Rank, alpha, dropout,
rsLoRA and DoRA are taken from adapter_config.json; what our LoRA cannot represent (per-layer ranks, fully
trained modules_to_save, biases, a subset of layers, other architectures) is refused with one line.
"""

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.checkpoint import check_finite, load_state_dict, load_weights, resolve_checkpoint
from lit_llama.cli import UserError, check_out_dir, deprecated_flag, run_cli
from lit_llama.disk import save_atomic
from lit_llama.lora import LoRAConfig
from lit_llama.model import Config
from lit_llama.peft import PEFT_PREFIX, peft_targets, peft_to_lora

LORA_NAME = "lit-llama-lora.pth"  # the file written into --out_dir

# adapter_config.json fields whose non-default values our LoRA cannot represent, and why
UNSUPPORTED = {
    "modules_to_save": "fully trained copies of whole modules",
    "rank_pattern": "per-layer ranks",
    "alpha_pattern": "per-layer alphas",
    "layers_to_transform": "LoRA on a subset of the layers",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings",
    "target_parameters": "LoRA on parameters instead of modules",
    "lora_bias": "trained LoRA biases",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
}


def main(
    adapter_dir: Path = Path("out/peft/alpaca"),
    checkpoint_dir: Path = Path("checkpoints/lit-llama/7B"),
    out_dir: Path = Path("out/lora/imported"),
    overwrite: bool = False,
    output_path: Optional[Path] = None,
) -> None:
    """Converts a PEFT LoRA adapter folder into our LoRA file.

    Args:
        adapter_dir: The PEFT adapter folder (adapter_config.json, adapter_model.safetensors or .bin).
        checkpoint_dir: Our converted base model folder, the same model the adapter was trained on.
        out_dir: The folder to write the LoRA file into, as lit-llama-lora.pth.
        overwrite: Replace an existing LoRA file.
        output_path: Deprecated: the LoRA file to write (instead of --out_dir).
    """
    flag = "output_path" if output_path is not None else "out_dir"
    output_path = Path(deprecated_flag("out_dir", Path(out_dir) / LORA_NAME, "output_path", output_path))
    adapter_dir = Path(adapter_dir)
    paths = resolve_checkpoint(checkpoint_dir)
    check_output_path(output_path, overwrite, paths.weights, flag)
    adapter_config, config_file = read_adapter_config(adapter_dir)
    tensors, weights_file = read_adapter_tensors(adapter_dir)
    drop_unchanged_base_layers(tensors, paths.weights, paths.config, weights_file)

    targets = peft_targets(tensors, paths.config.n_layer, weights_file)
    try:
        lora = LoRAConfig(
            r=adapter_config["r"],
            alpha=adapter_config.get("lora_alpha", 8),  # peft's default
            dropout=adapter_config.get("lora_dropout", 0.0),
            rslora=bool(adapter_config.get("use_rslora", False)),
            dora=bool(adapter_config.get("use_dora", False)),
            **targets,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{config_file}: cannot build a LoRA config from it ({type(e).__name__}: {e})")
    state_dict = peft_to_lora(tensors, lora, paths.config, weights_file)
    check_finite(state_dict, weights_file)  # generation refuses NaN or infinite LoRA weights: refused here already

    checkpoint = {"lora_config": asdict(lora), "base_config": asdict(paths.config), "state_dict": state_dict}
    save_atomic(checkpoint, output_path)
    on = [t for t, v in targets.items() if v]
    print(f"Imported {adapter_dir} (r={lora.r}, alpha={lora.alpha}, rslora={lora.rslora}, dora={lora.dora}, "
          f"targets {', '.join(on)}) to {output_path}")


def check_output_path(output_path: Path, overwrite: bool, base_weights: Path, flag: str) -> None:
    """The LoRA file to write is new (or, with --overwrite, a file to replace), never the base model's weights."""
    if output_path.exists() and output_path.samefile(base_weights):  # also through a link
        raise UserError(f"--{flag}: {output_path} is the base model's weights: give another file")
    if output_path.is_dir():
        raise UserError(f"--{flag}: {output_path} is a folder, expected a file name")
    if output_path.exists() and not overwrite:
        raise UserError(f"--{flag}: {output_path} already exists; pass --overwrite true to replace it")
    check_out_dir(output_path.parent, flag)


def read_adapter_config(adapter_dir: Path) -> "tuple[Dict[str, Any], Path]":
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"--adapter_dir {adapter_dir} has no adapter_config.json; is it a PEFT adapter folder?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_file} is not valid UTF-8 JSON: {e}")
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: expected a JSON object of adapter settings, got a {type(config).__name__}")
    # the numbers LoRAConfig takes as they are: JSON may give 8.5 for the rank, or a string
    for field, expected in (("r", int), ("lora_alpha", (int, float)), ("lora_dropout", (int, float))):
        value = config.get(field, 1)
        if isinstance(value, bool) or not isinstance(value, expected) or not math.isfinite(value):
            what = "an integer" if expected is int else "a number"
            raise UserError(f"{config_file}: {field} is {value!r}, expected {what}")
    if config.get("peft_type") != "LORA":
        raise UserError(f"{config_file}: peft_type is {config.get('peft_type')!r}; only LORA adapters can be imported")
    for field, what in UNSUPPORTED.items():
        if config.get(field):
            raise UserError(f"{config_file}: {field} = {config[field]!r} ({what}) cannot be represented in our LoRA")
    if config.get("bias", "none") != "none":
        raise UserError(f"{config_file}: bias = {config['bias']!r} (trained biases) cannot be represented in our LoRA")
    return config, config_file


def read_adapter_tensors(adapter_dir: Path) -> "tuple[Dict[str, torch.Tensor], Path]":
    safetensors_file, bin_file = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if safetensors_file.is_file():
        try:
            return load_file(str(safetensors_file)), safetensors_file
        except (SafetensorError, OSError) as e:
            raise UserError(f"{safetensors_file} is not a readable safetensors file ({e})")
    if bin_file.is_file():  # written by peft before safetensors became its default
        return dict(load_state_dict(bin_file)), bin_file
    raise UserError(f"--adapter_dir {adapter_dir} has neither adapter_model.safetensors nor adapter_model.bin")


def drop_unchanged_base_layers(
    tensors: Dict[str, torch.Tensor], base_weights: Path, config: Config, source: Path
) -> None:
    """peft saves a copy of lm_head's or embed_tokens' base weight beside their LoRA weights ("base_layer").
    A copy equal to our base is dropped; a different one is a trained module our LoRA cannot hold."""
    copies = [name for name in tensors if name.endswith(".base_layer.weight")]
    if not copies:
        return
    base = load_weights(base_weights)  # memory-mapped
    ours_for = {"lm_head": "lm_head.weight", "model.embed_tokens": "transformer.wte.weight"}
    for name in copies:
        module = name.removeprefix(PEFT_PREFIX).removesuffix(".base_layer.weight")
        ours = base.get(ours_for.get(module, ""))
        if ours is None or ours.shape != tensors[name].shape or not torch.equal(ours, tensors[name].to(ours.dtype)):
            raise UserError(f"{source}: {name!r} is a changed copy of a base weight, which our LoRA cannot represent")
        del tensors[name]


if __name__ == "__main__":
    run_cli(main)
