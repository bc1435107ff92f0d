"""Export a LoRA trained here as a PEFT adapter, for transformers + peft, vLLM, TGI or LoRAX, without merging.

    python scripts/export_peft.py --checkpoint_dir checkpoints/lit-llama/7B \
        --lora_path out/lora/alpaca/lit-llama-lora-finetuned.pth --output_dir out/peft/alpaca

writes adapter_config.json and adapter_model.safetensors. The base model they apply to is the Hugging Face
form of --checkpoint_dir (the original download, or scripts/export_hf.py's output); see
howto/peft_interop.md for loading it with peft and serving it with vLLM.
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.checkpoint import check_finite, load_state_dict, resolve_checkpoint
from lit_llama.cli import UserError, check_out_dir, deprecated_flag, run_cli
from lit_llama.disk import save_atomic
from lit_llama.lora import LoRAConfig, lora_config_from_checkpoint
from lit_llama.lora_tree import PARENTS, flatten_path, tree_path
from lit_llama.peft import LORA_TARGET_MODULES, lora_to_peft

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def main(
    checkpoint_dir: Path = Path("checkpoints/lit-llama/7B"),
    lora_path: Path = Path("out/lora/alpaca/lit-llama-lora-finetuned.pth"),
    out_dir: Path = Path("out/peft/alpaca"),
    base_model_name_or_path: Optional[str] = None,
    overwrite: bool = False,
    output_dir: Optional[Path] = None,
) -> None:
    """Writes the LoRA file as adapter_config.json + adapter_model.safetensors in PEFT's format.

    Args:
        checkpoint_dir: The base model folder the LoRA was trained on (its config must match the LoRA file's).
        lora_path: The LoRA checkpoint written by finetune/lora.py (or scripts/convert_peft_checkpoint.py). A leaf
            of a LoRA tree is exported with its ancestors as one adapter of their summed rank (the same logits).
        out_dir: The adapter folder to write.
        base_model_name_or_path: Recorded in adapter_config.json for peft to find the base model (a hub id such
            as meta-llama/Llama-2-7b-hf or a local Hugging Face folder); default: --checkpoint_dir.
        overwrite: Replace an existing adapter in --out_dir.
        output_dir: Deprecated name of --out_dir.
    """
    flag = "output_dir" if output_dir is not None else "out_dir"
    output_dir = Path(deprecated_flag("out_dir", out_dir, "output_dir", output_dir))
    paths = resolve_checkpoint(checkpoint_dir)
    check_out_dir(output_dir, flag, replaces=WEIGHTS_FILE, overwrite=overwrite)
    checkpoint = load_state_dict(lora_path)
    if isinstance(checkpoint, dict) and checkpoint.get(PARENTS):  # a leaf of a LoRA tree: its path as one adapter
        checkpoint = flatten_path(tree_path(lora_path, paths.config, paths.weights), paths.config)
    lora = lora_config_from_checkpoint(checkpoint, lora_path)
    base = checkpoint.get("base_config", {})
    ours = asdict(paths.config)
    for field in ("n_layer", "n_embd", "n_head", "n_query_groups", "vocab_size", "intermediate_size"):
        if field in base and base[field] != ours[field]:
            raise UserError(
                f"{lora_path} was trained on a base model with {field}={base[field]}, --checkpoint_dir "
                f"{checkpoint_dir} has {ours[field]}"
            )
    if not isinstance(checkpoint["state_dict"], dict):
        raise UserError(f"{lora_path}: its state_dict is not a dict of tensors")
    check_finite(checkpoint["state_dict"], lora_path)
    tensors = lora_to_peft(checkpoint["state_dict"], lora, paths.config, lora_path)

    output_dir.mkdir(parents=True, exist_ok=True)
    save_atomic(tensors, output_dir / WEIGHTS_FILE, lambda sd, tmp: save_file(sd, str(tmp), {"format": "pt"}))
    adapter_config = peft_config(lora, base_model_name_or_path or str(checkpoint_dir))
    save_atomic(adapter_config, output_dir / CONFIG_FILE,
                lambda cfg, tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n"))
    n = sum(t.numel() for t in tensors.values())
    print(f"Exported {len(tensors)} tensors ({n:,} parameters, targets {', '.join(adapter_config['target_modules'])}) "
          f"to {output_dir}")


def peft_config(lora: LoRAConfig, base_model_name_or_path: str) -> Dict[str, Any]:
    """The adapter_config.json fields peft, vLLM and TGI read; the rest keep peft's defaults."""
    targets = [m for target, modules in LORA_TARGET_MODULES.items() if getattr(lora, target) for m in modules]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "use_rslora": lora.rslora,
        "use_dora": lora.dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


if __name__ == "__main__":
    run_cli(main)
