"""Convert checkpoints made with Lit-LLaMA (github.com/Lightning-AI/lit-llama) to ours: the base model, its LoRA
files and its adapter v1 / v2 files.

    # the base: checkpoints/lit-llama/7B/lit-llama.pth (+ checkpoints/lit-llama/tokenizer.model)
    python scripts/convert_lit_llama_checkpoint.py --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth \
        --out_dir checkpoints/converted/7B
    # a LoRA or adapter file trained on it, against the converted base
    python scripts/convert_lit_llama_checkpoint.py --checkpoint_path out/lora/alpaca/lit-llama-lora-finetuned.pth \
        --checkpoint_dir checkpoints/converted/7B  # -> out/lora/alpaca/lit-llama-lora-finetuned-converted.pth

Lit-LLaMA's q/k rows are in Meta's interleaved rotary layout, ours in Hugging Face's: they are permuted (and so
are LoRA's B rows and adapter v2's per-row scale and bias for q and k). See howto/lit_llama_checkpoints.md.
"""

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.adapter import AdapterConfig
from lit_llama.checkpoint import (
    WEIGHTS_NAME,
    check_state_dict_fits,
    is_marked_weights,
    load_state_dict,
    resolve_checkpoint,
    save_checkpoint_dir,
    tokenizer_beside,
)
from lit_llama.cli import UserError, check_out_dir, deprecated_flag, run_cli
from lit_llama.convert import (
    LIT_LLAMA_N_HEAD,
    is_lit_llama_base,
    is_lit_llama_lora,
    lit_llama_adapter_to_lit,
    lit_llama_config,
    lit_llama_lora_to_lit,
    lit_llama_to_lit,
)
from lit_llama.disk import save_atomic
from lit_llama.lora import LoRAConfig
from lit_llama.model import LLaMA


def main(
    checkpoint_path: Path = Path("checkpoints/lit-llama/7B/lit-llama.pth"),
    out_dir: Optional[Path] = None,
    checkpoint_dir: Optional[Path] = None,
    model_size: Optional[str] = None,
    n_head: Optional[int] = None,
    tokenizer_path: Optional[Path] = None,
    lora_r: Optional[int] = None,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    overwrite: bool = False,
    output_dir: Optional[Path] = None,
    output_path: Optional[Path] = None,
) -> None:
    """Converts one Lit-LLaMA file; what it is (base, LoRA, adapter v1 or v2) is read from its tensor names.

    Args:
        checkpoint_path: The Lit-LLaMA file: a base lit-llama.pth, lit-llama-lora-finetuned.pth or
            lit-llama-adapter-finetuned.pth.
        out_dir: For a base: the checkpoint folder to write (lit-llama.pth, lit_config.json, tokenizer.model);
            default: <checkpoint_path's folder>-converted. For a LoRA or adapter file: the folder to write
            <checkpoint_path stem>-converted.pth into; default: checkpoint_path's folder.
        checkpoint_dir: For a LoRA or adapter file: the base it was trained on, already converted by this script.
        model_size: For a base: Lit-LLaMA's size name (7B, 13B, 30B, 65B), giving the head count; default: the
            name of checkpoint_path's folder.
        n_head: For a base of another shape: the number of attention heads (instead of --model_size).
        tokenizer_path: For a base: tokenizer.model (default: beside the weights or one folder up, Lit-LLaMA's
            layout).
        lora_r: For a LoRA file: the rank (default: read from the tensors).
        lora_alpha: For a LoRA file: the alpha it was trained with (not stored in the file; Lit-LLaMA's default 16).
        lora_dropout: For a LoRA file: recorded for further finetuning (Lit-LLaMA's default 0.05).
        lora_query: For a LoRA file: whether the queries were adapted (Lit-LLaMA: yes).
        lora_key: For a LoRA file: whether the keys were adapted (Lit-LLaMA: no).
        lora_value: For a LoRA file: whether the values were adapted (Lit-LLaMA: yes).
        overwrite: Replace an existing output.
        output_dir: Deprecated name of --out_dir.
        output_path: Deprecated: for a LoRA or adapter file, the file to write (instead of --out_dir).
    """
    out_dir = deprecated_flag("out_dir", out_dir, "output_dir", output_dir)
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise UserError(f"--checkpoint_path {checkpoint_path} does not exist")
    tensors = load_state_dict(checkpoint_path)  # memory-mapped
    if is_marked_weights(tensors):
        raise UserError(f"{checkpoint_path} is already in this repository's format (its format marker says so)")
    if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise UserError(f"{checkpoint_path} is not a bare tensor dict as Lit-LLaMA writes them; already converted?")
    if is_lit_llama_base(tensors) and any(n.endswith("c_attn.weight") for n in tensors):
        convert_base(checkpoint_path, tensors, out_dir, model_size, n_head, tokenizer_path, overwrite)
        return
    if checkpoint_dir is None:
        raise UserError(f"{checkpoint_path} is a finetuned file: give --checkpoint_dir, the converted base it was "
                        "trained on")
    paths = resolve_checkpoint(checkpoint_dir)
    converted = Path(out_dir or checkpoint_path.parent) / f"{checkpoint_path.stem}-converted.pth"
    output_path = Path(deprecated_flag("out_dir", converted, "output_path", output_path))
    if output_path.exists() and not overwrite:
        raise UserError(f"{output_path} already exists; pass --overwrite true to replace it")
    if paths.config.n_query_groups != paths.config.n_head:
        raise UserError(f"--checkpoint_dir {checkpoint_dir} has grouped-query attention; Lit-LLaMA models have not")

    if is_lit_llama_lora(tensors):
        parts = sum((lora_query, lora_key, lora_value))
        first_A = next((t for n, t in tensors.items() if n.endswith(".lora_A")), None)
        if parts == 0 or first_A is None:
            raise UserError(f"{checkpoint_path}: no lora_A tensors, or no target among --lora_query/key/value")
        r = lora_r or first_A.shape[0] // parts
        try:
            lora = LoRAConfig(r=r, alpha=lora_alpha, dropout=lora_dropout, query=lora_query, key=lora_key,
                              value=lora_value)
        except ValueError as e:
            raise UserError(str(e))
        state_dict = lit_llama_lora_to_lit(dict(tensors), lora, paths.config, checkpoint_path)
        save_atomic({"lora_config": asdict(lora), "base_config": asdict(paths.config), "state_dict": state_dict},
                    output_path)
        print(f"Converted Lit-LLaMA LoRA (r={r}, alpha={lora_alpha}, targets "
              f"{'/'.join(p for p, on in zip('qkv', (lora_query, lora_key, lora_value)) if on)}) to {output_path}")
    elif any(n.endswith("adapter_wte.weight") for n in tensors):
        state_dict, fields = lit_llama_adapter_to_lit(dict(tensors), paths.config, checkpoint_path)
        fields["adapter_head"] = "lm_head.adapter_scale" in state_dict
        try:
            config = AdapterConfig.from_config(paths.config, **fields)
        except ValueError as e:
            raise UserError(f"{checkpoint_path}: {e}")
        describe = {f: getattr(config, f) for f in (*fields, "n_layer", "n_embd", "n_head", "n_query_groups",
                                                    "vocab_size")}
        save_atomic({**state_dict, "adapter_config": describe}, output_path)
        print(f"Converted Lit-LLaMA adapter v{fields['adapter_version']} (prompt length "
              f"{fields['adapter_prompt_length']}, from layer {fields['adapter_start_layer']}) to {output_path}")
    else:
        raise UserError(f"{checkpoint_path}: neither a Lit-LLaMA base (RMSNorm .scale), LoRA (lora_A/lora_B) nor "
                        "adapter (adapter_wte) checkpoint")


def convert_base(
    checkpoint_path: Path,
    tensors,
    output_dir: Optional[Path],
    model_size: Optional[str],
    n_head: Optional[int],
    tokenizer_path: Optional[Path],
    overwrite: bool,
) -> None:
    folder = checkpoint_path.parent
    output_dir = Path(output_dir or f"{folder}-converted")
    if output_dir.resolve() == folder.resolve():
        raise UserError(f"--out_dir {output_dir} is the Lit-LLaMA checkpoint's folder: choose another")
    check_out_dir(output_dir, replaces=WEIGHTS_NAME, overwrite=overwrite)
    if n_head is None:
        size = model_size or folder.name
        if size not in LIT_LLAMA_N_HEAD:
            raise UserError(
                f"{'--model_size ' + model_size if model_size else 'the folder name ' + repr(folder.name)} is not one "
                f"of Lit-LLaMA's sizes ({', '.join(LIT_LLAMA_N_HEAD)}): give --model_size or --n_head"
            )
        n_head = LIT_LLAMA_N_HEAD[size]
    if tokenizer_path is None:
        tokenizer_path = tokenizer_beside(folder)
    if not Path(tokenizer_path).is_file():
        raise UserError(f"tokenizer {tokenizer_path} not found: give --tokenizer_path")

    config = lit_llama_config(tensors, n_head, checkpoint_path)
    state_dict = dict(lit_llama_to_lit(tensors, config))
    with torch.device("meta"):
        check_state_dict_fits(LLaMA(config), state_dict, checkpoint_path)
    save_checkpoint_dir(output_dir, state_dict, config, Path(tokenizer_path))
    print(f"Converted Lit-LLaMA base ({config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide) "
          f"to {output_dir}")


if __name__ == "__main__":
    run_cli(main)
