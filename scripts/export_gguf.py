"""Export a checkpoint (with a LoRA merged in, if given) as a GGUF file for llama.cpp, Ollama and LM Studio.

    python scripts/export_gguf.py --checkpoint_dir checkpoints/lit-llama/open_llama_3b \
        --lora_path out/lora/alpaca/lit-llama-lora-finetuned.pth --out_file out/gguf/model.gguf --dtype q8_0
    cd out/gguf && ollama create my-model -f Modelfile && ollama run my-model

The file holds the weights, the tokenizer and a chat template in the prompt style the model was trained in
(the LoRA file's, or --prompt_style); an Ollama `Modelfile` with that prompt template is written beside it.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.checkpoint import is_extra_parameter, load_model, load_weights, resolve_checkpoint
from lit_llama.cli import UserError, run_cli
from lit_llama.convert import lit_to_hf
from lit_llama.disk import disk_errors, write_text_atomic
from lit_llama.gguf import EXPORT_TYPES, import_gguf, write_gguf
from lit_llama.gguf_tokenizer import (
    jinja_chat_template,
    ollama_modelfile,
    tokenizer_from_json,
    tokenizer_from_sentencepiece,
)
from lit_llama.lora import load_lora_model, lora_prompt_style, read_lora_checkpoint
from lit_llama.model import Config
from lit_llama.prompts import get_prompt_style

# Config fields the GGUF metadata written here describes (lit_llama.gguf.write_gguf); any other field set away
# from its default (a feature this exporter does not write yet: Mistral's sliding window) is refused rather than
# exported as a different model
EXPORTED_FIELDS = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_query_groups", "intermediate_size",
                   "norm_eps", "rope_theta", "head_dim", "tie_embeddings", "qkv_bias", "rope_scaling"}


def main(
    checkpoint_dir: Optional[Path] = None,
    out_file: Optional[Path] = None,
    lora_path: Optional[Path] = None,
    dtype: str = "f16",
    prompt_style: Optional[str] = None,
    overwrite: bool = False,
) -> None:
    """Writes the model as one GGUF file, and an Ollama Modelfile beside it.

    Args:
        checkpoint_dir: The checkpoint folder (lit-llama.pth, lit_config.json, tokenizer).
        out_file: The GGUF file to write (its folder is created; the Modelfile goes beside it).
        lora_path: A LoRA file from finetune/lora.py, merged into the weights before export.
        dtype: The weights' type in the file: f32, f16, bf16 or q8_0 (8-bit blocks of 32, llama.cpp's Q8_0;
            norms stay f32). llama.cpp's own `llama-quantize` makes smaller types (Q4_K_M, ...) from an f16 file.
        prompt_style: The chat template and Ollama template to write: alpaca, llama2-chat, chatml, ... (default:
            the LoRA file's style; without a LoRA file, the checkpoint's own chat template if its
            tokenizer_config.json has one, else alpaca).
        overwrite: Replace an existing --out_file and the Modelfile beside it.
    """
    if checkpoint_dir is None or out_file is None:
        raise UserError("give --checkpoint_dir and --out_file")
    if dtype not in EXPORT_TYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(EXPORT_TYPES)}")
    import_gguf()
    paths = resolve_checkpoint(checkpoint_dir)
    out_file = Path(out_file)
    modelfile = out_file.parent / "Modelfile"
    if out_file.is_dir():
        raise UserError(f"--out_file {out_file} is a directory: give a file name such as {out_file / 'model.gguf'}")
    for path in (out_file, modelfile):
        if path.exists() and not overwrite:
            raise UserError(f"{path} already exists; pass --overwrite true to replace it")
    check_exported_fields(paths.config)

    style = get_prompt_style(prompt_style) if prompt_style is not None else None
    checkpoint_dir = Path(checkpoint_dir)
    tokenizer = (tokenizer_from_json(checkpoint_dir) if (checkpoint_dir / "tokenizer.json").is_file()
                 else tokenizer_from_sentencepiece(paths.tokenizer))
    if len(tokenizer.tokens) > paths.config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer.tokens)} tokens but the model only "
                        f"{paths.config.vocab_size}: they do not belong together")

    # in the weights' own dtype (as scripts/merge_lora.py merges): each tensor is converted when it is written
    dtype_stored = next(iter(load_weights(paths.weights).values())).dtype
    if lora_path is not None:
        if style is None:
            style = get_prompt_style(lora_prompt_style(read_lora_checkpoint(Path(lora_path)), lora_path))
        model = load_lora_model(paths, Path(lora_path), torch.device("cpu"), dtype_stored, merge=True)
    else:
        model = load_model(paths, torch.device("cpu"), dtype_stored)
    if style is None and tokenizer.chat_template is None:
        style = get_prompt_style("alpaca")
    if style is not None:
        tokenizer.chat_template = jinja_chat_template(style)

    state_dict = {name: t for name, t in model.state_dict().items() if not is_extra_parameter(name)}
    # tied embeddings: one tensor under both names; llama.cpp ties when the file has no output.weight
    head, embedding = state_dict.get("lm_head.weight"), state_dict["transformer.wte.weight"]
    tied = head is None or head.data_ptr() == embedding.data_ptr()
    name = checkpoint_dir.resolve().name + (f"-{Path(lora_path).stem}" if lora_path is not None else "")

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    try:
        with disk_errors(out_file, tmp):
            write_gguf(tmp, lit_to_hf(state_dict.items(), paths.config), paths.config, tokenizer, dtype, name, tied)
            os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)  # what a failed write left
    write_text_atomic(ollama_modelfile(out_file.name, style, []), modelfile)
    size = out_file.stat().st_size
    template = f"prompt style {style.name}" if style is not None else "the checkpoint's chat template"
    print(f"Wrote {out_file} ({dtype}, {size / 2**20:.1f} MiB, {template}) and {modelfile}")


def check_exported_fields(config: Config) -> None:
    defaults = Config(n_embd=config.n_embd, n_head=config.n_head)
    for field in dataclasses.fields(Config):
        if field.name in EXPORTED_FIELDS:
            continue
        value = getattr(config, field.name)
        if value != getattr(defaults, field.name):
            raise UserError(f"the model config's {field.name}={json.dumps(value, default=str)} is not written to "
                            "GGUF by this exporter yet")


if __name__ == "__main__":
    run_cli(main)
