"""The LLaMA language model in one file: LLaMA 1, Llama 2, OpenLLaMA, TinyLlama, and the models built the same
way since: Llama 3.x, SmolLM2, Qwen2.5 and Mistral. They differ only in `Config` fields: tied input/output
embeddings, RoPE scaling, biases on q/k/v, a head size apart from n_embd / n_head, and a sliding window.

Read top to bottom: `Config` (sizes), `LLaMA` (embedding -> blocks -> norm -> head), `Block`,
`CausalSelfAttention` (fused q/k/v projection, rotary embeddings, grouped-query attention, KV cache),
`MLP` (SwiGLU), `RMSNorm`, and the rotary-embedding helpers.
"""

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from lit_llama.packed_attention import packed_attention, packed_spans

MAX_BLOCK_SIZE = 2**24


@dataclass
class Config:
    block_size: int = 2048  # longest sequence the model was trained on
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_embd: int = 4096
    n_query_groups: Optional[int] = None  # key/value heads; None = n_head (multi-head), fewer = grouped-query
    intermediate_size: Optional[int] = None  # SwiGLU hidden size; None = LLaMA's rule of thumb below
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    head_dim: Optional[int] = None  # size of one attention head; None = n_embd // n_head (Mistral's can differ)
    tie_embeddings: bool = False  # the output layer is the input embedding (SmolLM2, Llama 3.2, small Qwen2.5)
    qkv_bias: bool = False  # the q/k/v projection has a bias (Qwen2)
    # RoPE scaling for long contexts: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} (Llama 3.1 and later) or {"rope_type": "linear", "factor"}
    rope_scaling: Optional[Dict[str, Any]] = None
    sliding_window: Optional[int] = None  # Mistral: each position sees this many before it (longer is refused)

    def __post_init__(self) -> None:
        # every size is a positive number of its type, whichever file it came from (a ValueError naming it)
        for field in dataclasses.fields(Config):
            value = getattr(self, field.name)
            if value is None and "Optional" in str(field.type):
                continue
            if field.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise ValueError(f"field {field.name!r} is {value!r}, expected true or false")
                continue
            if field.name == "rope_scaling":
                self.rope_scaling = check_rope_scaling(value)
                continue
            number = float if "float" in str(field.type) else int
            # JSON has one number type: 1 is a fine float, 1.5 is not an int; true/false are not numbers
            wrong_type = isinstance(value, bool) or not isinstance(value, (int, float))
            if wrong_type or (number is int and value != int(value)):
                expected = "an integer" if number is int else "a number"
                raise ValueError(f"field {field.name!r} is {value!r}, expected {expected}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"field {field.name!r} is {value!r}, expected a positive number")
            setattr(self, field.name, number(value))
        if self.block_size > MAX_BLOCK_SIZE:
            # the rotary tables hold positions as float32, exact only up to 2**24
            raise ValueError(f"field 'block_size' is {self.block_size}, more than the {MAX_BLOCK_SIZE} positions "
                             "a model here can tell apart")
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.n_embd % self.n_head and self.head_dim is None:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_query_groups ({self.n_query_groups})")
        if self.intermediate_size is None:
            # LLaMA: 2/3 of 4*n_embd, rounded up to a multiple of 256
            hidden = int(2 * 4 * self.n_embd / 3)
            self.intermediate_size = 256 * math.ceil(hidden / 256)

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def context_length(self) -> int:
        """The longest sequence this model computes: block_size, or a shorter sliding window (Mistral v0.1)."""
        return min(self.block_size, self.sliding_window or self.block_size)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        if name not in llama_configs:
            raise ValueError(f"unknown model size {name!r}; known sizes: {', '.join(llama_configs)}")
        return replace(cls(**llama_configs[name]), **overrides)

    @classmethod
    def from_json(cls, path: Path) -> "Config":
        """Reads a config written by `to_json`; a field of the wrong type or value is a ValueError naming it."""
        try:
            fields = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"not valid JSON ({e})")
        if not isinstance(fields, dict):
            raise ValueError("expected a JSON object of config fields")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [name for name in fields if name not in known]
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}")
        return cls(**fields)  # __post_init__ checks each value

    def to_json_text(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def to_json(self, path: Path) -> None:
        Path(path).write_text(self.to_json_text())


_llama_7b = dict(n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008)
_llama_13b = dict(n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824)
_llama3_rope_scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)
_llama3 = dict(block_size=131072, vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling=_llama3_rope_scaling)
_llama3_8b = dict(_llama3, n_layer=32, n_head=32, n_embd=4096, n_query_groups=8, intermediate_size=14336)
_llama3_70b = dict(_llama3, n_layer=80, n_head=64, n_embd=8192, n_query_groups=8, intermediate_size=28672)
_smollm2 = dict(block_size=8192, vocab_size=49152, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True)
_qwen25 = dict(block_size=32768, vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True)
llama_configs: Dict[str, Dict[str, Any]] = {
    # LLaMA 1 (Meta, Feb 2023)
    "7B": dict(**_llama_7b, norm_eps=1e-6),
    "13B": dict(**_llama_13b, norm_eps=1e-6),
    "30B": dict(n_layer=60, n_head=52, n_embd=6656, intermediate_size=17920, norm_eps=1e-6),
    "65B": dict(n_layer=80, n_head=64, n_embd=8192, intermediate_size=22016, norm_eps=1e-6),
    # Llama 2 (Meta, Jul 2023): longer context; 70B uses grouped-query attention
    "Llama-2-7b": dict(**_llama_7b, block_size=4096, norm_eps=1e-5),
    "Llama-2-13b": dict(**_llama_13b, block_size=4096, norm_eps=1e-5),
    "Llama-2-70b": dict(
        n_layer=80, n_head=64, n_embd=8192, n_query_groups=8, intermediate_size=28672, block_size=4096, norm_eps=1e-5
    ),
    # OpenLLaMA (open reproduction of LLaMA 1)
    "open_llama_3b": dict(n_layer=26, n_head=32, n_embd=3200, intermediate_size=8640, norm_eps=1e-6),
    "open_llama_7b": dict(**_llama_7b, norm_eps=1e-6),
    "open_llama_13b": dict(**_llama_13b, norm_eps=1e-6),
    # TinyLlama 1.1B (Llama 2 architecture, grouped-query attention)
    "TinyLlama-1.1B": dict(n_layer=22, n_head=32, n_embd=2048, n_query_groups=4, intermediate_size=5632, norm_eps=1e-5),
    # Llama 3.1 / 3.3 (Meta, Jul / Dec 2024): 128K-token vocabulary, 128K context by "llama3" RoPE scaling
    "Llama-3.1-8B": dict(**_llama3_8b),
    "Llama-3.1-70B": dict(**_llama3_70b),
    "Llama-3.3-70B": dict(**_llama3_70b),
    # Llama 3.2 (Meta, Sep 2024): small models with tied embeddings
    "Llama-3.2-1B": dict(_llama3, n_layer=16, n_head=32, n_embd=2048, n_query_groups=8, intermediate_size=8192,
                         tie_embeddings=True, rope_scaling=dict(_llama3_rope_scaling, factor=32.0)),
    "Llama-3.2-3B": dict(_llama3, n_layer=28, n_head=24, n_embd=3072, n_query_groups=8, intermediate_size=8192,
                         tie_embeddings=True, rope_scaling=dict(_llama3_rope_scaling, factor=32.0)),
    # SmolLM2 (Hugging Face, Nov 2024): LLaMA architecture, tied embeddings, 49,152-token byte-level BPE
    "SmolLM2-135M": dict(**_smollm2, n_layer=30, n_head=9, n_embd=576, n_query_groups=3, intermediate_size=1536),
    "SmolLM2-360M": dict(**_smollm2, n_layer=32, n_head=15, n_embd=960, n_query_groups=5, intermediate_size=2560),
    "SmolLM2-1.7B": dict(_smollm2, n_layer=24, n_head=32, n_embd=2048, n_query_groups=32, intermediate_size=8192,
                         rope_theta=130000.0),
    # Qwen2.5 (Alibaba, Sep 2024): biases on q/k/v; the small ones tie their embeddings
    "Qwen2.5-0.5B": dict(**_qwen25, n_layer=24, n_head=14, n_embd=896, n_query_groups=2, intermediate_size=4864,
                         tie_embeddings=True),
    "Qwen2.5-1.5B": dict(**_qwen25, n_layer=28, n_head=12, n_embd=1536, n_query_groups=2, intermediate_size=8960,
                         tie_embeddings=True),
    "Qwen2.5-3B": dict(**_qwen25, n_layer=36, n_head=16, n_embd=2048, n_query_groups=2, intermediate_size=11008,
                       tie_embeddings=True),
    "Qwen2.5-7B": dict(_qwen25, n_layer=28, n_head=28, n_embd=3584, n_query_groups=4, intermediate_size=18944,
                       vocab_size=152064),
    # Mistral 7B v0.3 (Mistral AI, May 2024): 32,768-token vocabulary, no sliding window any more
    "Mistral-7B-v0.3": dict(block_size=32768, vocab_size=32768, n_layer=32, n_head=32, n_embd=4096, n_query_groups=8,
                            intermediate_size=14336, norm_eps=1e-5, rope_theta=1000000.0),
    # tiny sizes for tests and the offline demo
    "tiny": dict(block_size=256, vocab_size=512, n_layer=2, n_head=4, n_embd=64, intermediate_size=176),
    "tiny-gqa": dict(
        block_size=256, vocab_size=512, n_layer=2, n_head=4, n_embd=64, n_query_groups=2, intermediate_size=176
    ),
}


class LLaMA(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=RMSNorm(config.n_embd, eps=config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # one matrix both ways: its state dict names it twice, saved once
            self.lm_head.weight = self.transformer.wte.weight
        # built on first use, on the input's device: plain attributes, so never saved in checkpoints
        self.rope_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        # trade compute for memory in training: see finetune/lora.py --activation_checkpointing
        self.activation_checkpointing = False
        self.mask_cache: Optional[torch.Tensor] = None

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        output_mask: Optional[torch.Tensor] = None,
        head: bool = True,
        positions: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """idx: (B, T) token ids. input_pos: positions when decoding with the KV cache, else None: (T,) shared
        by every row, or (B, T), one per row (a batch of prompts of different lengths, each at its own place).
        output_mask: (B, T) bool; if given, logits only for those positions, flattened to (N, vocab_size)
        (training skips the prompt positions it does not score: less compute and memory in the output layer).
        head: False returns the final hidden states (after ln_f) instead of logits, for a loss that applies
        lm_head itself, a chunk of positions at a time (lit_llama.training.chunked_cross_entropy).
        positions: (B, T) for rows of packed examples (training, no KV cache): each token's position in its own
        example, 0 where an example starts; attention stays within each example (lit_llama.packed_attention).

        Returns logits of shape (B, T, vocab_size).
        """
        T = idx.size(1)
        spans = packed_spans(positions) if input_pos is None and positions is not None else None
        # the longest sequence attended: a packed row holds several examples, each its own sequence
        max_len = self.max_seq_length if input_pos is not None else spans.longest if spans is not None else T
        if max_len > self.config.block_size:
            raise ValueError(f"sequence length {max_len} exceeds the model's block_size {self.config.block_size}")
        check_sliding_window(self.config, max_len)
        cos, sin = self._rope(idx.device)
        if spans is not None:  # packed rows: per-token positions, per-example attention
            cos, sin, mask = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1), spans
        elif input_pos is None:  # training / full forward: positions 0..T-1, plain causal attention
            cos, sin, mask = cos[:T], sin[:T], None
        else:  # decoding: rows of the causal mask for these positions, over the whole cache
            if self.mask_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call model.set_kv_cache() first")
            cos, sin, mask = cos[input_pos], sin[input_pos], self.mask_cache[input_pos]
            if input_pos.dim() == 2:  # per row: (B, T, ...) -> (B, 1, T, ...), broadcast over the heads
                cos, sin, mask = cos.unsqueeze(1), sin.unsqueeze(1), mask.unsqueeze(1)

        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training:  # keep only block inputs; recompute the rest
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, input_pos)
        if output_mask is not None:
            x = x[output_mask]
        x = self.transformer.ln_f(x)
        return self.lm_head(x) if head else x

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "LLaMA":
        """`.to()`, `.to_empty()`, `.half()`, ... replace each module's parameters one module at a time, which
        would give the output layer a copy of a tied embedding: tied before, tied after."""
        tied = self.lm_head.weight is self.transformer.wte.weight
        super()._apply(fn, *args, **kwargs)
        if tied:
            self.lm_head.weight = self.transformer.wte.weight
        return self

    def _rope(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.rope_cache is None or self.rope_cache[0].device != device:
            self.rope_cache = build_rope_cache(
                self.config.block_size, self.config.head_size, self.config.rope_theta, device, self.config.rope_scaling
            )
        return self.rope_cache

    # --- KV cache for generation -------------------------------------------------------------
    @property
    def max_seq_length(self) -> int:
        cache = self.transformer.h[0].attn.kv_cache
        return cache.k.size(2) if cache is not None else self.config.block_size

    def set_kv_cache(
        self, batch_size: int, max_seq_length: Optional[int] = None, device=None, dtype=None
    ) -> None:
        """Allocates a key/value cache of `max_seq_length` positions in every attention layer (or keeps the one
        there if it has that shape: compiled decoding then finds its buffers where it left them), and the
        rotary and causal-mask tables decoding reads, so a forward pass only reads them."""
        max_seq_length = max_seq_length or self.config.context_length
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds block_size {self.config.block_size}")
        check_sliding_window(self.config, max_seq_length)
        weight = self.lm_head.weight
        device, dtype = torch.device(device or weight.device), dtype or weight.dtype
        shape = (batch_size, self.config.n_query_groups, max_seq_length, self.config.head_size)
        for block in self.transformer.h:
            cache = block.attn.kv_cache
            same_device = cache is not None and cache.k.device.type == device.type and device.index in (
                None, cache.k.device.index)
            if not same_device or cache.k.shape != shape or cache.k.dtype != dtype:
                block.attn.kv_cache = KVCache(shape, device=device, dtype=dtype)
        self._rope(device)
        self.mask_cache = torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device).tril()

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None
        self.mask_cache = None

    @classmethod
    def from_name(cls, name: str) -> "LLaMA":
        return cls(Config.from_name(name))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.rms_1 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.rms_2 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, input_pos=None) -> torch.Tensor:
        x = x + self.attn(self.rms_1(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.rms_2(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        hs, q_size = config.head_size, config.n_head * config.head_size
        kv_size = config.n_query_groups * hs
        # one fused projection whose output is [queries | keys | values]
        self.c_attn = nn.Linear(config.n_embd, q_size + 2 * kv_size, bias=config.qkv_bias)
        self.c_proj = nn.Linear(q_size, config.n_embd, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask=None, input_pos=None) -> torch.Tensor:
        B, T, C = x.shape
        cfg = self.config
        hs, q_size, kv_size = cfg.head_size, cfg.n_head * cfg.head_size, cfg.n_query_groups * cfg.head_size
        q, k, v = self.c_attn(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(B, T, cfg.n_head, hs).transpose(1, 2)  # (B, n_head, T, hs)
        k = k.view(B, T, cfg.n_query_groups, hs).transpose(1, 2)  # (B, n_query_groups, T, hs)
        v = v.view(B, T, cfg.n_query_groups, hs).transpose(1, 2)

        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call model.set_kv_cache() first")
            k, v = self.kv_cache(input_pos, k, v)

        if cfg.n_query_groups != cfg.n_head:  # grouped-query: each key/value head serves n_head/groups queries
            repeats = cfg.n_head // cfg.n_query_groups
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)

        y = self.scaled_dot_product_attention(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, q_size)
        return self.c_proj(y)

    def scaled_dot_product_attention(self, q, k, v, mask=None) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_size)) v, causal. (LLaMA-Adapter extends this step.)"""
        if isinstance(mask, list):  # packed rows: causal attention within each example (lit_llama.packed_attention)
            return packed_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, written in place at `input_pos`."""

    def __init__(self, shape: Tuple[int, int, int, int], device=None, dtype=None) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B = k.size(0)
        if input_pos.dim() == 1:  # the same positions in every row
            self.k[:B].index_copy_(2, input_pos, k.to(self.k.dtype))
            self.v[:B].index_copy_(2, input_pos, v.to(self.v.dtype))
        else:  # (B, T): row b writes at its own positions input_pos[b]
            rows = torch.arange(B, device=k.device).unsqueeze(1)
            self.k[rows, :, input_pos] = k.transpose(1, 2).to(self.k.dtype)
            self.v[rows, :, input_pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[:B], self.v[:B]


class MLP(nn.Module):
    """SwiGLU feed-forward: proj(silu(fc1(x)) * fc2(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.c_fc1 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.c_fc2 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.silu(self.c_fc1(x)) * self.c_fc2(x))


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias), computed in float32 like the reference."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def check_sliding_window(config: Config, seq_len: int) -> None:
    """Mistral's attention sees only the last `sliding_window` positions. Up to that length it is plain causal
    attention, which is all this model computes: a longer sequence is refused rather than attended wrongly."""
    if config.sliding_window is not None and seq_len > config.sliding_window:
        raise ValueError(f"sequence length {seq_len} exceeds the model's sliding window of {config.sliding_window} "
                         "positions: attention beyond the window is not supported (use shorter sequences)")


ROPE_SCALING_FIELDS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: Any) -> Dict[str, Any]:
    """`Config.rope_scaling` checked: a supported type with its positive numbers (a ValueError naming what is not)."""
    if not isinstance(scaling, dict):
        raise ValueError(f"field 'rope_scaling' is {scaling!r}, expected an object with a rope_type")
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_FIELDS:
        raise ValueError(f"RoPE scaling type {kind!r} is not supported (supported: {', '.join(ROPE_SCALING_FIELDS)})")
    checked: Dict[str, Any] = {"rope_type": kind}
    for name in ROPE_SCALING_FIELDS[kind]:
        value = scaling.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"rope_scaling field {name!r} is {value!r}, expected a positive number")
        checked[name] = value
    return checked


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: Dict[str, Any]) -> torch.Tensor:
    """RoPE frequencies stretched for a longer context than the model was pretrained on.

    linear: every frequency divided by `factor` (positions compressed evenly).
    llama3 (Llama 3.1): wavelengths longer than original_max_position_embeddings / low_freq_factor are divided
    by `factor`, those shorter than .../high_freq_factor are kept, and the band between is interpolated, so
    local (high-frequency) position information is untouched while the slow dimensions reach further.
    """
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(between, smoothed, scaled)


def build_rope_cache(
    seq_len: int,
    head_size: int,
    theta: float = 10000.0,
    device: Optional[torch.device] = None,
    scaling: Optional[Dict[str, Any]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, head_size), in float32, with `scaling` (see `scaled_inv_freq`).

    Rotary embeddings in the "rotate half" layout of Hugging Face checkpoints: dimension i is paired
    with dimension i + head_size/2. (Meta's original checkpoints pair neighbours instead; their q/k
    weights are permuted on conversion, see `permute_meta` in lit_llama/convert.py.)
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size))
    if scaling is not None:
        inv_freq = scaled_inv_freq(inv_freq, scaling)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_size); cos, sin: (T, head_size). Computed in x's dtype, like the Hugging Face
    reference (and without float32 copies of q and k kept for the backward pass)."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
