"""LoRA: Low-Rank Adaptation of the LLaMA model (Hu et al., 2021).

A pretrained weight W stays frozen; LoRA learns a low-rank update dW = B @ A of rank r, so a linear
layer computes  y = W x + (alpha / r) * B A x.  A starts Kaiming-uniform and B starts at zero, so a fresh
LoRA model computes exactly what the base model does. After training, the update can be merged into W
(W' = W + (alpha/r) B A) and the model runs as fast as the base model.

Attention has one fused projection c_attn = [query | key | value]; LoRA adapts the parts chosen (by
default query and value, as in the LoRA paper) with one (A, B) pair per part. `LoRALLaMA` is the
base `LLaMA` with the chosen linear layers swapped for `LoRALinear`: the model code is not copied.

Two variants are flags of `LoRAConfig`, stored in the LoRA file: rsLoRA scales the update by alpha / sqrt(r),
DoRA adds a trained magnitude per output row (see `LoRALinear`).

Every target works on every model family (LLaMA, Llama 3.x, SmolLM2, Qwen2.5, Mistral; Qwen2's q/k/v biases stay
frozen), with one exception: `head` on a model with tied input/output embeddings is refused. There the output
layer is the input embedding; a merged update would change every token's embedding as well, and an exported
model would have to be untied to hold it. A LoRA file records its base's family fields (`FAMILY_FIELDS`) and is
refused, in one line, on a base of another family.
"""

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.checkpoint import (
    CheckpointPaths,
    check_finite,
    full_state_dict,
    is_marked_weights,
    load_model,
    load_state_dict,
    num_parameters,
    save_atomic,
)
from lit_llama.cli import UserError, describe_exception
from lit_llama.distributed import is_fsdp, load_device, unwrap
from lit_llama.model import Config, LLaMA
from lit_llama.prompts import DEFAULT_PROMPT_STYLE, PROMPT_STYLES, prompt_style_of_data
from lit_llama.quantize import check_quantize, frozen_weight_bytes, quantize_frozen_linears


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False  # attention output projection
    mlp: bool = False  # the three SwiGLU projections
    head: bool = False  # the output layer (lm_head)
    rslora: bool = False  # rank-stabilised LoRA (Kalajdzievski, 2023): scale by alpha / sqrt(r) instead of alpha / r
    dora: bool = False  # weight-decomposed LoRA (Liu et al., 2024): a trained magnitude per output row

    def __post_init__(self) -> None:
        # each message starts with the field's name: finetune/lora.py puts "--lora_" before it. The types are
        # checked too: a LoRA file's stored config (or a PEFT adapter_config.json) may hold r=8.0 or "true"
        for field in fields(self):
            value, kind = getattr(self, field.name), field.type
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"{field.name} must be true or false, got {value!r}")
            if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{field.name} must be a number, got {value!r}")
            if kind is int and not isinstance(value, int):
                raise ValueError(f"{field.name} must be a whole number, got {value!r}")
        if self.r <= 0:
            raise ValueError(f"r (the LoRA rank) must be positive, got {self.r}")
        if not (0 < self.alpha < float("inf")):
            raise ValueError(f"alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not any((self.query, self.key, self.value, self.projection, self.mlp, self.head)):
            raise ValueError("query, key, value, projection, mlp and head are all false: LoRA needs a target")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.rslora)


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """alpha / r; with rsLoRA alpha / sqrt(r), so that the update's size does not shrink as the rank grows."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus low-rank updates on chosen blocks of its output rows.

    `parts` splits the output rows into consecutive blocks as (size, adapted) pairs: a plain layer is
    one block; the fused q/k/v projection is three. Each adapted block i has its own A_i (r x in) and
    B_i (size_i x r); they are stored stacked in `lora_A` and `lora_B`.

    With `dora`, each adapted output row j also has a trained magnitude m_j (stored in `lora_magnitude`),
    and the row's weight is m_j times the direction of W_j + s (BA)_j; the norm ||W_j + s (BA)_j|| is treated
    as a constant in the backward pass (DoRA paper, section 4.3). The magnitudes start at ||W_j||, so a
    fresh DoRA layer too computes exactly the base layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        parts: Optional[Sequence[Tuple[int, bool]]] = None,
        rslora: bool = False,
        dora: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)  # bias: Qwen2's q/k/v, frozen like the weight
        self.parts = list(parts or [(out_features, True)])
        if sum(size for size, _ in self.parts) != out_features:
            raise ValueError(f"parts {self.parts} do not add up to out_features {out_features}")
        self.adapted_sizes = [size for size, adapted in self.parts if adapted]
        self.r, self.scaling = r, lora_scaling(r, alpha, rslora)
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(r * len(self.adapted_sizes), in_features))
        self.lora_B = nn.Parameter(torch.empty(sum(self.adapted_sizes), r))
        self.dora = dora
        if dora:
            self.lora_magnitude = nn.Parameter(torch.empty(sum(self.adapted_sizes)))
        self.merged = False
        self.dora_merge_factor: Optional[torch.Tensor] = None  # the factor merged in, to undo it exactly
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        """A like nn.Linear's default init (Kaiming-uniform), B zero: the update starts at exactly 0. DoRA's
        magnitudes start at the row norms of the current weight (call this again after loading base weights)."""
        for A in self.lora_A.split(self.r):
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.dora:
            with torch.no_grad():
                self.lora_magnitude.copy_(self._adapted_rows(self.weight.float()).norm(dim=1))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a frozen bias is added last: DoRA rescales W x, not the bias (as PEFT computes it, and as merging does)
        y = self._weight_and_update(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _weight_and_update(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.merged:
            return y
        # trainable A and B may be kept in float32 while the frozen weight is bf16: compute in x's dtype
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        dropped = self.lora_dropout(x)
        after_A = F.linear(dropped, A).split(self.r, dim=-1)  # one (.., r) chunk per block
        B_blocks = B.split(self.adapted_sizes)
        lora_out = self._scatter([F.linear(a, b) for a, b in zip(after_A, B_blocks)], x)
        if not self.dora:
            return y + lora_out * self.scaling
        # DoRA: factor * (W x' + s BA x') added on top of W x, where x' is the dropped-out input: with dropout
        # off this is factor * (W + s BA) x; with dropout on it is what the DoRA paper's code and PEFT compute
        factor = self.dora_factor().to(x.dtype)
        dropout_on = self.training and self.lora_dropout.p > 0
        base = F.linear(dropped, self.weight) if dropout_on else y
        return y + ((factor - 1) * base + factor * lora_out * self.scaling)  # PEFT's order of operations

    def dora_factor(self) -> torch.Tensor:
        """m / ||W + s BA|| for every output row (1 for rows that are not adapted); the norm is detached."""
        weight = self.weight.to(self.lora_A.dtype)
        norm = (weight + self.delta_weight()).norm(dim=1).detach()
        scale = self.lora_magnitude / self._adapted_rows(norm)
        return self._scatter(list(scale.split(self.adapted_sizes)), scale, fill=1.0)

    def _adapted_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The rows (first dimension) of `t` that belong to adapted blocks, concatenated."""
        blocks = t.split([size for size, _ in self.parts])
        return torch.cat([block for block, (_, adapted) in zip(blocks, self.parts) if adapted])

    def _scatter(self, adapted_outputs: List[torch.Tensor], like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Places the outputs of the adapted blocks among `fill` for the others (e.g. [dq | 0 | dv])."""
        if len(self.parts) == 1:
            return adapted_outputs[0]
        outputs, it = [], iter(adapted_outputs)
        for size, adapted in self.parts:
            outputs.append(next(it) if adapted else like.new_full((*like.shape[:-1], size), fill))
        return torch.cat(outputs, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) * B @ A for every block (zeros for the blocks that are not adapted): out x in."""
        deltas = [b @ a for a, b in zip(self.lora_A.split(self.r), self.lora_B.split(self.adapted_sizes))]
        return self._scatter([d.T for d in deltas], self.lora_A.new_empty(self.in_features, 0)).T * self.scaling

    def factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The whole update as one low-rank product: (A, B) with B @ A == delta_weight(). A is (k*r, in), the
        k adapted blocks' A_i stacked; B is (out, k*r): block i's (alpha/r) B_i at its rows and its own r
        columns, zeros elsewhere (several adapters on one base use this form, see lit_llama/multi_lora.py)."""
        B = self.lora_B.new_zeros(self.out_features, self.lora_A.size(0))
        blocks, row, column = iter(self.lora_B.split(self.adapted_sizes)), 0, 0
        for size, adapted in self.parts:
            if adapted:
                B[row : row + size, column : column + self.r] = next(blocks) * self.scaling
                column += self.r
            row += size
        return self.lora_A, B

    @torch.no_grad()
    def merge(self) -> None:
        """W += (alpha/r) B A (DoRA: W = m * (W + s BA) / ||W + s BA||); the forward pass then skips the LoRA
        branch."""
        if self.merged:
            return
        if self.dora:
            self.dora_merge_factor = self.dora_factor()
            merged = self.dora_merge_factor[:, None] * (self.weight + self.delta_weight())
            self.weight.copy_(merged.to(self.weight.dtype))
        else:
            self.weight += self.delta_weight().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.dora:
            unmerged = self.weight / self.dora_merge_factor[:, None] - self.delta_weight()
            self.weight.copy_(unmerged.to(self.weight.dtype))
            self.dora_merge_factor = None
        else:
            self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False


class LoRALLaMA(LLaMA):
    """LLaMA whose chosen linear layers carry LoRA updates. Base weights keep their names, so a base
    checkpoint loads unchanged; the new parameters are named `lora_A` / `lora_B`."""

    def __init__(self, config: Config, lora: Optional[LoRAConfig] = None) -> None:
        super().__init__(config)
        self.lora_config = lora = lora or LoRAConfig()
        if lora.head and config.tie_embeddings:
            # the output layer is the input embedding: a LoRA on it would, once merged, change the embedding of
            # every input token too, and PEFT/transformers would untie the model to hold it. So it is refused.
            raise UserError("LoRA on the output layer (--lora_head) is not supported for a model with tied input/"
                            "output embeddings (SmolLM2, Llama 3.2, small Qwen2.5): leave --lora_head false")
        hs = config.head_size
        q_size, kv_size = config.n_head * hs, config.n_query_groups * hs

        def lora_linear(old: nn.Linear, parts: Optional[Sequence[Tuple[int, bool]]] = None) -> LoRALinear:
            return LoRALinear(
                old.in_features, old.out_features, lora.r, lora.alpha, lora.dropout, parts, lora.rslora, lora.dora,
                bias=old.bias is not None,
            )

        for block in self.transformer.h:
            if lora.query or lora.key or lora.value:
                qkv_parts = [(q_size, lora.query), (kv_size, lora.key), (kv_size, lora.value)]
                block.attn.c_attn = lora_linear(block.attn.c_attn, qkv_parts)
            if lora.projection:
                block.attn.c_proj = lora_linear(block.attn.c_proj)
            if lora.mlp:
                mlp = block.mlp
                mlp.c_fc1, mlp.c_fc2, mlp.c_proj = lora_linear(mlp.c_fc1), lora_linear(mlp.c_fc2), lora_linear(mlp.c_proj)
        if lora.head:
            self.lm_head = lora_linear(self.lm_head)

    def lora_layers(self) -> List[LoRALinear]:
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def merge_lora(self) -> None:
        for layer in self.lora_layers():
            layer.merge()

    def unmerge_lora(self) -> None:
        for layer in self.lora_layers():
            layer.unmerge()


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name


def lora_state_dict(
    model: LoRALLaMA,
    state_dict: Optional[Dict[str, torch.Tensor]] = None,
    prompt_style: str = DEFAULT_PROMPT_STYLE,
    base_model: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The LoRA tensors alone (a few MB for 7B at r=8), with the hyperparameters, the base model's shape and
    the prompt style trained with, so generate and merge scripts rebuild the same model from the file alone.
    `state_dict`: the model's tensors if not its own `state_dict()` (under FSDP, those gathered from the shards).
    `base_model`: the base's `base_fingerprint`, so that the file is refused on another base of the same shape."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {name: t.detach() for name, t in state_dict.items() if "lora_" in name}
    checkpoint = {
        "lora_config": asdict(model.lora_config),
        "base_config": asdict(model.config),
        "state_dict": tensors,
        "prompt_style": prompt_style,
    }
    if base_model is not None:
        checkpoint["base_model"] = base_model
    return checkpoint


# Which base model a LoRA file was trained on. Bases of the same shape (a model and its full finetune, two models
# of one architecture) take each other's LoRA files without any error, and the answers are quietly wrong. A hash
# of the base's weights file would have to read all of it (13 GB for 7B) and be cached somewhere, and it would
# differ between two conversions of the same weights (convert_hf_checkpoint.py --dtype bfloat16 / float32). So
# a LoRA file records a fingerprint instead: FINGERPRINT_SAMPLES values at fixed positions of every base tensor
# (a few pages of the memory-mapped file each: milliseconds), and a base matches when it has the same tensors
# and every value agrees within what a conversion to bfloat16 or float16 changes. Another model, or a finetune
# of the same one, differs far more than that at some of the positions.
FINGERPRINT_SAMPLES = 8
FINGERPRINT_RTOL = 2**-7  # bfloat16 keeps 8 significant bits: rounding moves a value by at most 2^-9 of it
FINGERPRINT_ATOL = 1e-6  # float16 rounds tiny values to its subnormals (steps of 6e-8)


def base_fingerprint(weights: Path) -> Dict[str, Any]:
    """{"weights": the base checkpoint file's path (to name it in errors), "samples": {tensor name: float32
    values at fixed positions}} for `lora_state_dict`."""
    try:
        state_dict = torch.load(str(weights), mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - the base checkpoint is checked in full when it is loaded
        raise UserError(f"{weights} is not a readable PyTorch checkpoint ({describe_exception(e)})")
    if is_marked_weights(state_dict):
        state_dict = state_dict["state_dict"]
    samples = {}
    for name, tensor in sorted(state_dict.items()):
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel() > 0:
            flat = tensor.reshape(-1)
            positions = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SAMPLES, dtype=torch.float64).long()
            samples[name] = flat[positions].float().clone()
    return {"weights": str(weights), "samples": samples}


def check_lora_base(checkpoint: Dict[str, Any], path: Path, weights: Path) -> None:
    """Refuses a LoRA file trained on another base model than the checkpoint `weights` (a file from before
    fingerprints were recorded is not checked)."""
    recorded = checkpoint.get("base_model")
    if recorded is None:
        return
    ours, theirs = base_fingerprint(weights)["samples"], recorded["samples"]
    differ = sorted(set(ours) ^ set(theirs)) or [
        name for name in sorted(ours) if ours[name].shape != theirs[name].shape
        or not torch.allclose(ours[name], theirs[name].float(), rtol=FINGERPRINT_RTOL, atol=FINGERPRINT_ATOL)
    ]
    if differ:
        raise UserError(f"{path} was trained on the base model {recorded['weights']}, not on {weights}: their "
                        f"weights differ (e.g. {differ[0]}); use the base it was trained on")


SHAPE_FIELDS = ("n_layer", "n_embd", "n_head", "n_query_groups", "vocab_size")  # the base's, recorded in a LoRA file
# what tells model families apart beyond their sizes (Qwen2's biases, tied embeddings, Llama 3's RoPE scaling,
# Mistral's head size and window); a LoRA file written before they existed was made on a LLaMA: their defaults
FAMILY_FIELDS = ("qkv_bias", "tie_embeddings", "head_dim", "rope_scaling", "sliding_window")


def read_lora_checkpoint(path: Path) -> Dict[str, Any]:
    """Loads a LoRA file (finetune/lora.py's) and checks every field it stores, once, here: the config's types
    and values, the prompt style, the base model's shape and fingerprint, the tensors. A bad field is one
    UserError naming the file and the field (instead of a TypeError deep inside model building)."""
    checkpoint = load_state_dict(path)
    lora_config_from_checkpoint(checkpoint, path)
    lora_prompt_style(checkpoint, path)
    tensors = checkpoint["state_dict"]
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise UserError(f"{path}: state_dict must map names to tensors")
    base = checkpoint.get("base_config", {})
    if not isinstance(base, dict) or any(type(base[name]) is not int for name in SHAPE_FIELDS if name in base):
        raise UserError(f"{path}: base_config must be an object whose sizes ({', '.join(SHAPE_FIELDS)}) are integers")
    fingerprint = checkpoint.get("base_model")
    if fingerprint is not None and not (
        isinstance(fingerprint, dict) and isinstance(fingerprint.get("weights"), str)
        and isinstance(fingerprint.get("samples"), dict)
        and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in fingerprint["samples"].values())
    ):
        raise UserError(f'{path}: base_model must be {{"weights": path, "samples": {{name: tensor}}}} '
                        "(as finetune/lora.py writes it)")
    return checkpoint


def lora_prompt_style(checkpoint: Dict[str, Any], path: Union[str, Path] = "the LoRA file") -> str:
    """The prompt style a LoRA file was trained with (files written before styles existed: alpaca)."""
    style = checkpoint.get("prompt_style", DEFAULT_PROMPT_STYLE)
    if not isinstance(style, str) or style not in PROMPT_STYLES:
        raise UserError(f"{path}: prompt_style {style!r} is not one of {', '.join(PROMPT_STYLES)}")
    return style


def lora_config_from_checkpoint(checkpoint: Dict[str, Any], path: Path) -> LoRAConfig:
    if not isinstance(checkpoint, dict) or "lora_config" not in checkpoint or "state_dict" not in checkpoint:
        if isinstance(checkpoint, dict) and any(str(name).endswith((".lora_A", ".lora_B")) for name in checkpoint):
            raise UserError(
                f"{path} holds LoRA weights but no lora_config: a Lit-LLaMA LoRA file? Convert it with "
                "scripts/convert_lit_llama_checkpoint.py"
            )
        raise UserError(f"{path} is not a LoRA checkpoint written by finetune/lora.py (no lora_config)")
    if not isinstance(checkpoint["lora_config"], dict):
        raise UserError(f"{path}: invalid lora_config: expected an object, got {checkpoint['lora_config']!r}")
    try:
        return LoRAConfig(**checkpoint["lora_config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: invalid lora_config: {e}")


def check_lora_family(checkpoint: Dict[str, Any], path: Path, config: Config) -> None:
    """Refuses a LoRA file made on a base of another model family (Qwen2 vs Llama, tied vs untied, ...)."""
    base, ours = checkpoint.get("base_config", {}), asdict(config)
    defaults = asdict(Config(n_embd=ours["n_embd"], n_head=ours["n_head"]))
    for field in FAMILY_FIELDS:
        theirs = base.get(field, defaults[field])
        if theirs != ours[field]:
            raise UserError(f"{path} was made for another model family: its base has {field}={theirs}, this "
                            f"checkpoint has {field}={ours[field]}")


def load_lora_state_dict(model: LoRALLaMA, checkpoint: Dict[str, Any], path: Path) -> None:
    """Loads LoRA tensors into a model built with the file's LoRAConfig; refuses files made for
    another base model (other size) or with another rank / targets."""
    check_lora_family(checkpoint, path, model.config)
    base = checkpoint.get("base_config", {})
    ours = asdict(model.config)
    for field in SHAPE_FIELDS:
        if field in base and base[field] != ours[field]:
            raise UserError(
                f"{path} was trained on a base model with {field}={base[field]}, this checkpoint has {ours[field]}"
            )
    expected = {name: t for name, t in model.state_dict().items() if "lora_" in name}
    tensors = checkpoint["state_dict"]
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise UserError(f"{path} does not fit this model: missing {missing[:2]}, unexpected {unexpected[:2]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise UserError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)} "
                "(other rank or model size?)"
            )
    check_finite(tensors, Path(path))
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)


def load_lora_model(
    paths: CheckpointPaths, lora_path: Path, device: torch.device, dtype: torch.dtype, merge: bool = True
) -> LoRALLaMA:
    """Base checkpoint + LoRA file -> model, with the LoRA settings read from the file; merged by default."""
    checkpoint = read_lora_checkpoint(lora_path)
    check_lora_family(checkpoint, lora_path, paths.config)
    check_lora_base(checkpoint, lora_path, paths.weights)
    model = load_model(paths, device, dtype, LoRALLaMA, lora=lora_config_from_checkpoint(checkpoint, lora_path))
    load_lora_state_dict(model, checkpoint, lora_path)
    if merge:
        model.merge_lora()
    return model


class LoRAFinetune:
    """Finetuning with LoRA (finetune/lora.py): the base frozen (in NF4 with `quantize`: QLoRA), the LoRA
    weights trained, and each checkpoint only those (a few MB), with the prompt style of the data and a
    fingerprint of the base, so that generate/lora.py prompts the same way and refuses another base."""

    name, final_name, trains_every_weight, sharded_resume = "lora", "lit-llama-lora-finetuned.pth", False, False
    flag_defaults = {"learning_rate": 3e-4, "weight_decay": 0.0, "warmup_iters": 100}  # the article's

    def __init__(self, lora: LoRAConfig, quantize: Optional[str] = None) -> None:
        self.lora, self.quantize = lora, quantize

    def configure(self, config: Config, run: Any) -> Dict[str, Any]:
        check_quantize(self.quantize, run, config)
        return {"lora": asdict(self.lora), "quantize": self.quantize}

    def default_out_dir(self) -> Path:
        return Path("out/lora/alpaca")

    def load(self, fabric: Any, paths: CheckpointPaths, dtype: torch.dtype) -> LoRALLaMA:
        model = load_model(paths, load_device(fabric, self.quantize), dtype, LoRALLaMA, lora=self.lora)
        mark_only_lora_as_trainable(model)
        if self.quantize:
            quantize_frozen_linears(model, fabric.device, fabric.world_size if is_fsdp(fabric) else None)
            fabric.print(f"Frozen block weights in NF4: {frozen_weight_bytes(model):.3f} bytes per weight")
        fabric.print(f"LoRA r={self.lora.r} alpha={self.lora.alpha}: {num_parameters(model, requires_grad=True):,} "
                     f"trainable of {num_parameters(model):,} parameters")
        return model

    def saver(self, fabric: Any, model: nn.Module, paths: CheckpointPaths, data_dir: Path, out_dir: Path) -> Any:
        prompt_style = prompt_style_of_data(data_dir)  # recorded in the LoRA file: generate/lora.py prompts the same way
        base_model = base_fingerprint(paths.weights)  # recorded too: the LoRA file is refused on another base model

        def save_lora(path: Path) -> None:
            trainable = full_state_dict(model, trainable_only=True)  # under FSDP gathered from every rank
            if fabric.global_rank == 0:
                save_atomic(lora_state_dict(unwrap(model), trainable, prompt_style, base_model), path)
                fabric.print(f"Saved LoRA weights to {path}")

        return save_lora
