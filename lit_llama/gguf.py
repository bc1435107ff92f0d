"""GGUF, llama.cpp's file format, in and out, for LLaMA-family models (llama, mistral, qwen2 architectures).

A GGUF file holds a model's weights (each tensor in its own type: float, or quantized in blocks), its settings
as metadata under llama.cpp's key names, and its tokenizer as metadata too (the vocabulary, the merges or
scores, the special token ids, the chat template). There is no config.json and no tokenizer file in it.

In (`scripts/convert_gguf_checkpoint.py`): `gguf_to_hf` turns a GGUF file into the Hugging Face form the rest of
the package already reads (config.json, safetensors weights under HF names, tokenizer files), which the HF
converter then turns into a checkpoint folder. Three things are undone on the way:

* the weights are dequantized with the `gguf` package (float32);
* llama.cpp reorders the rows of q and k of the `llama` architecture so that its rotary embedding can rotate
  neighbouring pairs of a head's dimensions (Meta's original layout); the rows are put back in Hugging Face's
  rotate-half order, the same permutation as for Meta's checkpoints (`lit_llama.convert.permute_meta`). qwen2
  files are stored unpermuted (llama.cpp rotates them the "NeoX" way, which is rotate-half);
* the tokenizer metadata becomes tokenizer files (`lit_llama.gguf_tokenizer`, which holds the tokenizer's way
  in and out of GGUF).

Out (`scripts/export_gguf.py`): `write_gguf` does the reverse for one of our models: HF names -> GGUF names,
q/k rows permuted, weights in f32, f16, bf16 or q8_0, the tokenizer as metadata, and a chat template.

This module holds the format's names and tensor types, then reading, then writing.
"""

import json
import math
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from lit_llama.cli import UserError
from lit_llama.convert import permute_meta, unpermute_meta
from lit_llama.gguf_tokenizer import TokenizerMetadata, add_tokenizer, tokenizer_files, tokenizer_from_metadata

# --- names ---------------------------------------------------------------------------------------------------

# GGUF tensor name -> Hugging Face name; "{}" is the layer index
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
HF_TO_GGUF = {hf: gguf for gguf, hf in GGUF_TO_HF.items()}
# llama.cpp's precomputed RoPE frequency factors (Llama 3.1 and later): a setting, not a weight
ROPE_FREQS = "rope_freqs.weight"

# architecture -> (Hugging Face model_type, class); which ones have llama.cpp's q/k row permutation
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
}
PERMUTED_ARCHITECTURES = ("llama", "mistral")


def _rename(name: str, table: Dict[str, str]) -> Optional[str]:
    """`name` looked up in `table` with its layer index (the first number between dots) as "{}"."""
    match = re.search(r"\.(\d+)\.", name)
    if match is None:
        return table.get(name)
    target = table.get(name[: match.start()] + ".{}." + name[match.end():])
    return target.format(match.group(1)) if target is not None else None


# --- tensor types ----------------------------------------------------------------------------------------------


def _quant_types() -> Dict[str, Any]:
    from gguf import GGMLQuantizationType as T

    return {t.name: t for t in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
                                T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)}


# --- reading ------------------------------------------------------------------------------------------------------


def import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError("reading and writing GGUF files needs the gguf package: pip install gguf") from None
    return gguf


def open_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` of `path`, refused in one line if the file is not a whole GGUF file."""
    gguf = import_gguf()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--gguf_file {path} does not exist or is not a file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader fails with ValueError, IndexError, struct errors, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable GGUF file (truncated or not GGUF?): {reason}") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        # numpy's memory map gives a short array past the end of a cut file: say so before anything reads it
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise UserError(f"{path} is truncated: tensor {tensor.name!r} ends at byte {end:,}, the file has {size:,}")
    return reader


def field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value: a number, a string, or a list of them (read through the field's parts, which every
    gguf release since 0.10 has)."""
    from gguf import GGUFValueType

    f = reader.fields.get(key)
    if f is None:
        return default

    def value(part: np.ndarray, vtype: Any) -> Any:
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        if vtype == GGUFValueType.BOOL:
            return bool(part[0])
        return part[0].item()

    if f.types[0] == GGUFValueType.ARRAY:
        if f.types[-1] in (GGUFValueType.STRING, GGUFValueType.BOOL):
            return [value(f.parts[i], f.types[-1]) for i in f.data]
        return np.concatenate([f.parts[i] for i in f.data]).tolist() if f.data else []
    return value(f.parts[f.data[0]], f.types[0])


def architecture(reader: Any, path: Path) -> str:
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: architecture {arch!r} is not a LLaMA-family model this converter reads "
                        f"(it reads {', '.join(ARCHITECTURES)})")
    return arch


def hf_config(reader: Any, path: Path) -> Dict[str, Any]:
    """The Hugging Face config.json of a GGUF file, from its metadata and tensor shapes."""
    arch = architecture(reader, path)
    model_type, cls = ARCHITECTURES[arch]
    tensors = {t.name: t for t in reader.tensors}

    def required(key: str) -> Any:
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise UserError(f"{path}: metadata {arch}.{key} is missing")
        return value

    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: no tensor 'token_embd.weight'; is it a whole model?")
    vocab_size, hidden_size = (int(n) for n in reversed(tensors["token_embd.weight"].shape.tolist()))
    n_head = int(required("attention.head_count"))
    config: Dict[str, Any] = {
        "architectures": [cls],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": int(required("feed_forward_length")),
        "num_hidden_layers": int(required("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(field(reader, f"{arch}.attention.head_count_kv", n_head)),
        "max_position_embeddings": int(field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(required("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "head_dim": int(field(reader, f"{arch}.attention.key_length",
                              field(reader, f"{arch}.rope.dimension_count", hidden_size // n_head))),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    if arch != "qwen2" and any(name.endswith("attn_q.bias") for name in tensors):
        config["attention_bias"] = True
    window = field(reader, f"{arch}.attention.sliding_window")
    if window:
        config["sliding_window"] = int(window)
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        token = field(reader, f"tokenizer.ggml.{name}")
        if token is not None:
            config[key] = int(token)
    scaling = rope_scaling(reader, arch, config, path)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


# Llama 3.x's RoPE scaling settings (factor 8 for 3.1 and 3.3, 32 for 3.2): llama.cpp stores only the factors
# they produce (rope_freqs.weight), so the settings are found by recomputing those and comparing
LLAMA3_ROPE_SETTINGS = [
    {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192}
    for factor in (8.0, 32.0)
]


def llama3_rope_factors(scaling: Dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """What each rotary frequency is divided by under `llama3` scaling (as llama.cpp's converter computes it)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling["factor"])
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.array(factors)


def rope_scaling(reader: Any, arch: str, config: Dict[str, Any], path: Path) -> Optional[Dict[str, Any]]:
    """The HF `rope_scaling` of a file: from `rope.scaling.*` metadata, or recognised from `rope_freqs.weight`.
    Types other than linear and llama3 are passed on as they are, for the HF config reader to refuse."""
    kind = field(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        scaling: Dict[str, Any] = {"rope_type": kind, "factor": float(field(reader, f"{arch}.rope.scaling.factor", 1.0))}
        original = field(reader, f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if tensor is None:
        return None
    stored = dequantized(tensor, path).numpy().astype(np.float64)
    for scaling in LLAMA3_ROPE_SETTINGS:
        expected = llama3_rope_factors(scaling, config["head_dim"], config["rope_theta"])
        if expected.shape == stored.shape and np.allclose(stored, expected, rtol=1e-5):
            return dict(scaling)
    raise UserError(f"{path}: tensor {ROPE_FREQS!r} holds RoPE frequency factors of no known scaling "
                    "(Llama 3.1/3.2/3.3's llama3 scaling is read)")


def dequantized(tensor: Any, path: Path) -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor of its logical shape (rows, columns)."""
    from gguf import dequantize

    types = _quant_types()
    if tensor.tensor_type.name not in types:
        raise UserError(f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which is not read here "
                        f"(supported: {', '.join(types)})")
    values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dimensions innermost first
    return torch.from_numpy(values.reshape(shape).copy())


def hf_tensors(reader: Any, config: Dict[str, Any], path: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """The weights under Hugging Face names, float32, one at a time, q/k rows back in rotate-half order."""
    permuted = config["model_type"] in PERMUTED_ARCHITECTURES
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue  # read into the config
        name = _rename(tensor.name, GGUF_TO_HF)
        if name is None:
            raise UserError(f"{path}: unexpected tensor {tensor.name!r} for a LLaMA-family model")
        weight = dequantized(tensor, path)
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            if weight.shape[0] % (2 * heads):
                raise UserError(f"{path}: tensor {tensor.name!r} has {weight.shape[0]} rows, not a whole number of "
                                f"heads ({heads})")
            weight = permute_meta(weight, heads)
        yield name, weight


def read_tokenizer(reader: Any, path: Path) -> TokenizerMetadata:
    """The tokenizer a GGUF file holds (its `tokenizer.*` metadata)."""
    values = {key: field(reader, key) for key in reader.fields if key.startswith("tokenizer.")}
    return tokenizer_from_metadata(values, path)


def gguf_to_hf(gguf_file: Path, folder: Path, dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
    """Writes a GGUF file as a Hugging Face model folder: config.json, the weights (one safetensors file per
    tensor, listed in model.safetensors.index.json, so only one tensor is in memory at a time) and the
    tokenizer files. Returns the config."""
    from safetensors.torch import save_file

    gguf_file, folder = Path(gguf_file), Path(folder)
    reader = open_gguf(gguf_file)
    config = hf_config(reader, gguf_file)
    meta = read_tokenizer(reader, gguf_file)
    if len(meta.tokens) > config["vocab_size"]:
        raise UserError(f"{gguf_file}: the tokenizer has {len(meta.tokens)} tokens but the embedding only "
                        f"{config['vocab_size']} rows: they do not belong together")
    files = tokenizer_files(meta)  # before the weights: a bad tokenizer is refused without minutes of work
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, (name, tensor) in enumerate(hf_tensors(reader, config, gguf_file)):
        shard = f"model-{i:05d}.safetensors"
        save_file({name: tensor.to(dtype)}, str(folder / shard))
        weight_map[name] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return config


# --- writing ------------------------------------------------------------------------------------------------------

EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's general.file_type numbers (LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_BF16)
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


def export_type(shape: Sequence[int], dtype: str) -> Any:
    """The GGML type a weight of `shape` gets in an export of `dtype`. Vectors (norms, biases) stay float32, as
    llama.cpp keeps them, and a matrix whose rows are not whole q8_0 blocks of 32 is written in f16."""
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1 or dtype == "f32":
        return T.F32
    if dtype == "f16" or (dtype == "q8_0" and shape[-1] % 32):
        return T.F16
    return T.BF16 if dtype == "bf16" else T.Q8_0


def quantized(tensor: torch.Tensor, qtype: Any) -> np.ndarray:
    """A weight in GGML type `qtype`: float32/float16 arrays, or the bytes of bf16 / q8_0 blocks."""
    from gguf import GGMLQuantizationType as T
    from gguf import quantize

    data = tensor.detach().to(torch.float32).cpu().numpy()
    if qtype == T.F32:
        return data
    if qtype == T.F16:
        return data.astype(np.float16)
    return quantize(data, qtype)


def dequantize_like_export(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """`tensor` rounded as an export in `dtype` stores it: what a reader of the file gets back."""
    from gguf import dequantize

    qtype = export_type(tuple(tensor.shape), dtype)
    values = np.asarray(dequantize(quantized(tensor, qtype), qtype), dtype=np.float32)
    return torch.from_numpy(values.reshape(tuple(tensor.shape)).copy())


def write_gguf(
    out_file: Path,
    hf_tensors: Iterable[Tuple[str, torch.Tensor]],
    config: Any,
    tokenizer: TokenizerMetadata,
    dtype: str,
    name: str,
    tied: bool = False,
) -> None:
    """Writes a model given as Hugging Face tensors (`lit_llama.convert.lit_to_hf`) and its config (ours) as a
    GGUF file llama.cpp runs. `tied`: the output layer is the embedding matrix, so no output.weight is written.

    A model with q/k/v biases is written as llama.cpp's `qwen2` architecture (its `llama` has no biases); a head
    size apart from n_embd / n_head as the key/value lengths; RoPE scaling as llama.cpp reads it: `linear` in
    the rope.scaling metadata, `llama3` as the factors each frequency is divided by (rope_freqs.weight), which
    is how llama.cpp's own converter writes Llama 3.1 and later.

    The header (every tensor's name, type and shape) is written first, then the tensors one at a time, each
    converted just before it is written: memory holds the model and one converted tensor, not a second copy."""
    gguf = import_gguf()
    from gguf import GGML_QUANT_SIZES

    tensors = [(n, t) for n, t in hf_tensors if not (tied and n == "lm_head.weight")]
    arch = "qwen2" if any(n.endswith("q_proj.bias") for n, _ in tensors) else "llama"  # llama.cpp: no biases in llama
    writer = gguf.GGUFWriter(str(out_file), arch)
    writer.add_name(name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_size)
    if config.head_size != config.n_embd // config.n_head:
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
    scaling = config.rope_scaling
    if scaling is not None and scaling["rope_type"] == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif scaling is not None:  # llama3
        factors = llama3_rope_factors(scaling, config.head_size, config.rope_theta).astype(np.float32)
        tensors.append((ROPE_FREQS, torch.from_numpy(factors)))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[dtype])
    add_tokenizer(writer, tokenizer, config.vocab_size)
    plan = []
    for hf_name, tensor in tensors:
        gguf_name = ROPE_FREQS if hf_name == ROPE_FREQS else _rename(hf_name, HF_TO_GGUF)
        if gguf_name is None:
            raise UserError(f"tensor {hf_name!r} has no GGUF name: a model this exporter does not know")
        qtype = export_type(tuple(tensor.shape), dtype)
        block, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = tensor.numel() // block * type_size
        writer.add_tensor_info(gguf_name, tuple(tensor.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
        plan.append((hf_name, tensor, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, tensor, qtype in plan:
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = unpermute_meta(tensor, config.n_head if "q_proj" in hf_name else config.n_query_groups)
        writer.write_tensor_data(quantized(tensor, qtype))
    writer.close()


