"""Many LoRA finetunes on one base model: any number of LoRA files on one base loaded once, unmerged, and
each row of a batch computed with its own adapter (or none).

A LoRA file's update of a linear layer is one low-rank product B @ A (`LoRALinear.factors`: the fused q/k/v
blocks and alpha / r folded in). `MultiLoRALinear` keeps every adapter's A and B of its layer stacked:

    A_all: (1 + adapters, R, in)      B_all: (1 + adapters, out, R)

where slot 0 is "no adapter" (zeros) and R is the largest rank among the adapters (a smaller rank is padded
with zeros, which add nothing; so is a layer an adapter does not target). A forward pass takes one slot
index per row, gathers each row's A and B from the stacks and applies them with two batched matmuls:

    y = x W^T + (x A_row^T) B_row^T

No Python loop over rows, and the base weights are never written: selecting adapters only sets the index,
and adding one costs the size of the adapters, not of the model.
"""

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.lora import (
    LoRALinear, LoRALLaMA, check_lora_base, check_lora_family, load_lora_state_dict, lora_config_from_checkpoint,
    lora_prompt_style, read_lora_checkpoint,
)
from lit_llama.model import Config, LLaMA
from lit_llama.prompts import DEFAULT_PROMPT_STYLE
from lit_llama.cli import UserError

BASE = "base"  # the name that selects no adapter


class MultiLoRALinear(nn.Linear):
    """A frozen bias-free nn.Linear (its weight keeps the name "weight", so base checkpoints load as they are)
    plus the stacked updates of several adapters, one picked per row by `row_slots`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)  # bias: Qwen2's q/k/v
        # not in state_dict(): adapters come from their own files, not from the base checkpoint
        self.register_buffer("lora_A_all", torch.zeros(1, 0, in_features), persistent=False)
        self.register_buffer("lora_B_all", torch.zeros(1, out_features, 0), persistent=False)
        self.row_slots: Optional[torch.Tensor] = None  # (batch,) slot per row; None: the base layer alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.row_slots is None or self.lora_A_all.size(1) == 0:
            return y
        A = self.lora_A_all[self.row_slots].to(x.dtype)  # (batch, R, in)
        B = self.lora_B_all[self.row_slots].to(x.dtype)  # (batch, out, R)
        return y + (x @ A.transpose(1, 2)) @ B.transpose(1, 2)

    def set_slot(self, slot: int, A: Optional[torch.Tensor], B: Optional[torch.Tensor]) -> None:
        """Puts (A, B) in `slot` (zeros for None), appending the slot or widening every slot's rank as needed."""
        rank = max(self.lora_A_all.size(1), 0 if A is None else A.size(0))
        slots = max(self.lora_A_all.size(0), slot + 1)
        A_all = self._grown(self.lora_A_all, (slots, rank, self.in_features))
        B_all = self._grown(self.lora_B_all, (slots, self.out_features, rank))
        A_all[slot].zero_()
        B_all[slot].zero_()
        if A is not None:
            A_all[slot, : A.size(0)] = A
            B_all[slot, :, : B.size(1)] = B
        self.lora_A_all, self.lora_B_all = A_all, B_all

    @staticmethod
    def _grown(stack: torch.Tensor, shape: Tuple[int, int, int]) -> torch.Tensor:
        if tuple(stack.shape) == shape:
            return stack
        grown = stack.new_zeros(shape)
        grown[: stack.size(0), : stack.size(1), : stack.size(2)] = stack
        return grown


class MultiLoRALLaMA(LLaMA):
    """LLaMA whose linear layers can each carry the updates of many adapters. Build it with
    `load_model(paths, device, dtype, MultiLoRALLaMA)`, add LoRA files with `add_adapter`, then `select` an
    adapter name (or "base") per row before each forward pass."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        for block in self.transformer.h:
            attn, mlp = block.attn, block.mlp
            attn.c_attn, attn.c_proj = _multi(attn.c_attn), _multi(attn.c_proj)
            mlp.c_fc1, mlp.c_fc2, mlp.c_proj = _multi(mlp.c_fc1), _multi(mlp.c_fc2), _multi(mlp.c_proj)
        self.lm_head = _multi(self.lm_head)
        self.adapters: List[str] = [BASE]  # slot i holds adapters[i]; slot 0 is the base model alone
        self.prompt_styles: Dict[str, str] = {BASE: DEFAULT_PROMPT_STYLE}  # the style each was trained with

    def multi_lora_layers(self) -> Dict[str, MultiLoRALinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, MultiLoRALinear)}

    def add_adapter(self, name: str, lora_path: Path, base_weights: Optional[Path] = None) -> None:
        """Loads a LoRA file (finetune/lora.py's) under `name`; a name already there is replaced (hot reload).
        `base_weights`: the base checkpoint file, to refuse a LoRA file trained on another base (`check_lora_base`)."""
        if name == BASE or not name:
            raise UserError(f"adapter name {name!r} is reserved or empty: choose another")
        factors, style = read_lora_factors(Path(lora_path), self.config, base_weights)
        self.prompt_styles[name] = style
        slot = self.adapters.index(name) if name in self.adapters else len(self.adapters)
        device = self.lm_head.weight.device
        for layer_name, layer in self.multi_lora_layers().items():
            A, B = factors.get(layer_name, (None, None))
            layer.set_slot(slot, None if A is None else A.to(device), None if B is None else B.to(device))
        if slot == len(self.adapters):
            self.adapters.append(name)

    def select(self, names: Optional[Sequence[Optional[str]]]) -> None:
        """One adapter name per row of the next batches ("base" or None: no adapter); None: the base model
        for every row. Only sets indices: the base weights are not touched."""
        if names is None:
            slots = None
        else:
            unknown = [n for n in names if n is not None and n not in self.adapters]
            if unknown:
                raise UserError(f"unknown adapter {unknown[0]!r}; loaded: {', '.join(self.adapters)}")
            index = [0 if n is None else self.adapters.index(n) for n in names]
            slots = torch.tensor(index, device=self.lm_head.weight.device)
        for layer in self.multi_lora_layers().values():
            layer.row_slots = slots


def _multi(linear: nn.Linear) -> MultiLoRALinear:
    return MultiLoRALinear(linear.in_features, linear.out_features, bias=linear.bias is not None)


def read_lora_factors(
    lora_path: Path, base_config: Config, base_weights: Optional[Path] = None
) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor]], str]:
    """Per adapted layer name, the (A, B) of a LoRA file as `LoRALinear.factors` gives them, and the prompt style
    it was trained with, after the same checks as loading the file into a LoRA model (its fields, the base
    model's shape, and with `base_weights` its identity, names, ranks)."""
    checkpoint = read_lora_checkpoint(lora_path)
    lora = lora_config_from_checkpoint(checkpoint, lora_path)
    check_lora_family(checkpoint, lora_path, base_config)
    if base_weights is not None:
        check_lora_base(checkpoint, lora_path, base_weights)
    if lora.dora:  # a magnitude per row divides by a norm of W + BA: no low-rank product to stack
        raise UserError(f"{lora_path} is a DoRA adapter: several adapters on one base take plain LoRA (or rsLoRA) "
                        "only; merge it with scripts/merge_lora.py and serve it on its own")
    with torch.device("meta"):  # the layers' layout (which q/k/v blocks, which rank) without any memory
        template = LoRALLaMA(base_config, lora)
    load_lora_state_dict(template, checkpoint, lora_path)  # checks only: meta tensors hold no data
    tensors = checkpoint["state_dict"]
    factors = {}
    for name, layer in template.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_A = nn.Parameter(tensors[f"{name}.lora_A"].float(), requires_grad=False)
            layer.lora_B = nn.Parameter(tensors[f"{name}.lora_B"].float(), requires_grad=False)
            factors[name] = tuple(t.detach() for t in layer.factors())
    return factors, lora_prompt_style(checkpoint, lora_path)
