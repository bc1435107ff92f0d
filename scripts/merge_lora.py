"""Merge LoRA weights into the base model: W' = W + (alpha / r) * B A.

    python scripts/merge_lora.py --checkpoint_dir checkpoints/lit-llama/7B \
        --lora_path out/lora/alpaca/lit-llama-lora-finetuned.pth --out_dir checkpoints/lit-llama/7B-alpaca-lora

The output is an ordinary checkpoint folder: generate.py, the finetune scripts and
export_hf.py take it like any converted model.
"""

import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.checkpoint import (
    WEIGHTS_NAME,
    is_extra_parameter,
    load_weights,
    resolve_checkpoint,
    save_checkpoint_dir,
)
from lit_llama.cli import UserError, check_out_dir, deprecated_flag, run_cli
from lit_llama.lora_tree import load_leaf_model


def main(
    lora_path: Path = Path("out/lora/alpaca/lit-llama-lora-finetuned.pth"),
    checkpoint_dir: Optional[Path] = Path("checkpoints/lit-llama/7B"),
    out_dir: Optional[Path] = None,
    pretrained_path: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
    overwrite: bool = False,
    output_dir: Optional[Path] = None,
) -> None:
    """Writes base + LoRA as one checkpoint folder, in the base weights' dtype.

    Args:
        lora_path: The LoRA checkpoint written by finetune/lora.py (a leaf of a LoRA tree: merged with its ancestors).
        checkpoint_dir: The base model folder the LoRA weights were trained on.
        out_dir: Where the merged folder goes (default: <checkpoint_dir>-lora).
        pretrained_path: Lit-LLaMA's original flag: the base weights .pth (instead of --checkpoint_dir).
        tokenizer_path: Lit-LLaMA's original flag: the tokenizer (default: beside the weights).
        overwrite: Replace an existing merged checkpoint in --out_dir.
        output_dir: Deprecated name of --out_dir.
    """
    out_dir = deprecated_flag("out_dir", out_dir, "output_dir", output_dir)
    paths = resolve_checkpoint(checkpoint_dir, pretrained_path, tokenizer_path)
    out_dir = Path(out_dir or f"{paths.weights.parent}-lora")
    if out_dir.resolve() == paths.weights.parent.resolve():
        raise UserError(f"--out_dir {out_dir} is the base checkpoint's folder: choose another")
    check_out_dir(out_dir, replaces=WEIGHTS_NAME, overwrite=overwrite)

    base_dtype = next(iter(load_weights(paths.weights).values())).dtype
    model = load_leaf_model(paths, lora_path, torch.device("cpu"), base_dtype, merge=True)  # a tree leaf: its path
    lora = model.lora_config

    merged = {name: t for name, t in model.state_dict().items() if not is_extra_parameter(name)}
    save_checkpoint_dir(out_dir, merged, paths.config, paths.tokenizer)
    print(f"Merged {lora_path} (r={lora.r}, alpha={lora.alpha}) into {out_dir} ({base_dtype})")


if __name__ == "__main__":
    run_cli(main)
