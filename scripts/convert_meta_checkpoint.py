"""Convert Meta's original LLaMA / Llama 2 checkpoint (params.json + consolidated.*.pth) to a lit-llama checkpoint.

    python scripts/convert_meta_checkpoint.py --checkpoint_dir checkpoints/llama/7B

writes checkpoints/lit-llama/7B/{lit-llama.pth, lit_config.json, tokenizer.model}. Meta ships tokenizer.model
beside the model folders (llama/tokenizer.model, llama/7B/...); it is found in either place.
"""

import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.checkpoint import (
    TOKENIZER_NAME,
    WEIGHTS_NAME,
    check_model_fits,
    load_state_dict,
    save_checkpoint_dir,
    tokenizer_beside,
)
from lit_llama.cli import UserError, check_out_dir, deprecated_flag, run_cli
from lit_llama.convert import (
    check_complete,
    check_tensor,
    converted_tensor,
    expected_hf_shapes,
    hf_to_lit,
    is_ignored,
    merge_meta_shards,
    meta_intermediate_size,
    meta_to_hf_name,
    parse_dtype,
    permute_meta,
)
from lit_llama.model import Config


def convert(
    checkpoint_dir: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    dtype: str = "bfloat16",
    block_size: Optional[int] = None,
    overwrite: bool = False,
    output_dir: Optional[Path] = None,
) -> None:
    """Converts Meta's consolidated.*.pth shards to lit-llama.pth + lit_config.json + tokenizer.model.

    Args:
        checkpoint_dir: Meta's model folder (e.g. llama/7B or llama-2-7b) holding params.json and
            consolidated.00.pth, consolidated.01.pth, ...; tokenizer.model is taken from it or its parent.
        out_dir: Where to write the converted checkpoint (default: checkpoints/lit-llama/<checkpoint_dir name>).
        dtype: The precision to store the weights in: bfloat16, float16 or float32.
        block_size: The context length, which params.json does not record (default: 4096 for Llama 2,
            recognised by its norm_eps of 1e-5, else LLaMA 1's 2048).
        overwrite: Replace an existing converted checkpoint in out_dir.
        output_dir: Deprecated name of --out_dir.
    """
    out_dir = deprecated_flag("out_dir", out_dir, "output_dir", output_dir)
    torch_dtype = parse_dtype(dtype)
    if checkpoint_dir is None:
        raise UserError("give --checkpoint_dir (Meta's model folder with params.json and consolidated.*.pth)")
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"--checkpoint_dir {checkpoint_dir} does not exist or is not a directory")
    out_dir = Path(out_dir) if out_dir is not None else Path("checkpoints/lit-llama") / checkpoint_dir.name
    check_out_dir(out_dir, replaces=WEIGHTS_NAME, overwrite=overwrite)

    params = read_params(checkpoint_dir / "params.json")
    tokenizer = meta_tokenizer(checkpoint_dir)
    shard_paths = sorted(checkpoint_dir.glob("consolidated.*.pth"))
    if not shard_paths:
        hint = " (a Hugging Face folder: use scripts/convert_hf_checkpoint.py)" if (
            checkpoint_dir / "config.json"
        ).is_file() else ""
        raise UserError(f"{checkpoint_dir} has no consolidated.*.pth weight files{hint}")
    shards = [load_state_dict(path) for path in shard_paths]  # memory-mapped: nothing read yet
    if "tok_embeddings.weight" not in shards[0]:
        raise UserError(f"{shard_paths[0]} has no 'tok_embeddings.weight': is it one of Meta's LLaMA checkpoints?")
    vocab_size = shards[0]["tok_embeddings.weight"].shape[0]  # split along dim 1, so every shard has all rows
    config = config_from_params(params, vocab_size, block_size, checkpoint_dir / "params.json")
    check_model_fits(config, torch_dtype, torch.device("cpu"), checkpoint_dir / "params.json")  # all held in RAM

    expected = expected_hf_shapes(config)
    seen: List[str] = []

    def hf_tensors() -> Iterator[Tuple[str, torch.Tensor]]:
        """Meta's tensors, merged across shards and renamed (and for q/k, permuted) to Hugging Face's."""
        for name in tqdm(list(shards[0]), desc="Converting", unit="tensor"):
            if is_ignored(name):
                continue
            hf_name = meta_to_hf_name(name)
            if hf_name is None:
                raise UserError(f"{shard_paths[0]}: unexpected tensor {name!r}; is it a LLaMA checkpoint?")
            for path, shard in zip(shard_paths, shards):
                if name not in shard:
                    raise UserError(f"{path} lacks {name!r}, which {shard_paths[0].name} has: a shard is incomplete")
            tensor = merge_meta_shards(name, [shard.pop(name) for shard in shards])
            check_tensor(hf_name, tensor, expected, checkpoint_dir)
            seen.append(hf_name)
            if hf_name.endswith("q_proj.weight"):
                tensor = permute_meta(tensor, config.n_head)
            elif hf_name.endswith("k_proj.weight"):
                tensor = permute_meta(tensor, config.n_query_groups)
            yield hf_name, converted_tensor(name, tensor, torch_dtype, checkpoint_dir)

    state_dict = dict(hf_to_lit(hf_tensors()))
    check_complete(seen, expected, checkpoint_dir)

    save_checkpoint_dir(out_dir, state_dict, config, tokenizer)
    n_params = sum(t.numel() for t in state_dict.values())
    print(f"Converted {n_params:,} parameters ({dtype}) from {len(shards)} shard(s) to {out_dir}")


def read_params(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} not found: is {path.parent} one of Meta's LLaMA model folders?")
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid UTF-8 JSON: {e}")
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a JSON object of model settings, got a {type(params).__name__}")
    missing = [key for key in REQUIRED_PARAMS if key not in params]
    if missing:
        raise UserError(f"{path} lacks the field {missing[0]!r}")
    # the fields used in arithmetic before Config checks its own (multiple_of divides, dim multiplies)
    for key, number in PARAMS_FIELDS.items():
        value = params.get(key)
        if value is None and key not in REQUIRED_PARAMS:
            continue
        wrong_type = isinstance(value, bool) or not isinstance(value, number)
        if wrong_type or not math.isfinite(value) or value <= 0:
            expected = "a positive integer" if number is int else "a positive number"
            raise UserError(f"{path}: field {key!r} is {value!r}, expected {expected}")
    return params


REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps")
# params.json's numeric fields -> their type (vocab_size, often -1 for "the tokenizer's", is checked below)
PARAMS_FIELDS = {"dim": int, "n_layers": int, "n_heads": int, "n_kv_heads": int, "multiple_of": int,
                 "norm_eps": (int, float), "ffn_dim_multiplier": (int, float), "rope_theta": (int, float)}


def config_from_params(params: Dict[str, Any], vocab_size: int, block_size: Optional[int], path: Path) -> Config:
    """Meta's params.json -> our Config. Its vocab_size is often -1 (meaning: the tokenizer's), so the
    embedding's row count is used instead."""
    if params.get("vocab_size", -1) not in (-1, vocab_size):
        raise UserError(f"{path}: vocab_size {params['vocab_size']} but the embedding has {vocab_size} rows")
    if block_size is None:
        block_size = 4096 if params["norm_eps"] == 1e-5 else 2048  # Llama 2 vs LLaMA 1
    try:
        return Config(
            block_size=block_size,
            vocab_size=vocab_size,
            n_layer=params["n_layers"],
            n_head=params["n_heads"],
            n_embd=params["dim"],
            n_query_groups=params.get("n_kv_heads") or params["n_heads"],
            intermediate_size=meta_intermediate_size(
                params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")
            ),
            norm_eps=params["norm_eps"],
            rope_theta=params.get("rope_theta", 10000.0),
        )
    except ValueError as e:
        raise UserError(f"{path}: {e}")


def meta_tokenizer(checkpoint_dir: Path) -> Path:
    tokenizer = tokenizer_beside(checkpoint_dir)
    if not tokenizer.is_file():
        raise UserError(f"no {TOKENIZER_NAME} in {checkpoint_dir} or its parent folder (Meta ships it beside the model)")
    return tokenizer


if __name__ == "__main__":
    run_cli(convert)
