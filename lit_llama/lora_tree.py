"""LoRA trees: language -> domain -> task -> user. Each node is an ordinary LoRA file trained on the base with its
ancestors applied (`finetune/lora.py --parent_lora ROOT --parent_lora ... --parent_lora PARENT`), so it learns
only what its ancestors did not; a larger rank near the root, small ones at the leaves.

A node's file is a LoRA file (lit_llama/lora.py) plus "parents": its whole path above it, root first, one
{"name", "path", "sha256"} per ancestor. The SHA-256 of each ancestor's file pins the exact weights the node was
trained on top of: a leaf whose ancestor file has changed since is refused in one line. A leaf alone then says
how to compose the model: base + root + ... + leaf.

Composing a path is exact arithmetic, not an approximation. Node i's update of a linear layer is s_i B_i A_i
(rank r_i, scale s_i = alpha_i / r_i); the sum over the path is one LoRA of rank r_1 + ... + r_k:

    sum_i s_i B_i A_i = [s_1 B_1 | ... | s_k B_k] @ [A_1; ...; A_k]

(A stacked along the rank, the scaled B side by side). So a path is served as one adapter of the summed rank by
every existing path: the stacked several-adapter layer (mixed batches of leaves), merging, generation, and a
PEFT export (`flatten_path`, a plain LoRA file with alpha = rank, i.e. scale 1). The adapter cache of
lit_llama/multi_lora.py keeps nodes, not leaves, in host memory: switching between two leaves that share their
ancestors reads only the nodes that differ.

Nodes are plain LoRA or rsLoRA: a DoRA node rescales whole rows of W + dW, which is no low-rank sum.
"""

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from lit_llama.checkpoint import WEIGHTS_NAME, CheckpointPaths, full_state_dict, load_model, save_atomic
from lit_llama.cli import UserError
from lit_llama.distributed import load_device, unwrap
from lit_llama.lora import (
    LoRAConfig,
    LoRAFinetune,
    LoRALinear,
    LoRALLaMA,
    base_fingerprint,
    check_lora_base,
    check_lora_family,
    load_lora_model,
    load_lora_state_dict,
    lora_config_from_checkpoint,
    lora_state_dict,
    mark_only_lora_as_trainable,
    read_lora_checkpoint,
)
from lit_llama.model import Config
from lit_llama.prompts import DEFAULT_PROMPT_STYLE, prompt_style_of_data
from lit_llama.quantize import quantize_frozen_linears

PARENTS = "parents"  # the key of a node's ancestors in its LoRA file
Factors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # adapted layer name -> (A, B), B @ A its whole update


@dataclass
class Node:
    """One LoRA file of a path: where it is, the SHA-256 of its bytes (its identity) and its contents."""

    path: Path
    sha256: str
    checkpoint: Dict[str, Any]


# (resolved path, inode, size, mtime, ctime) -> SHA-256: a shared root is hashed once. The ctime is in the key
# because size and mtime can be set back (a file replaced by another of the same size, `touch -d`, `cp -p`);
# the ctime changes with any write or rename and cannot be set.
_digests: Dict[Tuple[str, int, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def recorded_parents(checkpoint: Dict[str, Any], path: Path) -> List[Dict[str, str]]:
    """The ancestors a LoRA file records, root first ([] for a root or a file from before trees)."""
    parents = checkpoint.get(PARENTS, [])
    if not isinstance(parents, list) or not all(
        isinstance(p, dict) and all(isinstance(p.get(key), str) for key in ("name", "path", "sha256")) for p in parents
    ):
        raise UserError(f'{path}: parents must be a list of {{"name", "path", "sha256"}} strings, root first '
                        "(as finetune/lora.py --parent_lora writes it)")
    return parents


def read_node(path: Path) -> Node:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    checkpoint = read_lora_checkpoint(path)
    recorded_parents(checkpoint, path)
    return Node(path, file_sha256(path), checkpoint)


def check_node(node: Node, config: Config, base_weights: Optional[Path], in_tree: bool) -> None:
    """The checks of loading a node on a base: its family and shape (via the template in `node_factors`), the
    base it was trained on (with `base_weights`), and in a tree of more than one node, plain LoRA only."""
    check_lora_family(node.checkpoint, node.path, config)
    if base_weights is not None:
        check_lora_base(node.checkpoint, node.path, base_weights)
    if in_tree and lora_config_from_checkpoint(node.checkpoint, node.path).dora:
        raise UserError(f"{node.path} is a DoRA adapter: the nodes of a LoRA tree are plain LoRA (or rsLoRA), whose "
                        "updates add up exactly; DoRA rescales whole rows")


def tree_path(leaf: Path, config: Config, base_weights: Optional[Path] = None) -> List[Node]:
    """The nodes from the root to `leaf`, read from the paths the leaf records and checked: each ancestor's file
    must be the one the leaf was trained on top of (same SHA-256), and every node must fit this base."""
    leaf_node = read_node(leaf)
    nodes = []
    for record in recorded_parents(leaf_node.checkpoint, leaf_node.path):
        path = Path(record["path"])
        if not path.is_file() and Path(record["name"]).is_file():  # moved along with the working folder
            path = Path(record["name"])
        if not path.is_file():
            raise UserError(f"{leaf}: its parent {record['name']} is not at {record['path']} any more: the leaf is "
                            "composed with the files of its ancestors; put it back")
        node = read_node(path)
        if node.sha256 != record["sha256"]:
            raise UserError(f"{leaf} was trained on top of {record['name']}, whose file has changed since (SHA-256 "
                            f"{node.sha256[:12]}..., recorded {record['sha256'][:12]}...): retrain the leaf on it, "
                            "or restore the parent it was trained on")
        nodes.append(node)
    nodes.append(leaf_node)
    for node in nodes:
        check_node(node, config, base_weights, in_tree=len(nodes) > 1)
    return nodes


_templates: Dict[str, LoRALLaMA] = {}  # (base config, LoRA config) -> a model on the meta device: its layout


def node_factors(node: Node, config: Config) -> Factors:
    """Per adapted layer name, the node's (A, B) in float32 as `LoRALinear.factors` gives them (scale folded into
    B, the fused q/k/v blocks placed), after the checks of loading the file into a LoRA model (names, ranks)."""
    lora = lora_config_from_checkpoint(node.checkpoint, node.path)
    key = repr((asdict(config), asdict(lora)))
    if key not in _templates:  # building one takes longer than reading a small node: kept per layout
        with torch.device("meta"):  # the layers' layout (which q/k/v blocks, which rank) without any memory
            _templates[key] = LoRALLaMA(config, lora)
    template = _templates[key]
    load_lora_state_dict(template, node.checkpoint, node.path)  # checks only: meta tensors hold no data
    tensors = node.checkpoint["state_dict"]
    factors = {}
    for name, layer in template.named_modules():
        if isinstance(layer, LoRALinear):
            meta = layer.lora_A, layer.lora_B
            layer.lora_A = nn.Parameter(tensors[f"{name}.lora_A"].float(), requires_grad=False)
            layer.lora_B = nn.Parameter(tensors[f"{name}.lora_B"].float(), requires_grad=False)
            try:
                factors[name] = tuple(t.detach() for t in layer.factors())
            finally:  # the shared template back on the meta device
                layer.lora_A, layer.lora_B = meta
    return factors


def compose(path_factors: Sequence[Factors]) -> Factors:
    """The nodes' updates summed, as one low-rank product: A stacked along the rank, B side by side."""
    composed = {}
    for name in dict.fromkeys(name for factors in path_factors for name in factors):
        pairs = [factors[name] for factors in path_factors if name in factors]
        composed[name] = (torch.cat([A for A, _ in pairs]), torch.cat([B for _, B in pairs], dim=1))
    return composed


def flatten_path(nodes: Sequence[Node], config: Config) -> Dict[str, Any]:
    """The path as one plain LoRA file (lit_llama/lora.py's format, no parents) of rank sum(r_i) and alpha equal
    to it (scale 1), targeting every layer and q/k/v block that any node targets: block j's A is the nodes' A_ij
    stacked, its B their s_i B_ij side by side (zeros for a node that does not adapt the block). Its update is
    exactly the sum of the nodes'; generate/lora.py merges it, scripts/export_peft.py exports it."""
    configs = [lora_config_from_checkpoint(node.checkpoint, node.path) for node in nodes]
    rank = sum(lora.r for lora in configs)
    targets = ("query", "key", "value", "projection", "mlp", "head")
    flat = LoRAConfig(r=rank, alpha=rank, dropout=0.0, **{t: any(getattr(c, t) for c in configs) for t in targets})
    with torch.device("meta"):
        templates = [dict(LoRALLaMA(config, lora).named_modules()) for lora in configs]
        flat_model = LoRALLaMA(config, flat)
    tensors = {}
    for name, layer in flat_model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        A_blocks, B_blocks = [], []
        for position, (size, adapted) in enumerate(layer.parts):
            if not adapted:
                continue
            A_parts, B_parts = [], []
            for node, lora, template in zip(nodes, configs, templates):
                A, B = node_block(node, template.get(name), name, position)
                A_parts.append(A if A is not None else torch.zeros(lora.r, layer.in_features))
                B_parts.append(B * lora.scaling if B is not None else torch.zeros(size, lora.r))
            A_blocks.append(torch.cat(A_parts))
            B_blocks.append(torch.cat(B_parts, dim=1))
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = torch.cat(A_blocks), torch.cat(B_blocks)
    leaf = nodes[-1].checkpoint
    flattened = {"lora_config": asdict(flat), "base_config": leaf["base_config"], "state_dict": tensors,
                 "prompt_style": leaf.get("prompt_style", DEFAULT_PROMPT_STYLE)}
    if "base_model" in leaf:
        flattened["base_model"] = leaf["base_model"]
    return flattened


def node_block(node: Node, layer: Optional[nn.Module], name: str, position: int) -> Tuple[Optional[torch.Tensor], ...]:
    """A node's (A, B) (float32, unscaled) of block `position` of layer `name`; (None, None) if not adapted."""
    if not isinstance(layer, LoRALinear) or not layer.parts[position][1]:
        return None, None
    index = [i for i, (_, adapted) in enumerate(layer.parts) if adapted].index(position)
    tensors = node.checkpoint["state_dict"]
    A = tensors[f"{name}.lora_A"].float().split(layer.r)[index]
    B = tensors[f"{name}.lora_B"].float().split(layer.adapted_sizes, dim=0)[index]
    return A, B


def load_leaf_model(paths: CheckpointPaths, leaf: Path, device: torch.device, dtype: torch.dtype,
                    merge: bool = True) -> LoRALLaMA:
    """`load_lora_model` for a leaf of a tree (or any LoRA file): the base plus its whole path, flattened."""
    nodes = tree_path(leaf, paths.config, paths.weights)
    if len(nodes) == 1:
        return load_lora_model(paths, leaf, device, dtype, merge)
    flat = flatten_path(nodes, paths.config)
    model = load_model(paths, device, dtype, LoRALLaMA, lora=lora_config_from_checkpoint(flat, leaf))
    load_lora_state_dict(model, flat, leaf)
    if merge:
        model.merge_lora()
    return model


@torch.no_grad()
def merge_into_base(model: nn.Module, factors: Factors) -> None:
    """W += B A for every layer named, computed in float32 and rounded once to W's dtype."""
    modules = dict(model.named_modules())
    for name, (A, B) in factors.items():
        weight = modules[name].weight
        weight.copy_((weight.float() + (B.to(weight.device) @ A.to(weight.device))).to(weight.dtype))


def parent_records(parents: Sequence[Path], config: Config, base_weights: Optional[Path],
                   out_dir: Path) -> List[Dict[str, str]]:
    """`--parent_lora` checked: root first, each parent trained on top of exactly the ones before it, none twice
    (a node cannot be its own ancestor: a cycle), none in --out_dir (the child's own files), all on this base.
    Returns the records the child's file stores."""
    nodes: List[Node] = []
    for path in parents:
        node = read_node(path)
        if Path(out_dir).resolve() in node.path.resolve().parents:
            raise UserError(f"--parent_lora {path} is in --out_dir {out_dir}, where this run writes its own LoRA "
                            "files: a node cannot be its own parent (a cycle); copy the parent elsewhere")
        earlier = [n for n in nodes if n.sha256 == node.sha256 or n.path.resolve() == node.path.resolve()]
        if earlier:
            raise UserError(f"--parent_lora {path} is given twice (as {earlier[0].path}): a cycle; a LoRA tree's path "
                            "names each ancestor once, root first")
        nodes.append(node)
    for i, node in enumerate(nodes):
        recorded = [r["sha256"] for r in recorded_parents(node.checkpoint, node.path)]
        later = [n for n in nodes[i + 1 :] if n.sha256 in recorded]
        if later:
            raise UserError(f"--parent_lora {later[0].path} comes after {node.path}, which was trained on top of it: "
                            "a cycle; give the ancestors root first")
        if recorded != [n.sha256 for n in nodes[:i]]:
            names = [r["name"] for r in recorded_parents(node.checkpoint, node.path)]
            raise UserError(f"--parent_lora {node.path} was trained on top of [{', '.join(names)}], not on top of the "
                            f"--parent_lora before it [{', '.join(str(n.path) for n in nodes[:i])}]: give its "
                            "ancestors first, root first, unchanged since it was trained")
        check_node(node, config, base_weights, in_tree=True)
        node_factors(node, config)  # shapes and names against this base
    return [{"name": str(n.path), "path": str(n.path.resolve()), "sha256": n.sha256} for n in nodes]


class TreeLoRAFinetune(LoRAFinetune):
    """finetune/lora.py with --parent_lora: a child LoRA trained on the base with its ancestors merged into the
    frozen weights (in float32, rounded once); its file records them (`PARENTS`)."""

    def __init__(self, lora: LoRAConfig, quantize: Optional[str], parents: Sequence[Path]) -> None:
        super().__init__(lora, quantize)
        self.parents = [Path(p) for p in parents]
        self.records: List[Dict[str, str]] = []

    def configure(self, config: Config, run: Any) -> Dict[str, Any]:
        settings = super().configure(config, run)
        if self.lora.dora:
            raise UserError("--lora_dora with --parent_lora: the nodes of a LoRA tree are plain LoRA (or rsLoRA), "
                            "whose updates add up exactly")
        weights = Path(run.checkpoint_dir) / WEIGHTS_NAME if run.checkpoint_dir is not None else None
        out_dir = Path(run.out_dir) if run.out_dir is not None else self.default_out_dir()
        self.records = parent_records(self.parents, config, weights if weights and weights.is_file() else None,
                                      out_dir)
        return {**settings, PARENTS: self.records}  # in run.json: a resumed run must have the same ancestors

    def load(self, fabric: Any, paths: CheckpointPaths, dtype: torch.dtype) -> LoRALLaMA:
        nodes = [read_node(p) for p in self.parents]
        if [n.sha256 for n in nodes] != [r["sha256"] for r in self.records]:
            raise UserError(f"--parent_lora: a parent file changed since the run was set up: {self.parents}")
        for node in nodes:
            check_node(node, paths.config, paths.weights, in_tree=True)
        model = load_model(paths, load_device(fabric, self.quantize), dtype, LoRALLaMA, lora=self.lora)
        merge_into_base(model, compose([node_factors(node, paths.config) for node in nodes]))
        mark_only_lora_as_trainable(model)
        if self.quantize:  # after merging: the NF4 weights hold the ancestors
            quantize_frozen_linears(model, fabric.device)
        fabric.print(f"Ancestors merged into the base: {', '.join(str(p) for p in self.parents)}")
        return model

    def saver(self, fabric: Any, model: nn.Module, paths: CheckpointPaths, data_dir: Path, out_dir: Path) -> Any:
        prompt_style, base_model = prompt_style_of_data(data_dir), base_fingerprint(paths.weights)

        def save_node(path: Path) -> None:
            trainable = full_state_dict(model, trainable_only=True)
            if fabric.global_rank == 0:
                checkpoint = lora_state_dict(unwrap(model), trainable, prompt_style, base_model)
                save_atomic({**checkpoint, PARENTS: self.records}, path)
                fabric.print(f"Saved LoRA weights (a node of a tree, {len(self.records)} ancestors) to {path}")

        return save_node
