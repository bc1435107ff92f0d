"""LoRA trees (lit_llama/lora_tree.py) in the adapter cache: switching between two leaves that share their
ancestors, against the same paths flattened into one adapter file each.

    python benchmarks/lora_tree.py                                   # CPU, the 4x512 LLaMA shape
    python benchmarks/lora_tree.py --device cuda --precision bf16-true

The tree: language (r 32) -> domain (r 16) -> two tasks (r 8 each), all on query and value, random A and B,
written as finetune/lora.py --parent_lora writes them; the flattened adapters are each task's whole path as one
LoRA file of rank 56 (what scripts/export_peft.py exports). One device slot (--max_device_adapters 1), so every
switch copies the leaf's factors to the device. Median over --switches switches, alternating the two leaves:
- from disk: the leaf's own node is not in host memory (taken out before each switch; the OS page cache is
  warm): the tree reads the task's file (r 8) and composes it with the ancestors held in host memory; the
  flattened adapter reads its whole file (r 56);
- from host: everything in host memory: the tree composes its three nodes (a concatenation) and copies;
- merged: --swap merged, from host: the leaf before unmerged (its rows copied back), the next merged.
Appends one row to benchmarks/RESULTS.md.
"""

import os
import platform
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows, sync_time  # noqa: E402
from benchmarks.lora_swap import build  # noqa: E402
from benchmarks.multi_lora import SMALL  # noqa: E402
from lit_llama.cli import UserError, run_cli  # noqa: E402
from lit_llama.distributed import precision_dtype  # noqa: E402
from lit_llama.lora import LoRAConfig, LoRALLaMA, lora_state_dict  # noqa: E402
from lit_llama.lora_tree import PARENTS, file_sha256, flatten_path, tree_path  # noqa: E402
from lit_llama.model import Config, LLaMA  # noqa: E402

HEADER = """
## LoRA trees: switching between two leaves that share ancestors vs flattened adapters

`python benchmarks/lora_tree.py`: language (r 32) -> domain (r 16) -> two tasks (r 8), query and value
(lit_llama/lora_tree.py); flattened: each task's path as one LoRA file of rank 56. One device slot: a switch
copies the leaf to the device. From disk: the leaf's own node read from its file, its ancestors in host memory
(the flattened adapter: its whole file; warm OS page cache). From host: everything in host memory. Merged:
--swap merged, from host (unmerge the one leaf, merge the other). Median of N switches.

| date | machine | model | precision | N | tree: disk -> device | flattened: disk -> device | tree: host -> device | flattened: host -> device | tree: merged switch | flattened: merged switch |
|---|---|---|---|---|---|---|---|---|---|---|
"""

RANKS = {"language": 32, "domain": 16, "task_a": 8, "task_b": 8}


def main(
    model_size: Optional[str] = None,
    switches: int = 100,
    device: str = "cpu",
    precision: str = "32-true",
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> None:
    """Measures the switch between two leaves of a LoRA tree against flattened adapters.

    Args:
        model_size: A named size from lit_llama/model.py (e.g. 7B); default: a 4-layer, 512-wide LLaMA.
        switches: Switches timed in each measurement (at least 2).
        device: cpu or cuda.
        precision: 32-true, 16-true or bf16-true: the dtype of the model.
        results_file: Markdown file to add the row to ("" for none).
    """
    if switches < 2:
        raise UserError("--switches must be at least 2")
    dev, dtype = torch.device(device), precision_dtype(precision)
    config = Config.from_name(model_size) if model_size else Config(**SMALL)
    shape = model_size or "4x512 (32k vocab)"
    machine = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else f"CPU {platform.machine()}, {os.cpu_count()} cores")
    torch.manual_seed(0)
    with torch.device("cpu"):
        base = LLaMA(config).state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        tree = write_tree(config, Path(tmp))
        flat = {}
        for leaf in ("task_a", "task_b"):
            flat[leaf] = Path(tmp) / f"flat_{leaf}.pth"
            torch.save(flatten_path(tree_path(tree[leaf], config), config), flat[leaf])
        files = {"tree": {leaf: tree[leaf] for leaf in ("task_a", "task_b")}, "flattened": flat}
        seconds: Dict[str, float] = {}
        for kind, leaves in files.items():
            for mode in ("disk", "host", "merged"):
                seconds[f"{kind} {mode}"] = switch_seconds(config, base, leaves, dev, dtype, mode, switches)
                print(f"{kind:9} {mode:6}: {seconds[f'{kind} {mode}'] * 1e3:.2f} ms per switch")

    ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731
    add_rows(results_file, HEADER, [
        f"| {date.today()} | {machine} | {shape} | {precision} | {switches} | {ms(seconds['tree disk'])} | "
        f"{ms(seconds['flattened disk'])} | {ms(seconds['tree host'])} | {ms(seconds['flattened host'])} | "
        f"{ms(seconds['tree merged'])} | {ms(seconds['flattened merged'])} |"])
    if results_file:
        print(f"row added to {results_file}")


def write_tree(config: Config, folder: Path) -> Dict[str, Path]:
    """The four nodes as finetune/lora.py --parent_lora writes them: each records its ancestors' paths and hashes."""
    parents_of = {"language": [], "domain": ["language"], "task_a": ["language", "domain"],
                  "task_b": ["language", "domain"]}
    files: Dict[str, Path] = {}
    for i, (name, r) in enumerate(RANKS.items()):
        with torch.device("meta"):
            template = LoRALLaMA(config, LoRAConfig(r=r, alpha=2 * r, dropout=0.0))
        g = torch.Generator().manual_seed(200 + i)
        tensors = {k: torch.randn(t.shape, generator=g) * 0.02 for k, t in template.state_dict().items()
                   if "lora_" in k}
        checkpoint = lora_state_dict(template, tensors)
        checkpoint[PARENTS] = [{"name": p, "path": str(files[p].resolve()), "sha256": file_sha256(files[p])}
                               for p in parents_of[name]]
        files[name] = folder / f"{name}.pth"
        torch.save(checkpoint, files[name])
    return files


def switch_seconds(config: Config, base: Dict[str, torch.Tensor], leaves: Dict[str, Path], device: torch.device,
                   dtype: torch.dtype, mode: str, switches: int) -> float:
    """Median seconds of `select([leaf])`, alternating the two leaves, with one device slot."""
    model = build(config, base, device, dtype, swap="merged" if mode == "merged" else "unmerged",
                  max_device_adapters=1)
    for name, path in leaves.items():
        model.add_adapter(name, path)
    times: List[float] = []
    order = list(leaves) * (switches // 2 + 2)
    for i, name in enumerate(order[: switches + 2]):
        if mode == "disk":  # the leaf's own node out of host memory: read from its file again
            model.host.pop(model.leaf_nodes[name][-1], None)
        t0 = sync_time(device)
        model.select([name])
        if i >= 2:  # the first two warm up
            times.append(sync_time(device) - t0)
    return statistics.median(times)


if __name__ == "__main__":
    run_cli(main)
