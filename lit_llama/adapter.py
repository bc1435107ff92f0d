"""LLaMA-Adapter (Zhang et al., 2023, https://arxiv.org/abs/2303.16199) and its v2 (Gao et al., 2023,
https://arxiv.org/abs/2304.15010): finetuning a frozen LLaMA through a few learnable prompts.

v1: every attention layer from `adapter_start_layer` on gets its own learnable prompt of
`adapter_prompt_length` vectors (`adapter_wte`). The layer projects the prompt with its own c_attn into
keys and values (without rotary embeddings: the prompt has no position); every (rotated) query attends
to them with a separate softmax over the prompt alone, and the result, scaled by a per-head gate
(`adapter_gating_factor`), is added to the layer's attention over the tokens, before the output
projection c_proj. The gate starts at zero ("zero-init attention"), so a fresh adapter model computes
exactly what the base model does and training starts from it.

v2 also learns a per-output scale and bias on the attention and MLP linear layers,
y = scale * (W x) + bias (`adapter_scale` starts at 1, `adapter_bias` at 0: again no change at first),
and trains the RMSNorm weights.

`AdapterLLaMA` is the base `LLaMA` with these pieces swapped in; the model code is not copied. Every new
parameter has "adapter_" in its name, so a base checkpoint loads unchanged (see
`lit_llama.checkpoint.load_model`) and adapter checkpoints hold only those tensors (plus the v2 norms).
"""

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional, Set, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.checkpoint import (
    CheckpointPaths,
    check_finite,
    full_state_dict,
    load_model,
    load_state_dict,
    num_parameters,
    save_atomic,
)
from lit_llama.cli import UserError
from lit_llama.distributed import is_fsdp, load_device, unwrap
from lit_llama.model import CausalSelfAttention, Config, LLaMA, RMSNorm
from lit_llama.prompts import DEFAULT_PROMPT_STYLE, PROMPT_STYLES, prompt_style_of_data
from lit_llama.quantize import check_quantize, frozen_weight_bytes, quantize_frozen_linears

# what an adapter checkpoint records about the model it belongs to (see adapter_state_dict)
ADAPTER_FIELDS = ("adapter_version", "adapter_prompt_length", "adapter_start_layer", "adapter_head")
BASE_FIELDS = ("n_layer", "n_embd", "n_head", "n_query_groups", "vocab_size")


@dataclass
class AdapterConfig(Config):
    adapter_prompt_length: int = 10  # learnable prompt vectors per adapted layer
    adapter_start_layer: int = 2  # layers before this one keep plain attention
    adapter_version: int = 1  # 2: also scale/bias on the linear layers and trainable norms
    adapter_head: bool = False  # v2: scale/bias on the output layer too (Lit-LLaMA's v2 had them; converted files)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter_version not in (1, 2):
            raise ValueError(f"adapter_version must be 1 or 2, got {self.adapter_version}")
        if self.adapter_head and self.adapter_version != 2:
            raise ValueError("adapter_head (scale/bias on the output layer) needs adapter_version 2")
        if self.adapter_prompt_length < 1:
            raise ValueError(f"adapter_prompt_length must be at least 1, got {self.adapter_prompt_length}")
        if not 0 <= self.adapter_start_layer < self.n_layer:
            raise ValueError(
                f"adapter_start_layer must be in [0, n_layer={self.n_layer}), got {self.adapter_start_layer}"
            )

    @classmethod
    def from_config(cls, config: Config, **adapter_fields: int) -> "AdapterConfig":
        """`config`'s sizes (and adapter settings, if it is an AdapterConfig), with `adapter_fields` on top."""
        return cls(**{**asdict(config), **adapter_fields})


class AdapterAttention(CausalSelfAttention):
    """Causal self-attention plus, from `adapter_start_layer` on, gated attention to a learnable prompt.

    Only `scaled_dot_product_attention`, the step between the rotated queries and c_proj, is extended: the
    base forward (projections, rotary embeddings, KV cache, grouped-query heads) runs unchanged.
    """

    def __init__(self, config: AdapterConfig, block_idx: int) -> None:
        super().__init__(config)
        self.config: AdapterConfig = config
        if block_idx >= config.adapter_start_layer:
            self.adapter_wte = nn.Embedding(config.adapter_prompt_length, config.n_embd)
            self.adapter_gating_factor = nn.Parameter(torch.empty(1, config.n_head, 1, 1))
        else:  # lower layers stay exactly the base attention
            self.adapter_wte = None
            self.adapter_gating_factor = None
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        if self.adapter_wte is None:
            return
        # N(0, 1), nn.Embedding's default and the reference implementations' init: about the scale of the
        # normalised hidden states c_attn usually sees, so the prompt's keys/values start at a normal size
        # and the gate gets a useful gradient from step 1. The zero gate keeps the output unchanged anyway.
        nn.init.normal_(self.adapter_wte.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.adapter_gating_factor)

    def scaled_dot_product_attention(self, q, k, v, mask=None) -> torch.Tensor:
        """The causal attention over the tokens plus the gated attention to the prompt, both before c_proj
        as in the paper: (B, n_head, T, hs)."""
        y = super().scaled_dot_product_attention(q, k, v, mask)
        if self.adapter_wte is None:
            return y
        gate = self.adapter_gating_factor.to(y.dtype)  # may be kept in float32 while q is bf16
        return y + gate * self.prompt_attention(q)

    def prompt_attention(self, q: torch.Tensor) -> torch.Tensor:
        """Attention of the queries q (B, n_head, T, hs) to this layer's prompt: (B, n_head, T, hs).

        q arrives rotary-rotated (as the base attention uses it; the original LLaMA-Adapter and PEFT's
        adaption prompt use the rotated query too). The prompt's keys and values come from the layer's own
        c_attn (for v2 with its scale and bias, as the tokens' keys and values) and are recomputed on every
        call (a few vectors: cheap), so they always follow the current weights, during training and
        KV-cache decoding alike.
        """
        cfg = self.config
        B, hs, P = q.size(0), cfg.head_size, cfg.adapter_prompt_length
        q_size, kv_size = cfg.n_head * hs, cfg.n_query_groups * hs
        prompt = self.adapter_wte.weight.to(q.dtype).unsqueeze(0)  # (1, P, n_embd)
        _, k, v = self.c_attn(prompt).split((q_size, kv_size, kv_size), dim=-1)
        # no rotary embedding: the prompt has no position, every token sees it the same way
        k = k.view(1, P, cfg.n_query_groups, hs).transpose(1, 2)  # (1, n_query_groups, P, hs)
        v = v.view(1, P, cfg.n_query_groups, hs).transpose(1, 2)
        if cfg.n_query_groups != cfg.n_head:  # grouped-query: each prompt key/value head serves several queries
            repeats = cfg.n_head // cfg.n_query_groups
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        # no mask: a softmax over the whole prompt, separate from the causal softmax over the tokens
        return F.scaled_dot_product_attention(q, k, v)


class AdapterV2Linear(nn.Linear):
    """A bias-free nn.Linear (as every LLaMA projection) with LLaMA-Adapter v2's learnable per-output
    scale and bias: y = adapter_scale * (W x) + adapter_bias. Scale 1 and bias 0 at first: the plain layer.
    The frozen weight keeps the name "weight", so base checkpoints load unchanged."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None, bias: bool = False) -> None:
        # bias: a base layer's own (Qwen2's q/k/v), frozen; the adapter's scale then applies to W x + bias
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.adapter_scale = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.adapter_bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.reset_extra_parameters()

    @classmethod
    def like(cls, linear: nn.Linear) -> "AdapterV2Linear":
        """A fresh AdapterV2Linear of `linear`'s size, device and dtype (its weight is loaded later)."""
        return cls(linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype,
                   bias=linear.bias is not None)

    def reset_extra_parameters(self) -> None:
        nn.init.ones_(self.adapter_scale)
        nn.init.zeros_(self.adapter_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the trainable scale and bias may be kept in float32 while x is bf16: compute in x's dtype
        return self.adapter_scale.to(x.dtype) * super().forward(x) + self.adapter_bias.to(x.dtype)


class AdapterV2RMSNorm(RMSNorm):
    """RMSNorm whose weight v2 trains. A trained weight may be kept in float32 while the activations
    are bf16, so the output is cast back to the input's dtype (a no-op when they already match)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)


class AdapterLLaMA(LLaMA):
    """LLaMA with LLaMA-Adapter prompts in the attention layers from `adapter_start_layer` on (v1), plus
    scale/bias on the linear layers and trainable norms (v2).

    `config` may be a plain base `Config` (as `lit_llama.checkpoint.load_model` passes it) with the adapter
    settings as keyword arguments, or an `AdapterConfig`; keyword arguments override its settings.
    """

    def __init__(self, config: Config, **adapter_fields: int) -> None:
        config = AdapterConfig.from_config(config, **adapter_fields)
        super().__init__(config)
        self.config: AdapterConfig = config
        # LLaMA.__init__ built plain layers; swap in the adapter ones. Their fresh weights are replaced
        # by the base checkpoint's; on the meta device (load_model) none of this allocates memory.
        for i, block in enumerate(self.transformer.h):
            block.attn = AdapterAttention(config, i)
            if config.adapter_version == 2:
                attn, mlp = block.attn, block.mlp
                attn.c_attn, attn.c_proj = AdapterV2Linear.like(attn.c_attn), AdapterV2Linear.like(attn.c_proj)
                mlp.c_fc1, mlp.c_fc2 = AdapterV2Linear.like(mlp.c_fc1), AdapterV2Linear.like(mlp.c_fc2)
                mlp.c_proj = AdapterV2Linear.like(mlp.c_proj)
                block.rms_1, block.rms_2 = _v2_norm(block.rms_1), _v2_norm(block.rms_2)
        if config.adapter_version == 2:
            self.transformer.ln_f = _v2_norm(self.transformer.ln_f)
        if config.adapter_head:
            self.lm_head = AdapterV2Linear.like(self.lm_head)


def _v2_norm(norm: RMSNorm) -> AdapterV2RMSNorm:
    new = AdapterV2RMSNorm(norm.weight.size(0), eps=norm.eps)
    return new.to(device=norm.weight.device, dtype=norm.weight.dtype)


# --- training and checkpoints ----------------------------------------------------------------------


def trainable_parameter_names(model: AdapterLLaMA) -> Set[str]:
    """The adapter parameters, plus for v2 the RMSNorm weights."""
    names = {name for name, _ in model.named_parameters() if "adapter_" in name}
    if model.config.adapter_version == 2:
        names |= {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, RMSNorm)}
    return names


def mark_only_adapter_as_trainable(model: AdapterLLaMA) -> None:
    """Freezes the base model: only the adapter parameters (and for v2 the norms) get gradients."""
    trainable = trainable_parameter_names(model)
    for name, param in model.named_parameters():
        param.requires_grad = name in trainable


def adapter_state_dict(
    model: AdapterLLaMA, state_dict: Optional[Dict[str, torch.Tensor]] = None, prompt_style: str = DEFAULT_PROMPT_STYLE
) -> Dict[str, Any]:
    """The trainable tensors alone (a few MB for 7B) and, under "adapter_config", the adapter settings, the
    base model's shape and the prompt style trained with, so a generate script can rebuild the model from the
    base checkpoint and this. `state_dict`: the model's tensors if not its own `state_dict()` (under FSDP, those
    gathered from the shards)."""
    trainable = trainable_parameter_names(model)
    state_dict = model.state_dict() if state_dict is None else state_dict
    state = {name: t.detach() for name, t in state_dict.items() if name in trainable}
    state["adapter_config"] = {**_describe(model.config), "prompt_style": prompt_style}
    return state


def adapter_prompt_style(checkpoint: Dict[str, Any], path: Union[str, Path] = "adapter checkpoint") -> str:
    """The prompt style an adapter file was trained with (files written before styles existed: alpaca), after
    the checks of every field of its adapter_config."""
    return _read_adapter_config(checkpoint, path).get("prompt_style", DEFAULT_PROMPT_STYLE)


def adapter_config_from_checkpoint(
    checkpoint: Dict[str, Any], base_config: Config, path: Union[str, Path] = "adapter checkpoint"
) -> AdapterConfig:
    """The AdapterConfig to build the model an adapter checkpoint belongs to, on top of `base_config`
    (the base checkpoint's). A checkpoint trained on another base model size is a UserError."""
    saved = _read_adapter_config(checkpoint, path)
    base = asdict(base_config)
    mismatches = [f"{f}={saved[f]} (base checkpoint: {base[f]})" for f in BASE_FIELDS if saved[f] != base[f]]
    if mismatches:
        raise UserError(f"{path} was trained on another base model: {', '.join(mismatches)}")
    try:
        return AdapterConfig.from_config(base_config, **{f: saved[f] for f in ADAPTER_FIELDS})
    except ValueError as e:
        raise UserError(f"{path}: invalid adapter_config: {e}")


def load_adapter_state_dict(model: AdapterLLaMA, checkpoint: Dict[str, Any], path: Union[str, Path]) -> None:
    """Loads an adapter checkpoint into a model built with its settings (see adapter_config_from_checkpoint).
    Another adapter version / prompt length / start layer or another base model size is a UserError."""
    saved, ours = _read_adapter_config(checkpoint, path), _describe(model.config)
    mismatches = [f"{f}={saved[f]} (model: {ours[f]})" for f in (*ADAPTER_FIELDS, *BASE_FIELDS) if saved[f] != ours[f]]
    if mismatches:
        raise UserError(f"{path} does not match this model: {', '.join(mismatches)}")
    tensors = {name: t for name, t in checkpoint.items() if name != "adapter_config"}
    expected = {name: t for name, t in model.state_dict().items() if name in trainable_parameter_names(model)}
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise UserError(f"{path} does not fit this model: missing {missing[:2]}, unexpected {unexpected[:2]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    check_finite(tensors, Path(path))
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)


def load_adapter_model(
    paths: CheckpointPaths, adapter_path: Union[str, Path], device: torch.device, dtype: torch.dtype
) -> AdapterLLaMA:
    """Base checkpoint + adapter file -> model, with the adapter settings read from the file. An adapter
    trained on another base model, or a file that is not an adapter checkpoint, is a UserError."""
    checkpoint = load_state_dict(Path(adapter_path))
    config = adapter_config_from_checkpoint(checkpoint, paths.config, adapter_path)
    model = load_model(replace(paths, config=config), device, dtype, AdapterLLaMA)
    load_adapter_state_dict(model, checkpoint, adapter_path)
    return model


def _describe(config: AdapterConfig) -> Dict[str, int]:
    return {field: getattr(config, field) for field in (*ADAPTER_FIELDS, *BASE_FIELDS)}


def _read_adapter_config(checkpoint: Any, path: Union[str, Path]) -> Dict[str, int]:
    saved = checkpoint.get("adapter_config") if isinstance(checkpoint, dict) else None
    if isinstance(saved, dict):
        saved = {"adapter_head": False, **saved}  # files written before adapter_head existed
    if not isinstance(saved, dict):
        if isinstance(checkpoint, dict) and any("adapter_wte" in name for name in checkpoint):
            raise UserError(
                f"{path} holds adapter weights but no adapter_config: a Lit-LLaMA adapter file? Convert it with "
                "scripts/convert_lit_llama_checkpoint.py"
            )
        raise UserError(f"{path} is not an adapter checkpoint written by finetune/adapter.py (no adapter_config)")
    absent = [f for f in (*ADAPTER_FIELDS, *BASE_FIELDS) if f not in saved]
    if absent:
        raise UserError(f"{path}: adapter_config lacks {', '.join(absent)}")
    # the types too: a prompt length of 10.0 would pass every range check and fail deep inside nn.Embedding
    for field in (*ADAPTER_FIELDS, *BASE_FIELDS):
        expected = bool if field == "adapter_head" else int
        if type(saved[field]) is not expected:
            kind = "true or false" if expected is bool else "a whole number"
            raise UserError(f"{path}: adapter_config {field} must be {kind}, got {saved[field]!r}")
    style = saved.get("prompt_style", DEFAULT_PROMPT_STYLE)
    if not isinstance(style, str) or style not in PROMPT_STYLES:
        raise UserError(f"{path}: adapter_config prompt_style {style!r} is not one of {', '.join(PROMPT_STYLES)}")
    return saved


DEFAULT_START_LAYER = 2  # the article's: the two lowest layers keep plain attention


class AdapterFinetune:
    """Finetuning with LLaMA-Adapter (finetune/adapter.py): the base frozen (in NF4 with `quantize`), the
    adapter weights trained, and each checkpoint only those, with the prompt style of the data."""

    name, final_name, trains_every_weight, sharded_resume = "adapter", "lit-llama-adapter-finetuned.pth", False, False
    flag_defaults = {"learning_rate": 9e-3, "weight_decay": 0.02, "warmup_iters": None}  # the article's; None: 2 epochs

    def __init__(self, prompt_length: int, start_layer: Optional[int], version: int,
                 quantize: Optional[str] = None) -> None:
        self.adapter_fields = {"adapter_prompt_length": prompt_length, "adapter_start_layer": start_layer,
                               "adapter_version": version}
        self.quantize = quantize

    def configure(self, config: Config, run: Any) -> Dict[str, Any]:
        if self.adapter_fields["adapter_start_layer"] is None:
            self.adapter_fields["adapter_start_layer"] = min(DEFAULT_START_LAYER, config.n_layer - 1)
        try:
            adapter = AdapterConfig.from_config(config, **self.adapter_fields)
        except ValueError as e:
            raise UserError(f"--{e}")  # AdapterConfig's messages start with the field's (= the flag's) name
        check_quantize(self.quantize, run, config)
        return {"adapter": asdict(adapter), "quantize": self.quantize}

    def default_out_dir(self) -> Path:
        return Path("out/adapter/alpaca" if self.adapter_fields["adapter_version"] == 1 else "out/adapter_v2/alpaca")

    def load(self, fabric: Any, paths: CheckpointPaths, dtype: torch.dtype) -> AdapterLLaMA:
        model = load_model(paths, load_device(fabric, self.quantize), dtype, AdapterLLaMA, **self.adapter_fields)
        mark_only_adapter_as_trainable(model)
        if self.quantize:
            quantize_frozen_linears(model, fabric.device, fabric.world_size if is_fsdp(fabric) else None)
            fabric.print(f"Frozen block weights in NF4: {frozen_weight_bytes(model):.3f} bytes per weight")
        config = model.config
        fabric.print(
            f"LLaMA-Adapter v{config.adapter_version} (prompt length {config.adapter_prompt_length}, from layer "
            f"{config.adapter_start_layer}): {num_parameters(model, requires_grad=True):,} trainable of "
            f"{num_parameters(model):,} parameters"
        )
        return model

    def saver(self, fabric: Any, model: nn.Module, paths: CheckpointPaths, data_dir: Path, out_dir: Path) -> Any:
        prompt_style = prompt_style_of_data(data_dir)  # recorded in the adapter file for generate/adapter.py

        def save_adapter(path: Path) -> None:
            trainable = full_state_dict(model, trainable_only=True)  # under FSDP gathered from every rank
            if fabric.global_rank == 0:
                save_atomic(adapter_state_dict(unwrap(model), trainable, prompt_style), path)
                fabric.print(f"Saved adapter weights to {path}")

        return save_adapter
