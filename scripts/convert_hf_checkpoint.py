"""Convert a Hugging Face LLaMA-architecture checkpoint to a lit-llama checkpoint: OpenLLaMA, Llama 2 "-hf",
TinyLlama, Llama 3.1/3.2/3.3, SmolLM2, Qwen2.5 (Qwen2ForCausalLM) and Mistral (MistralForCausalLM).

    python scripts/download.py --repo_id openlm-research/open_llama_3b
    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/hf/openlm-research/open_llama_3b

writes checkpoints/lit-llama/open_llama_3b/{lit-llama.pth, lit_config.json, tokenizer.model}. A model with a
`tokenizer.json` (Llama 3, SmolLM2, Qwen2.5) gets that instead, and every tokenizer file the model has is copied
(tokenizer_config.json, generation_config.json, special_tokens_map.json: they say bos, eos and the stop tokens).
"""

import json
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.checkpoint import WEIGHTS_NAME, check_model_fits, file_in_folder, load_state_dict, save_checkpoint_dir
from lit_llama.cli import UserError, check_out_dir, deprecated_flag, run_cli
from lit_llama.convert import (
    check_complete,
    check_tensor,
    config_from_hf,
    converted_tensor,
    expected_hf_shapes,
    hf_to_lit,
    is_ignored,
    parse_dtype,
)
from lit_llama.model import Config
from lit_llama.tokenizer import TOKENIZER_NAMES, Tokenizer, check_tokenizer_vocab, find_tokenizer


def convert(
    checkpoint_dir: Path = Path("checkpoints/hf/openlm-research/open_llama_3b"),
    out_dir: Optional[Path] = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    output_dir: Optional[Path] = None,
) -> None:
    """Converts a Hugging Face LLaMA-architecture checkpoint to lit-llama.pth + lit_config.json + its tokenizer.

    Args:
        checkpoint_dir: The Hugging Face model folder: config.json, tokenizer.model or tokenizer.json (with
            tokenizer_config.json and generation_config.json where the model has them), and the weights as
            *.safetensors or pytorch_model*.bin, in one file or sharded with its *.index.json.
        out_dir: Where to write the converted checkpoint (default: checkpoints/lit-llama/<checkpoint_dir name>).
        dtype: The precision to store the weights in: bfloat16, float16 or float32.
        overwrite: Replace an existing converted checkpoint in out_dir.
        output_dir: Deprecated name of --out_dir.
    """
    out_dir = deprecated_flag("out_dir", out_dir, "output_dir", output_dir)
    torch_dtype = parse_dtype(dtype)
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(
            f"--checkpoint_dir {checkpoint_dir} does not exist or is not a directory "
            "(download a model with scripts/download.py)"
        )
    out_dir = Path(out_dir) if out_dir is not None else Path("checkpoints/lit-llama") / checkpoint_dir.name
    check_out_dir(out_dir, replaces=WEIGHTS_NAME, overwrite=overwrite)

    config = read_hf_config(checkpoint_dir / "config.json")
    check_model_fits(config, torch_dtype, torch.device("cpu"), checkpoint_dir / "config.json")  # all held in RAM
    tokenizer = find_tokenizer(checkpoint_dir)
    if not tokenizer.is_file():
        raise UserError(f"{checkpoint_dir} has no {' or '.join(TOKENIZER_NAMES)} (the model's tokenizer)")
    check_tokenizer_vocab(Tokenizer(tokenizer), config, checkpoint_dir / "config.json")
    files = weight_files(checkpoint_dir)

    expected = expected_hf_shapes(config)
    seen: List[str] = []

    def checked_tensors() -> Iterator[Tuple[str, torch.Tensor]]:
        with tqdm(total=len(expected), desc="Converting", unit="tensor") as bar:
            for path in files:
                for name, tensor in read_tensors(path):
                    if is_ignored(name):
                        continue
                    check_tensor(name, tensor, expected, path)
                    seen.append(name)
                    bar.update()
                    yield name, converted_tensor(name, tensor, torch_dtype, path)

    state_dict = dict(hf_to_lit(checked_tensors()))
    check_complete(seen, expected, checkpoint_dir)
    if config.tie_embeddings:  # one tensor under both names, as the model's own state dict has it
        state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]

    save_checkpoint_dir(out_dir, state_dict, config, tokenizer)
    n_params = sum(t.numel() for t in state_dict.values())
    print(f"Converted {n_params:,} parameters ({dtype}) to {out_dir}")


def read_hf_config(path: Path) -> Config:
    if not path.is_file():
        raise UserError(f"{path} not found: is {path.parent} a Hugging Face model folder?")
    try:
        hf_config = json.loads(path.read_text(encoding="utf-8"))
        return config_from_hf(hf_config)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid UTF-8 JSON: {e}")
    except KeyError as e:
        raise UserError(f"{path} lacks the field {e}")
    except ValueError as e:
        raise UserError(f"{path}: {e}")


def weight_files(checkpoint_dir: Path) -> List[Path]:
    """The weight files, safetensors preferred; a sharded checkpoint's files are listed in its index."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = checkpoint_dir / index_name
        if index.is_file():
            try:
                weight_map: Dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index} is not a valid UTF-8 JSON index file (expected a 'weight_map'): {e}")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index}: 'weight_map' must be an object of tensor name -> file name")
            # each name is checked to stay inside the folder: an index must not make us read a file elsewhere
            names = dict.fromkeys(weight_map.values())  # in order, once each
            files = sorted(file_in_folder(checkpoint_dir, name, index) for name in names)
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{index} lists {missing[0].name}, which is not in {checkpoint_dir}")
            return files
    files = sorted(checkpoint_dir.glob("*.safetensors")) or sorted(checkpoint_dir.glob("pytorch_model*.bin"))
    if not files:
        hint = " (Meta's original format: use scripts/convert_meta_checkpoint.py)" if (
            checkpoint_dir / "params.json"
        ).is_file() else ""
        raise UserError(f"{checkpoint_dir} has no weights (*.safetensors or pytorch_model*.bin){hint}")
    return files


def read_tensors(path: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yields a file's tensors one at a time, reading each from disk only when it is asked for."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
            for name in names:
                # one open per tensor: the file's mapped pages (counted in RSS) then live as long as this
                # tensor, not as long as the whole shard; the header parse this repeats is negligible
                with safe_open(str(path), framework="pt") as f:
                    tensor = f.get_tensor(name)
                yield name, tensor
                del tensor
        except SafetensorError as e:
            raise UserError(f"{path} is not a readable safetensors file: {e}")
    else:
        state_dict = load_state_dict(path)  # memory-mapped
        for name in list(state_dict):
            yield name, state_dict.pop(name)


if __name__ == "__main__":
    run_cli(convert)
