"""Weight-name mappings between our checkpoints, Hugging Face `LlamaForCausalLM` and Meta's original release.

Used by scripts/convert_hf_checkpoint.py (HF -> lit), scripts/convert_meta_checkpoint.py (Meta -> lit),
scripts/convert_lit_llama_checkpoint.py (Lit-LLaMA -> lit) and scripts/export_hf.py (lit -> HF); PEFT's LoRA
adapters are in lit_llama/peft.py. Meta's names are first renamed to Hugging Face's (with the
rotary permutation of q/k), so HF -> lit is the one mapping every converter shares.

The mappings work on a stream of `(name, tensor)` pairs: a converter reads one tensor at a time and never
holds more than the tensors it has already converted, plus at most one layer's q/k/v waiting to be fused.
"""

import math
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from lit_llama.checkpoint import check_finite
from lit_llama.cli import UserError
from lit_llama.lora import LoRAConfig
from lit_llama.model import Config, LLaMA

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Hugging Face name -> our name; "{}" is the layer index
HF_TO_LIT = {
    "model.embed_tokens.weight": "transformer.wte.weight",
    "model.layers.{}.input_layernorm.weight": "transformer.h.{}.rms_1.weight",
    "model.layers.{}.self_attn.q_proj.weight": "transformer.h.{}.attn.c_attn.weight",
    "model.layers.{}.self_attn.k_proj.weight": "transformer.h.{}.attn.c_attn.weight",
    "model.layers.{}.self_attn.v_proj.weight": "transformer.h.{}.attn.c_attn.weight",
    # Qwen2's q/k/v biases, fused like the weights
    "model.layers.{}.self_attn.q_proj.bias": "transformer.h.{}.attn.c_attn.bias",
    "model.layers.{}.self_attn.k_proj.bias": "transformer.h.{}.attn.c_attn.bias",
    "model.layers.{}.self_attn.v_proj.bias": "transformer.h.{}.attn.c_attn.bias",
    "model.layers.{}.self_attn.o_proj.weight": "transformer.h.{}.attn.c_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "transformer.h.{}.rms_2.weight",
    "model.layers.{}.mlp.gate_proj.weight": "transformer.h.{}.mlp.c_fc1.weight",
    "model.layers.{}.mlp.up_proj.weight": "transformer.h.{}.mlp.c_fc2.weight",
    "model.layers.{}.mlp.down_proj.weight": "transformer.h.{}.mlp.c_proj.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}
# the three HF projections fused, in this order, into our c_attn
QKV = ("q_proj", "k_proj", "v_proj")
LIT_TO_HF = {lit: hf for hf, lit in HF_TO_LIT.items() if not any(p in hf for p in QKV)}

# Meta's original name -> Hugging Face name (w1 is the gate, w3 the up projection)
META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Meta's model-parallel shards split each weight along the dimension its parallel layer is split on;
# weights not listed (the norms) are replicated in every shard
META_SHARD_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "output": 0}

# buffers some checkpoints carry that are recomputed, not learned: skipped on conversion
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rope.freqs")


def is_ignored(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _rename(name: str, table: Dict[str, str]) -> Optional[str]:
    """Looks `name` up in `table` with its layer index (the first number) replaced by "{}"."""
    match = re.search(r"\.(\d+)\.", name)
    if match is None:
        return table.get(name)
    template = name[: match.start()] + ".{}." + name[match.end() :]
    target = table.get(template)
    return target.format(match.group(1)) if target is not None else None


# --- Hugging Face <-> lit --------------------------------------------------------------------

# Hugging Face model types this model computes exactly, with their transformers class
HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def config_from_hf(hf: Dict[str, Any]) -> Config:
    """Builds a config from a Hugging Face `config.json` of a LLaMA-architecture model: LlamaForCausalLM
    (LLaMA, Llama 2 and 3.x, SmolLM2, TinyLlama), Qwen2ForCausalLM (Qwen2.5) or MistralForCausalLM. Anything
    this model cannot compute exactly is a ValueError naming the field."""
    if not isinstance(hf, dict):
        raise ValueError(f"expected a JSON object of model settings, got a {type(hf).__name__}")
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        raise ValueError(f"field 'architectures' is {archs!r}, expected a list of class names")
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES and not set(archs) & set(HF_MODEL_TYPES.values()):
        found = model_type or ", ".join(map(str, archs)) or "unknown"
        raise ValueError(f"unsupported architecture {found!r}: not a LLaMA-architecture model (supported "
                         f"model_type: {', '.join(HF_MODEL_TYPES)})")
    model_type = model_type if model_type in HF_MODEL_TYPES else next(
        t for t, a in HF_MODEL_TYPES.items() if a in archs)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"field 'hidden_act' is {hf['hidden_act']!r}: only SwiGLU ('silu') is supported")
    # transformers < 5 writes rope_theta / rope_scaling, transformers >= 5 a rope_parameters dict
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"field 'rope_parameters' is {rope!r}, expected an object")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or rope
    if not isinstance(scaling, dict):
        raise ValueError(f"field 'rope_scaling' is {scaling!r}, expected an object")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    rope_scaling = None if rope_type == "default" else dict(scaling, rope_type=rope_type)
    # Qwen2 has biases on q/k/v (always); LLaMA's attention_bias would put one on o_proj too
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("field 'attention_bias' or 'mlp_bias' is true: biases on o_proj or the MLP are not "
                         "supported")
    sliding_window = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("field 'use_sliding_window' is true: Qwen2's per-layer sliding window is not supported")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if isinstance(hf[key], bool) or not isinstance(hf[key], int) or hf[key] < 1:
            raise ValueError(f"field {key!r} is {hf[key]!r}, expected a positive integer")
    n_head, n_embd = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim")
    block_size = hf.get("max_position_embeddings", 2048)
    if sliding_window is not None and isinstance(block_size, int) and sliding_window >= block_size:
        sliding_window = None  # a window as long as the context changes nothing
    return Config(
        block_size=block_size,
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_embd=n_embd,
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        head_dim=None if head_dim in (None, n_embd // n_head) else head_dim,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        rope_scaling=rope_scaling,
        sliding_window=sliding_window,
    )


def hf_architecture(config: Config) -> str:
    """The model_type transformers builds `config` as: Qwen2 for q/k/v biases, Mistral for a sliding window, else
    LLaMA (a Mistral without a window, like v0.3, is a LLaMA)."""
    return "qwen2" if config.qkv_bias else "mistral" if config.sliding_window else "llama"


def hf_to_lit(tensors: Iterable[Tuple[str, torch.Tensor]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Renames a stream of Hugging Face tensors to ours. A layer's q/k/v projections are held until all
    three have arrived, then fused into one c_attn weight (rows [q | k | v])."""
    pending: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        lit_name = _rename(name, HF_TO_LIT)
        if lit_name is None:
            raise KeyError(f"unexpected tensor {name!r}")
        part = next((p for p in QKV if f".{p}." in name), None)
        if part is None:
            yield lit_name, tensor
            continue
        parts = pending.setdefault(lit_name, {})
        parts[part] = tensor
        if len(parts) == len(QKV):
            del pending[lit_name]
            yield lit_name, concat_qkv(parts["q_proj"], parts["k_proj"], parts["v_proj"])


def lit_to_hf(tensors: Iterable[Tuple[str, torch.Tensor]], config: Config) -> Iterator[Tuple[str, torch.Tensor]]:
    """Renames a stream of our tensors to Hugging Face's, splitting c_attn back into q/k/v projections. With
    tied embeddings the output layer is not written: transformers ties it to the embedding on loading."""
    for name, tensor in tensors:
        if name.endswith((".attn.c_attn.weight", ".attn.c_attn.bias")):
            layer, kind = name.split(".")[2], name.split(".")[-1]  # transformer.h.{i}.attn.c_attn.{weight,bias}
            for part, weight in zip(QKV, split_qkv(tensor, config)):
                yield f"model.layers.{layer}.self_attn.{part}.{kind}", weight
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        hf_name = _rename(name, LIT_TO_HF)
        if hf_name is None:
            raise KeyError(f"unexpected tensor {name!r}")
        yield hf_name, tensor


def concat_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat((q, k, v), dim=0)


def split_qkv(c_attn: torch.Tensor, config: Config) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_size, kv_size = config.n_head * config.head_size, config.n_query_groups * config.head_size
    q, k, v = c_attn.split((q_size, kv_size, kv_size), dim=0)
    return q, k, v


def expected_hf_shapes(config: Config) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every weight a Hugging Face checkpoint of this config has (no memory allocated)."""
    with torch.device("meta"):
        state_dict = LLaMA(config).state_dict()
    return {name: tuple(t.shape) for name, t in lit_to_hf(state_dict.items(), config)}


def check_tensor(name: str, tensor: torch.Tensor, expected: Dict[str, Tuple[int, ...]], source: Path) -> None:
    """A weight read from `source` must be one the config expects, with the expected shape."""
    if name not in expected:
        raise UserError(f"{source}: unexpected tensor {name!r}; is it a LLaMA-architecture checkpoint?")
    if tuple(tensor.shape) != expected[name]:
        raise UserError(
            f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the model config expects {expected[name]}"
        )


def converted_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype, source: Path) -> torch.Tensor:
    """`tensor` as a fresh copy in `dtype` (never a view into a memory-mapped file), refused if it holds NaN or
    infinite values (a trained model has none: corrupted bytes), or values too large for `dtype`."""
    check_finite({name: tensor}, source)
    converted = tensor.to(dtype=dtype, copy=True)
    if not torch.isfinite(converted).all():
        raise UserError(f"{source}: tensor {name!r} holds values too large for {str(dtype).removeprefix('torch.')} "
                        "(give --dtype bfloat16 or float32)")
    return converted


def check_complete(seen: Iterable[str], expected: Dict[str, Tuple[int, ...]], source: Path) -> None:
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise UserError(f"{source}: missing {len(missing)} tensors, e.g. {missing[0]!r}")


# --- Meta's original checkpoints ---------------------------------------------------------------


def meta_to_hf_name(name: str) -> Optional[str]:
    return _rename(name, META_TO_HF)


def permute_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's q/k weights -> Hugging Face's. Meta's rotary embedding rotates neighbouring pairs of a head's
    dimensions (0,1), (2,3), ...; HF's (and ours) rotates dimension i with i + head_size/2. Reordering the
    output rows of wq/wk (as transformers' convert_llama_weights_to_hf.py does) makes them equivalent."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def unpermute_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_meta`: Hugging Face's q/k weights -> Meta's."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def merge_meta_shards(name: str, shards: List[torch.Tensor]) -> torch.Tensor:
    """Joins the pieces of one weight from Meta's model-parallel files (consolidated.00.pth, .01, ...)."""
    if len(shards) == 1:
        return shards[0]
    dim = META_SHARD_DIM.get(name.split(".")[-2])  # "layers.0.attention.wq.weight" -> "wq"
    if dim is None:  # replicated: every shard holds the same norm weights
        return shards[0]
    return torch.cat(shards, dim=dim)


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """The SwiGLU hidden size exactly as Meta's model.py computes it from params.json."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


# --- Lit-LLaMA's own checkpoints (github.com/Lightning-AI/lit-llama) ------------------------------------------
#
# Lit-LLaMA used our tensor names with three differences: RMSNorm weights are called `.scale`; the q/k rows of
# c_attn are in Meta's interleaved rotary layout (its converters kept Meta's order, and permuted Hugging Face
# weights back to it), so they are permuted like Meta's (`permute_meta`); and its finetuned files are bare
# tensor dicts without settings. The head count is not in the tensors: it comes from Lit-LLaMA's size names.

LIT_LLAMA_N_HEAD = {"7B": 32, "13B": 40, "30B": 52, "65B": 64}  # Lit-LLaMA's llama_configs
LIT_LLAMA_NORM_EPS = 1e-5  # Lit-LLaMA's RMSNorm default (Meta's reference uses 1e-6)
LIT_LLAMA_BLOCK_SIZE = 2048
LIT_LLAMA_SCRIPT = "scripts/convert_lit_llama_checkpoint.py"


def is_lit_llama_base(names: Iterable[str]) -> bool:
    """Lit-LLaMA's base checkpoints call the RMSNorm weights `rms_1.scale`, `rms_2.scale`, `ln_f.scale`."""
    return any(name.endswith(("rms_1.scale", "rms_2.scale", "ln_f.scale")) for name in names)


def is_lit_llama_lora(names: Iterable[str]) -> bool:
    return any(name.endswith((".lora_A", ".lora_B")) for name in names)


def lit_llama_config(tensors: Dict[str, torch.Tensor], n_head: int, source: Path) -> Config:
    """The model shape of a Lit-LLaMA base checkpoint, read from its tensors (the head count given)."""
    try:
        vocab_size, n_embd = tensors["transformer.wte.weight"].shape
        intermediate_size = tensors["transformer.h.0.mlp.c_fc1.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"{source}: no tensor {e.args[0]!r}; is it a Lit-LLaMA base checkpoint?")
    n_layer = len({name.split(".")[2] for name in tensors if name.startswith("transformer.h.")})
    try:
        return Config(block_size=LIT_LLAMA_BLOCK_SIZE, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, intermediate_size=intermediate_size, norm_eps=LIT_LLAMA_NORM_EPS)
    except ValueError as e:
        raise UserError(f"{source}: {e} (wrong --n_head or --model_size?)")


def permute_qk_rows(t: torch.Tensor, config: Config, parts: Sequence[str] = ("q", "k", "v")) -> torch.Tensor:
    """Rows of a c_attn-shaped tensor (the weight, a per-row vector, or LoRA's stacked B) from Meta's rotary
    layout to ours: the q and k blocks among `parts` are permuted per head, v stays. Lit-LLaMA has no
    grouped-query attention: every block is n_embd rows."""
    blocks = t.split(config.n_embd)
    out = []
    for part, block in zip(parts, blocks):
        if part in ("q", "k"):
            block = permute_meta(block.reshape(config.n_embd, -1), config.n_head).reshape(block.shape)
        out.append(block)
    return torch.cat(out)


def lit_llama_to_lit(tensors: Dict[str, torch.Tensor], config: Config) -> Iterator[Tuple[str, torch.Tensor]]:
    """A Lit-LLaMA base (or adapter v2 norm) tensor stream renamed to ours, q/k rows permuted."""
    for name, tensor in tensors.items():
        if name.endswith(".scale") and (".rms_" in name or "ln_f" in name):
            yield name.removesuffix(".scale") + ".weight", tensor
        elif name.endswith(".attn.c_attn.weight"):
            yield name, permute_qk_rows(tensor, config)
        else:
            yield name, tensor


def lit_llama_lora_to_lit(
    tensors: Dict[str, torch.Tensor], lora: LoRAConfig, config: Config, source: Path
) -> Dict[str, torch.Tensor]:
    """Lit-LLaMA's `MergedLinear` LoRA (c_attn only): A stacked [A_q; A_v], B stacked [B_q; B_v] (rows of the
    enabled parts), the same stacking as ours; B's q/k rows are permuted to our rotary layout."""
    parts = [p for p, on in zip("qkv", (lora.query, lora.key, lora.value)) if on]
    ours = {}
    for name, tensor in tensors.items():
        if not re.fullmatch(r"transformer\.h\.\d+\.attn\.c_attn\.lora_[AB]", name):
            raise UserError(f"{source}: unexpected tensor {name!r}; Lit-LLaMA's LoRA adapts c_attn only")
        if int(name.split(".")[2]) >= config.n_layer:
            raise UserError(f"{source}: {name!r} is for a deeper model than the base ({config.n_layer} layers)")
        expected = (lora.r * len(parts), config.n_embd) if name.endswith("A") else (config.n_embd * len(parts), lora.r)
        if tuple(tensor.shape) != expected:
            raise UserError(
                f"{source}: {name!r} has shape {tuple(tensor.shape)}, expected {expected} for r={lora.r} on "
                f"{'/'.join(parts)} and n_embd={config.n_embd} (other targets? give --lora_query/--lora_key/--lora_value)"
            )
        ours[name] = permute_qk_rows(tensor, config, parts) if name.endswith("B") else tensor
    expected_names = {f"transformer.h.{i}.attn.c_attn.lora_{ab}" for i in range(config.n_layer) for ab in "AB"}
    missing = sorted(expected_names - set(ours))
    if missing:
        raise UserError(f"{source}: missing {missing[0]!r}; our LoRA adapts every layer")
    return ours


def lit_llama_adapter_to_lit(
    tensors: Dict[str, torch.Tensor], config: Config, source: Path
) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Lit-LLaMA's adapter v1 (`adapter_wte`, `gating_factor`) or v2 (also `adapter_scale` / `adapter_bias` on
    every linear layer and trained RMSNorm `.scale`s) -> our tensors and adapter settings.

    v2 computes y = scale * (W x + bias), ours y = scale * W x + bias': bias' = scale * bias. Per-row vectors
    of c_attn get the q/k permutation. The prompt length and first adapted layer come from the tensors."""
    layers = sorted(int(n.split(".")[2]) for n in tensors if n.endswith(".attn.adapter_wte.weight"))
    if not layers:
        raise UserError(f"{source}: no adapter_wte tensors; is it a Lit-LLaMA adapter checkpoint?")
    start = layers[0]
    if layers != list(range(start, config.n_layer)):
        raise UserError(f"{source}: adapter prompts in layers {layers}; expected every layer from {start} on")
    prompt_length = tensors[f"transformer.h.{start}.attn.adapter_wte.weight"].shape[0]
    version = 2 if any(n.endswith(".adapter_scale") for n in tensors) else 1
    ours: Dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(".adapter_wte.weight"):
            ours[name] = tensor
        elif name.endswith(".attn.gating_factor"):
            # early Lit-LLaMA versions had one gate for all heads: repeated per head, as Lit-LLaMA itself does
            gate = tensor.reshape(1, -1, 1, 1)
            ours[name.replace("gating_factor", "adapter_gating_factor")] = gate.expand(1, config.n_head, 1, 1).clone() \
                if gate.numel() == 1 else gate
        elif name.endswith(".adapter_scale") or name.endswith(".adapter_bias"):
            pass  # below, scale and bias together
        elif version == 2 and name.endswith(".scale"):
            ours.update(lit_llama_to_lit({name: tensor}, config))
        else:
            raise UserError(f"{source}: unexpected tensor {name!r} in a Lit-LLaMA adapter checkpoint")
    if version == 2:
        for name in [n for n in tensors if n.endswith(".adapter_scale")]:
            layer = name.removesuffix(".adapter_scale")
            scale, bias = tensors[name], tensors.get(f"{layer}.adapter_bias")
            if bias is None:
                raise UserError(f"{source}: {layer}.adapter_bias is missing")
            bias = scale * bias
            if layer.endswith("attn.c_attn"):
                scale, bias = permute_qk_rows(scale, config), permute_qk_rows(bias, config)
            ours[f"{layer}.adapter_scale"], ours[f"{layer}.adapter_bias"] = scale, bias
    fields = {"adapter_version": version, "adapter_prompt_length": prompt_length, "adapter_start_layer": start}
    return ours, fields
