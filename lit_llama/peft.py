"""PEFT's LoRA adapters (adapter_config.json + adapter_model.safetensors) and our LoRA files, both ways
(scripts/export_peft.py writes them, scripts/convert_peft_checkpoint.py reads them).

PEFT adapts each Hugging Face projection on its own; our fused c_attn holds one (A, B) pair per adapted part
of [q | k | v], stacked in `lora_A` (rows of r) and `lora_B` (rows of the part's size). Our q/k rows are
already in Hugging Face's rotate-half layout (Meta's weights are permuted once, on conversion), so
splitting the stacks is the whole translation: no row permutation is needed either way.
"""

import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

import torch

from lit_llama.cli import UserError
from lit_llama.convert import QKV
from lit_llama.lora import LoRAConfig
from lit_llama.model import Config

PEFT_PREFIX = "base_model.model."

# our LoRAConfig target -> the Hugging Face modules it adapts
LORA_TARGET_MODULES = {
    "query": ("q_proj",),
    "key": ("k_proj",),
    "value": ("v_proj",),
    "projection": ("o_proj",),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "head": ("lm_head",),
}

# our tensor name suffix -> PEFT's (DoRA's magnitude is a bare tensor in PEFT's files, without ".weight")
PEFT_TENSOR_SUFFIXES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


def lora_layer_modules(lora: LoRAConfig, config: Config) -> List[Tuple[str, List[Tuple[str, int]]]]:
    """Every LoRA layer of a `LoRALLaMA`, as (our module name, [(Hugging Face module name, output rows), ...]):
    the HF modules whose A/B are stacked in that layer, in stacking order."""
    q_size, kv_size = config.n_head * config.head_size, config.n_query_groups * config.head_size
    layers: List[Tuple[str, List[Tuple[str, int]]]] = []
    for i in range(config.n_layer):
        qkv = [(f"model.layers.{i}.self_attn.{p}", size)
               for p, size, on in zip(QKV, (q_size, kv_size, kv_size), (lora.query, lora.key, lora.value)) if on]
        if qkv:
            layers.append((f"transformer.h.{i}.attn.c_attn", qkv))
        if lora.projection:
            layers.append((f"transformer.h.{i}.attn.c_proj", [(f"model.layers.{i}.self_attn.o_proj", config.n_embd)]))
        if lora.mlp:
            for ours, hf, size in (("c_fc1", "gate_proj", config.intermediate_size),
                                   ("c_fc2", "up_proj", config.intermediate_size),
                                   ("c_proj", "down_proj", config.n_embd)):
                layers.append((f"transformer.h.{i}.mlp.{ours}", [(f"model.layers.{i}.mlp.{hf}", size)]))
    if lora.head:
        layers.append(("lm_head", [("lm_head", config.vocab_size)]))
    return layers


def lora_in_features(module: str, config: Config) -> int:
    """The input size of a LoRA-adapted layer (ours or Hugging Face's name): the MLP's down projection reads the
    hidden layer, the attention output projection the heads (n_head * head_size: not n_embd for Mistral's
    head_dim), everything else the embedding."""
    if module.endswith(("mlp.c_proj", "down_proj")):
        return config.intermediate_size
    if module.endswith(("attn.c_proj", "o_proj")):
        return config.n_head * config.head_size
    return config.n_embd


def lora_to_peft(
    tensors: Dict[str, torch.Tensor], lora: LoRAConfig, config: Config, source: Any = "the LoRA tensors"
) -> Dict[str, torch.Tensor]:
    """Our LoRA tensors -> PEFT's, the stacked q/k/v pairs split per projection. Each tensor is cloned:
    safetensors wants every tensor in its own memory, not views of one stack. Every tensor must have the shape
    `lora` (its rank, its targets) gives it: the rank written beside them must be theirs."""
    peft: Dict[str, torch.Tensor] = {}
    for ours, modules in lora_layer_modules(lora, config):
        sizes = [size for _, size in modules]
        in_features = lora_in_features(ours, config)
        expected = {"lora_A": (lora.r * len(modules), in_features), "lora_B": (sum(sizes), lora.r),
                    "lora_magnitude": (sum(sizes),)}
        for kind, shape in expected.items():
            name = f"{ours}.{kind}"
            if name not in tensors:
                if kind == "lora_magnitude" and not lora.dora:
                    continue
                raise UserError(f"{source}: missing tensor {name!r}, which its lora_config implies")
            if tuple(tensors[name].shape) != shape:
                raise UserError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                                f"for its lora_config (r={lora.r})")
        pieces = {
            "lora_A": tensors[f"{ours}.lora_A"].split(lora.r),
            "lora_B": tensors[f"{ours}.lora_B"].split(sizes),
        }
        if f"{ours}.lora_magnitude" in tensors:
            pieces["lora_magnitude"] = tensors[f"{ours}.lora_magnitude"].split(sizes)
        for kind, split in pieces.items():
            for (hf_module, _), piece in zip(modules, split):
                peft[f"{PEFT_PREFIX}{hf_module}.{PEFT_TENSOR_SUFFIXES[kind]}"] = piece.clone()
    return peft


def peft_to_lora(
    tensors: Dict[str, torch.Tensor], lora: LoRAConfig, config: Config, source: Path
) -> Dict[str, torch.Tensor]:
    """The inverse of `lora_to_peft`: PEFT's per-projection tensors stacked into our LoRA layers. Every tensor
    the LoRA config implies must be there with its shape, and no other."""
    kinds = ["lora_A", "lora_B"] + (["lora_magnitude"] if lora.dora else [])
    ours: Dict[str, torch.Tensor] = {}
    used = set()
    for layer, modules in lora_layer_modules(lora, config):
        for kind in kinds:
            parts = []
            for hf_module, size in modules:
                name = f"{PEFT_PREFIX}{hf_module}.{PEFT_TENSOR_SUFFIXES[kind]}"
                in_features = lora_in_features(hf_module, config)
                expected = {"lora_A": (lora.r, in_features), "lora_B": (size, lora.r), "lora_magnitude": (size,)}[kind]
                if name not in tensors:
                    raise UserError(f"{source}: missing tensor {name!r}")
                tensor = tensors[name]
                if tuple(tensor.shape) != expected:
                    raise UserError(
                        f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected} for this "
                        f"base model and r={lora.r}"
                    )
                parts.append(tensor)
                used.add(name)
            ours[f"{layer}.{kind}"] = torch.cat(parts, dim=0)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise UserError(f"{source}: tensor {unexpected[0]!r} has no place in our LoRA model")
    return ours


def peft_targets(names: Iterable[str], n_layer: int, source: Path) -> Dict[str, bool]:
    """Which of our LoRAConfig targets a PEFT adapter's tensor names cover. Our targets are model-wide, so
    every layer must adapt the same modules, and the MLP's three projections go together."""
    pattern = re.compile(
        re.escape(PEFT_PREFIX) + r"(?:model\.layers\.(\d+)\.(?:self_attn|mlp)\.)?(\w+)\.(lora_A\.weight|lora_B\.weight|"
        r"lora_magnitude_vector)$"
    )
    per_layer: Dict[int, set] = {}
    head = False
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            raise UserError(
                f"{source}: tensor {name!r} is not a LoRA weight of a LLaMA-architecture model's projections "
                "(q/k/v/o_proj, gate/up/down_proj, lm_head)"
            )
        layer, module = match.group(1), match.group(2)
        if layer is None:
            if module != "lm_head":
                raise UserError(f"{source}: tensor {name!r}: LoRA on {module!r} is not supported (only lm_head "
                                "outside the transformer layers)")
            head = True
        else:
            if int(layer) >= n_layer:
                raise UserError(f"{source}: tensor {name!r} is for layer {layer}, the base model has {n_layer} layers")
            per_layer.setdefault(int(layer), set()).add(module)
    module_sets = {frozenset(modules) for modules in per_layer.values()}
    if per_layer and (len(per_layer) != n_layer or len(module_sets) != 1):
        raise UserError(
            f"{source} adapts different modules in different layers (or not every layer); our LoRA adapts the "
            "same modules in every layer"
        )
    modules = set(next(iter(module_sets))) if module_sets else set()
    targets = {target: False for target in LORA_TARGET_MODULES}
    targets["head"] = head
    for target, hf_modules in LORA_TARGET_MODULES.items():
        present = modules & set(hf_modules)
        if present and present != set(hf_modules):
            raise UserError(f"{source} adapts {sorted(present)} but not {sorted(set(hf_modules) - present)}: our "
                            f"LoRA adapts the MLP's gate, up and down projections together")
        if present:
            targets[target] = True
        modules -= set(hf_modules)
    if modules:
        raise UserError(f"{source}: LoRA on {sorted(modules)} is not supported")
    return targets
