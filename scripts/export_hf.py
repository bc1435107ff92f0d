"""Convert a lit-llama checkpoint back to a Hugging Face folder that transformers loads (LlamaForCausalLM,
Qwen2ForCausalLM or MistralForCausalLM, as the model's config says; tied embeddings stay tied).

    python scripts/export_hf.py --checkpoint_dir checkpoints/lit-llama/open_llama_3b

writes checkpoints/hf-export/open_llama_3b/{model.safetensors, config.json, tokenizer.model}; then
`LlamaForCausalLM.from_pretrained("checkpoints/hf-export/open_llama_3b")`. Merge LoRA or adapter weights
into the base model first: only base LLaMA weights have a Hugging Face name.
"""

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.checkpoint import (
    check_layer_count,
    check_state_dict_fits,
    copy_tokenizer,
    is_extra_parameter,
    load_weights,
    resolve_checkpoint,
)
from lit_llama.cli import UserError, check_out_dir, deprecated_flag, run_cli
from lit_llama.convert import HF_MODEL_TYPES, QKV, hf_architecture, lit_to_hf
from lit_llama.disk import save_atomic, write_text_atomic
from lit_llama.model import Config, LLaMA
from lit_llama.tokenizer import Tokenizer

WEIGHTS_FILE = "model.safetensors"


def convert(
    checkpoint_dir: Path = Path("checkpoints/lit-llama/open_llama_3b"),
    out_dir: Optional[Path] = None,
    overwrite: bool = False,
    output_dir: Optional[Path] = None,
) -> None:
    """Converts a lit-llama checkpoint to model.safetensors + config.json + tokenizer.model.

    Args:
        checkpoint_dir: The lit-llama checkpoint folder (lit-llama.pth, lit_config.json, tokenizer.model).
        out_dir: Where to write the Hugging Face folder (default: checkpoints/hf-export/<checkpoint_dir name>).
        overwrite: Replace an existing model.safetensors in out_dir.
        output_dir: Deprecated name of --out_dir.
    """
    out_dir = deprecated_flag("out_dir", out_dir, "output_dir", output_dir)
    paths = resolve_checkpoint(checkpoint_dir)
    if out_dir is None:
        out_dir = Path("checkpoints/hf-export") / Path(checkpoint_dir).name
    out_dir = Path(out_dir)
    check_out_dir(out_dir, replaces=WEIGHTS_FILE, overwrite=overwrite)
    config = paths.config

    lit_state_dict = load_weights(paths.weights)  # memory-mapped
    extra = [name for name in lit_state_dict if is_extra_parameter(name)]
    if extra:
        raise UserError(
            f"{paths.weights} holds LoRA or adapter weights ({extra[0]!r}), which have no Hugging Face name: "
            "merge them into the base model first"
        )
    check_layer_count(config, lit_state_dict, paths.weights, paths.config_file or "the model config")
    with torch.device("meta"):
        check_state_dict_fits(LLaMA(config), lit_state_dict, paths.weights)

    hf_state_dict: Dict[str, torch.Tensor] = {}
    for name, tensor in lit_to_hf(tqdm(lit_state_dict.items(), desc="Converting", unit="tensor"), config):
        # q/k/v are views of one fused weight, but safetensors wants each tensor in its own memory
        hf_state_dict[name] = tensor.clone() if name.split(".")[-2] in QKV else tensor
    dtype = hf_state_dict["model.embed_tokens.weight"].dtype

    tokenizer = Tokenizer(paths.tokenizer)
    save_atomic(hf_state_dict, out_dir / WEIGHTS_FILE, lambda sd, tmp: save_file(sd, str(tmp), {"format": "pt"}))
    stops = list(tokenizer.stop_ids)  # several where generation_config.json lists several (Llama 3 Instruct)
    hf_config = hf_config_from(config, dtype, bos_token_id=tokenizer.bos_id,
                               eos_token_id=stops[0] if len(stops) == 1 else stops or None)
    write_text_atomic(json.dumps(hf_config, indent=2) + "\n", out_dir / "config.json")
    copy_tokenizer(paths.tokenizer, out_dir)
    n_params = sum(t.numel() for t in hf_state_dict.values())
    print(f"Converted {n_params:,} parameters ({str(dtype).removeprefix('torch.')}) to {out_dir}")


def hf_config_from(
    config: Config, dtype: torch.dtype, bos_token_id: Optional[int], eos_token_id: Union[int, List[int], None]
) -> Dict[str, Any]:
    """transformers' config fields for our Config (LlamaConfig, Qwen2Config or MistralConfig, as
    `lit_llama.convert.hf_architecture` says), readable by transformers 4 and 5. Tied embeddings stay tied: the
    file has no lm_head.weight and `tie_word_embeddings` makes transformers share the embedding."""
    model_type = hf_architecture(config)
    rope_scaling = dict(config.rope_scaling) if config.rope_scaling else None
    family: Dict[str, Any] = {
        "llama": {"attention_bias": False, "mlp_bias": False},
        "qwen2": {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer},
        "mistral": {"sliding_window": config.sliding_window},
    }[model_type]
    return {
        "architectures": [HF_MODEL_TYPES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        # transformers < 5 reads rope_theta, transformers >= 5 rope_parameters
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": dict(rope_scaling or {"rope_type": "default"}, rope_theta=config.rope_theta),
        **family,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


if __name__ == "__main__":
    run_cli(convert)
