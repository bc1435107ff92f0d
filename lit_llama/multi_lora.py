"""Many LoRA finetunes on one base model: any number of LoRA files on one base loaded once, and each row of a
batch computed with its own adapter (or none).

A LoRA file's update of a linear layer is one low-rank product B @ A (`LoRALinear.factors`: the fused q/k/v
blocks and alpha / r folded in). `MultiLoRALinear` keeps the A and B of the adapters on the device stacked:

    A_all: (1 + slots, R, in)      B_all: (1 + slots, out, R)

where slot 0 is "no adapter" (zeros) and R is the largest rank among the adapters (a smaller rank is padded
with zeros, which add nothing; so is a layer an adapter does not target). A forward pass takes one slot
index per row, gathers each row's A and B from the stacks and applies them with two batched matmuls:

    y = x W^T + (x A_row^T) B_row^T

No Python loop over rows, and the base weights are not written: selecting adapters only sets the index.

Two additions follow the LoRA paper's author on serving:

* `swap="merged"`: a batch whose rows all name one adapter runs with that adapter merged into the base weights,
  at the base model's speed (one matmul per layer, no gathered stacks); a mixed batch unmerges and takes the
  path above. Merging and unmerging must give back the loaded base bit for bit, in every dtype. Subtracting the
  update does not: round(round(W + dW) - dW) != W in bf16 (and in float32). So a merge keeps the exact
  original values of the rows it changes (the rows where B is not zero: for a q/v adapter, the q and v rows),
  writes round(W + B A) computed in float32 (rounded once), and unmerging copies the kept rows back. The cost is
  a copy of the adapted rows (device memory of one adapter's target rows) and no arithmetic on the way back.
* An adapter cache of two levels: `max_device_adapters` slots in the stacks on the device, least recently used
  first out, over `max_host_adapters` adapters' factors in host memory (also LRU; a miss reads the LoRA file
  again). Switching to an adapter in host memory is then a copy to the device, not a read from disk.
  `memory()` reports what each level holds.

An adapter may be the leaf of a LoRA tree (lit_llama/lora_tree.py): it is served as its whole path composed, one
adapter of the summed rank, so a mixed batch may hold rows of different leaves that share ancestors. Host memory
keeps nodes, not leaves (by their files' SHA-256): a switch to a leaf whose ancestors are there reads only the
nodes that are not.
"""
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.cli import UserError
from lit_llama.lora import lora_config_from_checkpoint, lora_prompt_style
from lit_llama.lora_tree import Node, compose, node_factors, read_node, tree_path
from lit_llama.model import Config, LLaMA
from lit_llama.prompts import DEFAULT_PROMPT_STYLE

BASE = "base"  # the name that selects no adapter
SWAP_MODES = ("unmerged", "merged")
Factors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # adapted layer name -> (A, B), B @ A its whole update


class MultiLoRALinear(nn.Linear):
    """A frozen bias-free nn.Linear (its weight keeps the name "weight", so base checkpoints load as they are)
    plus the stacked updates of several adapters, one picked per row by `row_slots`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)  # bias: Qwen2's q/k/v
        # not in state_dict(): adapters come from their own files, not from the base checkpoint
        self.register_buffer("lora_A_all", torch.zeros(1, 0, in_features), persistent=False)
        self.register_buffer("lora_B_all", torch.zeros(1, out_features, 0), persistent=False)
        self.row_slots: Optional[torch.Tensor] = None  # (batch,) slot per row; None: the base layer alone
        self.merged_rows: Optional[torch.Tensor] = None  # while a slot is merged: the indices of the rows it changed
        self.kept_rows: Optional[torch.Tensor] = None  # ... and their exact values before the merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.lora_A_all, self.lora_B_all)

    def forward_with(self, x: torch.Tensor, A_all: torch.Tensor, B_all: torch.Tensor,
                     x_lora: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer with the stacks `A_all`, `B_all` (this layer's buffers; in training, stacks built from
        each task's trainable factors, so gradients flow through the gather to them). `x_lora`: the input of the
        low-rank branch if not x (x after LoRA's dropout)."""
        y = F.linear(x, self.weight, self.bias)
        if self.row_slots is None or A_all.size(1) == 0:
            return y
        # index_select, not stack[row_slots]: the same gather, but advanced indexing took 10-20 ms per call on a
        # CPU (torch 2.14, measured) against microseconds, and ran the unmerged path at half the base's speed
        A = A_all.index_select(0, self.row_slots).to(x.dtype)  # (batch, R, in)
        B = B_all.index_select(0, self.row_slots).to(x.dtype)  # (batch, out, R)
        return y + ((x if x_lora is None else x_lora) @ A.transpose(1, 2)) @ B.transpose(1, 2)

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

    @torch.no_grad()
    def merge_slot(self, slot: int) -> None:
        """W += B A for the adapter in `slot`, computed in float32 and rounded once to W's dtype, on the rows B
        changes; those rows' exact values are kept for `unmerge`. Switching between adapters of the same targets
        (the same rows) reuses the kept originals: no copy back first."""
        if self.lora_A_all.size(1) == 0:  # no adapter targets this layer
            self.unmerge()
            return
        A, B = self.lora_A_all[slot].float(), self.lora_B_all[slot].float()
        rows = B.any(dim=1).nonzero().squeeze(1)  # a row whose B is zero is not changed: nothing to keep
        if self.merged_rows is None or not torch.equal(rows, self.merged_rows):
            self.unmerge()  # the rows of the adapter merged before, back first
            if rows.numel() == 0:
                return
            self.merged_rows, self.kept_rows = rows, self.weight.index_select(0, rows)
        merged = torch.addmm(self.kept_rows.float(), B.index_select(0, rows), A)  # from the originals: exact
        self.weight.index_copy_(0, rows, merged.to(self.weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """The kept rows copied back: the weight is again bit for bit what it was before `merge_slot`."""
        if self.merged_rows is not None:
            self.weight.index_copy_(0, self.merged_rows, self.kept_rows)
        self.merged_rows = self.kept_rows = None

    def kept_bytes(self) -> int:
        if self.kept_rows is None:
            return 0
        return self.kept_rows.numel() * self.kept_rows.element_size() + self.merged_rows.numel() * 8

    @staticmethod
    def _grown(stack: torch.Tensor, shape: Tuple[int, int, int]) -> torch.Tensor:
        if tuple(stack.shape) == shape:
            return stack
        grown = stack.new_zeros(shape)
        grown[: stack.size(0), : stack.size(1), : stack.size(2)] = stack
        return grown


class MultiLoRALLaMA(LLaMA):
    """LLaMA whose linear layers can each carry the updates of many adapters. Build it with
    `load_model(paths, device, dtype, MultiLoRALLaMA)` (keyword arguments as below), add LoRA files with
    `add_adapter`, then `select` an adapter name (or "base") per row before each forward pass.

    Args:
        swap: "unmerged" (every batch through the stacks) or "merged" (a batch of one adapter runs with it merged).
        max_device_adapters: Device slots for adapters (None: as many as are added). A batch may name at most
            this many adapters.
        max_host_adapters: Adapters whose factors are kept in host memory (None: every one added); at least
            `max_device_adapters`. A LoRA tree's nodes count one each (a leaf's ancestors are shared).
    """

    def __init__(self, config: Config, swap: str = "unmerged", max_device_adapters: Optional[int] = None,
                 max_host_adapters: Optional[int] = None) -> None:
        super().__init__(config)
        check_cache_flags(swap, max_device_adapters, max_host_adapters)
        for block in self.transformer.h:
            attn, mlp = block.attn, block.mlp
            attn.c_attn, attn.c_proj = _multi(attn.c_attn), _multi(attn.c_proj)
            mlp.c_fc1, mlp.c_fc2, mlp.c_proj = _multi(mlp.c_fc1), _multi(mlp.c_fc2), _multi(mlp.c_proj)
        self.lm_head = _multi(self.lm_head)
        self.swap, self.max_device, self.max_host = swap, max_device_adapters, max_host_adapters
        self.files: Dict[str, Tuple[Path, Optional[Path]]] = {}  # every adapter added: its file and base weights
        self.host: "OrderedDict[str, Factors]" = OrderedDict()  # factors in host memory, least recently used first,
        # by node: a LoRA file's SHA-256 (a plain adapter is one node; a tree's leaf, each node of its path)
        self.leaf_nodes: Dict[str, List[str]] = {}  # adapter -> its path's nodes, root first
        self.node_files: Dict[str, Path] = {}  # node -> its file, read again should it leave host memory
        self.device_slots: "OrderedDict[str, int]" = OrderedDict()  # adapter -> its slot (1, 2, ...), LRU first
        self.merged: Optional[str] = None  # the adapter merged into the base weights (swap="merged")
        self.prompt_styles: Dict[str, str] = {BASE: DEFAULT_PROMPT_STYLE}  # the style each was trained with

    @property
    def adapters(self) -> List[str]:
        """"base" and every adapter added, on the device or not."""
        return [BASE, *self.files]

    def multi_lora_layers(self) -> Dict[str, MultiLoRALinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, MultiLoRALinear)}

    def add_adapter(self, name: str, lora_path: Path, base_weights: Optional[Path] = None) -> None:
        """Loads a LoRA file (finetune/lora.py's) under `name`; a name already there is replaced (hot reload).
        `base_weights`: the base checkpoint file, to refuse a LoRA file trained on another base (`check_lora_base`).
        The file is read and checked now; its factors go to host memory, and to a device slot if one is free."""
        if name == BASE or not name:
            raise UserError(f"adapter name {name!r} is reserved or empty: choose another")
        nodes = read_tree_nodes(Path(lora_path), self.config, base_weights)
        self.files[name] = (Path(lora_path), base_weights)
        self.prompt_styles[name] = lora_prompt_style(nodes[-1].checkpoint, lora_path)
        self.leaf_nodes[name] = [node.sha256 for node in nodes]
        for node in nodes:  # a changed file is a new node; the old one leaves host memory in its turn
            self.node_files[node.sha256] = node.path
            if node.sha256 in self.host:
                self.host.move_to_end(node.sha256)
            else:
                self._keep_on_host(node.sha256, node_factors(node, self.config))
        factors = self._host_factors(name)
        if self.merged == name:  # the old version is merged: the base comes back, the next select merges anew
            self._unmerge()
        if name in self.device_slots or self.max_device is None or len(self.device_slots) < self.max_device:
            slot = self.device_slots.get(name, len(self.device_slots) + 1)
            self._put_in_slot(slot, factors)
            self.device_slots[name] = slot

    def select(self, names: Optional[Sequence[Optional[str]]]) -> None:
        """One adapter name per row of the next batches ("base" or None: no adapter); None: the base model
        for every row. Brings the adapters named to the device (from host memory, or from their files); with
        swap="merged" and one adapter for every row, merges it (the base weights come back exactly on the next
        switch)."""
        rows = [BASE] if names is None else [BASE if n is None else n for n in names]
        unknown = [n for n in rows if n != BASE and n not in self.files]
        if unknown:
            raise UserError(f"unknown adapter {unknown[0]!r}; loaded: {', '.join(self.adapters)}")
        wanted = list(dict.fromkeys(n for n in rows if n != BASE))
        if self.max_device is not None and len(wanted) > self.max_device:
            raise UserError(f"a batch names {len(wanted)} adapters, more than the {self.max_device} the device "
                            "holds (--max_device_adapters): raise it or send smaller batches")
        slots = {BASE: 0, **{name: self._to_device(name, wanted) for name in wanted}}
        if self.swap == "merged" and len(set(rows)) == 1:
            self._merge(rows[0])
            row_slots = None  # every layer is the plain (merged) linear layer
        else:
            self._unmerge()
            row_slots = None if not wanted else torch.tensor([slots[n] for n in rows],
                                                             device=self.lm_head.weight.device)
        for layer in self.multi_lora_layers().values():
            layer.row_slots = row_slots

    def memory(self) -> Dict[str, int]:
        """Bytes and counts of each cache level: the adapters' stacks on the device (and the original rows kept
        while one is merged) and their factors in host memory."""
        layers = self.multi_lora_layers().values()
        device = sum(t.numel() * t.element_size() for layer in layers for t in (layer.lora_A_all, layer.lora_B_all))
        kept = sum(layer.kept_bytes() for layer in layers)
        host = sum(t.numel() * t.element_size() for factors in self.host.values() for A, B in factors.values()
                   for t in (A, B))
        return {"device_adapters": len(self.device_slots), "device_bytes": device, "merge_kept_bytes": kept,
                "host_adapters": len(self.host), "host_bytes": host}

    def describe_memory(self) -> str:
        m = self.memory()
        kept = f", {m['merge_kept_bytes'] / 1e6:.1f} MB of base rows kept while one is merged" if self.merged else ""
        return (f"adapter cache: {m['device_adapters']} adapters on the device ({m['device_bytes'] / 1e6:.1f} MB{kept}), "
                f"{m['host_adapters']} in host memory ({m['host_bytes'] / 1e6:.1f} MB)")

    def _keep_on_host(self, name: str, factors: "Factors") -> None:
        self.host[name] = factors
        self.host.move_to_end(name)
        while self.max_host is not None and len(self.host) > self.max_host:
            self.host.popitem(last=False)

    def _host_factors(self, name: str) -> "Factors":
        """The adapter's factors, its path's nodes composed; a node not in host memory is read from its file."""
        path_factors = []
        for key in self.leaf_nodes[name]:
            if key in self.host:
                self.host.move_to_end(key)
            else:  # evicted from host memory: read from its file again, which must not have changed
                node = read_node(self.node_files[key])
                if node.sha256 != key:
                    raise UserError(f"{node.path} has changed since the adapter {name!r} was loaded: load it again")
                self._keep_on_host(key, node_factors(node, self.config))
            path_factors.append(self.host[key])
        return path_factors[0] if len(path_factors) == 1 else compose(path_factors)

    def _to_device(self, name: str, batch: Sequence[str]) -> int:
        """The slot holding `name`, after copying it in if needed (into a free slot, or the least recently used
        one of an adapter this batch does not name)."""
        if name in self.device_slots:
            self.device_slots.move_to_end(name)
            for key in self.leaf_nodes[name]:  # in use: the last to leave host memory too
                if key in self.host:
                    self.host.move_to_end(key)
            return self.device_slots[name]
        factors = self._host_factors(name)
        if self.max_device is None or len(self.device_slots) < self.max_device:
            slot = len(self.device_slots) + 1
        else:
            evicted = next(n for n in self.device_slots if n not in batch)
            slot = self.device_slots.pop(evicted)
        self._put_in_slot(slot, factors)
        self.device_slots[name] = slot
        return slot

    def _put_in_slot(self, slot: int, factors: "Factors") -> None:
        device = self.lm_head.weight.device
        for layer_name, layer in self.multi_lora_layers().items():
            A, B = factors.get(layer_name, (None, None))
            layer.set_slot(slot, None if A is None else A.to(device, non_blocking=True),
                           None if B is None else B.to(device, non_blocking=True))

    def _merge(self, name: str) -> None:
        if self.merged == name:
            return
        if name == BASE:
            self._unmerge()
            return
        slot = self.device_slots[name]
        for layer in self.multi_lora_layers().values():
            layer.merge_slot(slot)
        self.merged = name

    def _unmerge(self) -> None:
        if self.merged is None:
            return
        for layer in self.multi_lora_layers().values():
            layer.unmerge()
        self.merged = None


def check_cache_flags(swap: str, max_device_adapters: Optional[int], max_host_adapters: Optional[int]) -> None:
    """The flags --swap, --max_device_adapters and --max_host_adapters of the scripts, checked (UserError)."""
    if swap not in SWAP_MODES:
        raise UserError(f"--swap {swap!r} is not one of {', '.join(SWAP_MODES)}")
    for flag, value in (("max_device_adapters", max_device_adapters), ("max_host_adapters", max_host_adapters)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"--{flag} must be a whole number of at least 1 (or null: no limit), got {value!r}")
    if max_host_adapters is not None and (max_device_adapters is None or max_host_adapters < max_device_adapters):
        raise UserError(f"--max_host_adapters {max_host_adapters} is less than --max_device_adapters "
                        f"{max_device_adapters if max_device_adapters is not None else '(no limit)'}: host memory "
                        "is the larger level, the device's slots the smaller one")


def _multi(linear: nn.Linear) -> MultiLoRALinear:
    return MultiLoRALinear(linear.in_features, linear.out_features, bias=linear.bias is not None)


def read_lora_factors(
    lora_path: Path, base_config: Config, base_weights: Optional[Path] = None
) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor]], str]:
    """Per adapted layer name, the (A, B) of a LoRA file as `LoRALinear.factors` gives them (a leaf of a LoRA
    tree: its whole path composed), and the prompt style it was trained with, after the same checks as loading
    the file into a LoRA model (its fields, the base model's shape, and with `base_weights` its identity, names,
    ranks; a tree's ancestors unchanged)."""
    nodes = read_tree_nodes(Path(lora_path), base_config, base_weights)
    factors = compose([node_factors(node, base_config) for node in nodes])
    return factors, lora_prompt_style(nodes[-1].checkpoint, lora_path)


def read_tree_nodes(lora_path: Path, base_config: Config, base_weights: Optional[Path]) -> List[Node]:
    """`lora_tree.tree_path`, DoRA refused."""
    nodes = tree_path(lora_path, base_config, base_weights)
    for node in nodes:
        if lora_config_from_checkpoint(node.checkpoint, node.path).dora:
            # a magnitude per row divides by a norm of W + BA: no low-rank product to stack nor, with --swap
            # merged, one that mixed batches could fall back to: refused in both modes
            raise UserError(f"{node.path} is a DoRA adapter: several adapters on one base (--swap unmerged or "
                            "merged) take plain LoRA (or rsLoRA) only; merge it with scripts/merge_lora.py and serve "
                            "it on its own")
    return nodes
