"""LoRA vs LLaMA-Adapter (v1, v2) vs full finetuning on the same base model, data, seed and tokens.

    python scripts/compare.py --checkpoint_dir checkpoints/lit-llama/7B --data_dir data/alpaca \
        --max_iters 200 --out_dir out/compare

Trains each method with its own finetune script (each method keeps its own learning rate and weight
decay; everything else - batches, iterations, warmup, block size, precision, seed - is shared, so every
method sees exactly the same examples), or reads runs that already finished (in --out_dir/<method>, or
--run_dirs). Then writes to --out_dir:
  compare.md    one row per method: trainable parameters, checkpoint size, peak memory, time, tokens/s,
                final train and validation loss and perplexity, and each method's greedy responses;
  compare.png   validation loss against tokens seen;
  compare.json  the same numbers, for scripts.
"""

import csv
import gc
import json
import math
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere, installed or not

import torch

from lit_llama.adapter import load_adapter_model
from lit_llama.generation import generate_response
from lit_llama.prompts import prompt_style_of_data
from lit_llama.lora import load_lora_model
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import (
    UserError,
    default_device,
    load_model,
    load_state_dict,
    precision_dtype,
    resolve_checkpoint,
    run_cli,
)

# method -> its finetune script, extra flags, and the name of its final checkpoint
METHODS: Dict[str, Dict[str, Any]] = {
    "lora": dict(script="finetune/lora.py", args=[], final="lit-llama-lora-finetuned.pth"),
    "adapter": dict(script="finetune/adapter.py", args=["--adapter_version", "1"],
                    final="lit-llama-adapter-finetuned.pth"),
    "adapter_v2": dict(script="finetune/adapter.py", args=["--adapter_version", "2"],
                       final="lit-llama-adapter-finetuned.pth"),
    "full": dict(script="finetune/full.py", args=[], final="lit-llama-full-finetuned.pth"),
}
PROMPTS = ["Please explain how weight decay works", "What food do llamas eat?", "Name three primary colors."]


def main(
    checkpoint_dir: Path = Path("checkpoints/lit-llama/7B"),
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/compare"),
    methods: List[str] = list(METHODS),
    max_iters: int = 200,
    batch_size: int = 16,
    micro_batch_size: int = 4,
    warmup_iters: Optional[int] = None,
    eval_interval: Optional[int] = None,
    eval_iters: int = 20,
    block_size: int = 512,
    precision: Optional[str] = None,
    devices: int = 1,
    seed: int = 1337,
    method_args: Optional[Dict[str, str]] = None,
    run_dirs: Optional[Dict[str, Path]] = None,
    retrain: bool = False,
    prompts: List[str] = PROMPTS,
    max_new_tokens: int = 100,
) -> None:
    """Trains (or reads) one run per method and writes the comparison.

    Args:
        checkpoint_dir: The base model every method starts from.
        data_dir: Prepared data (scripts/prepare_alpaca.py) every method trains on.
        out_dir: Where the runs (<out_dir>/<method>) and compare.md / compare.png / compare.json go.
        methods: Which of lora, adapter, adapter_v2, full to compare.
        max_iters: Micro-batch iterations for every method (the same tokens for all).
        batch_size: Examples per optimizer step (smaller than the article's 128 so that a short comparison
            still takes enough optimizer steps to learn).
        micro_batch_size: Examples per forward/backward pass.
        warmup_iters: Optimizer steps of warmup for every method (default: a tenth of the steps).
        eval_interval: Optimizer steps between validations (default: ten validations per run).
        eval_iters: Validation micro-batches per validation.
        block_size: Longest training sequence.
        precision: Passed to every finetune script (default: theirs: bf16-true on a GPU, 32-true on CPU).
        devices: Passed to every finetune script.
        seed: Random seed for every method.
        method_args: Extra flags per method, e.g. '{"adapter": "--adapter_start_layer 1"}'.
        run_dirs: Finished runs to read instead of training, e.g. '{"lora": "out/lora/alpaca"}'.
        retrain: Train again even where <out_dir>/<method> already holds a finished run.
        prompts: Instructions every method answers greedily for the table.
        max_new_tokens: The most tokens per response.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    steps = max_iters * devices * micro_batch_size // batch_size
    if steps < 1:
        raise UserError(f"--max_iters {max_iters} makes no optimizer step of --batch_size {batch_size}")
    shared_flags = [
        "--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir, "--max_iters", max_iters,
        "--batch_size", batch_size, "--micro_batch_size", micro_batch_size,
        "--warmup_iters", warmup_iters if warmup_iters is not None else max(1, steps // 10),
        "--eval_interval", eval_interval or max(1, steps // 10), "--eval_iters", eval_iters,
        "--save_interval", 0, "--block_size", block_size, "--devices", devices, "--seed", seed,
    ]
    if precision:
        shared_flags += ["--precision", precision]
    run_dirs = dict(run_dirs or {})
    method_args = method_args or {}

    runs = {}
    for method in methods:
        run_dir = Path(run_dirs.get(method, out_dir / method))
        final = run_dir / METHODS[method]["final"]
        finished = (run_dir / "summary.json").is_file() and final.is_file()
        if method in run_dirs and not finished:
            raise UserError(f"--run_dirs: {run_dir} holds no finished {method} run (summary.json and {final.name})")
        if not finished or (retrain and method not in run_dirs):
            train(method, run_dir, shared_flags + shlex.split(method_args.get(method, "")), fresh=retrain)
        else:
            print(f"{method}: reading the finished run in {run_dir}")
        runs[method] = read_run(run_dir, final)

    print("Generating the greedy responses ...")
    for method, run in runs.items():
        run["responses"] = respond(method, checkpoint_dir, run["final"], prompts, precision, max_new_tokens,
                                   prompt_style_of_data(data_dir))

    out_dir.mkdir(parents=True, exist_ok=True)
    write_markdown(runs, prompts, out_dir / "compare.md", shared_flags)
    plot(runs, out_dir / "compare.png")
    (out_dir / "compare.json").write_text(json.dumps(runs, indent=2, default=str) + "\n")
    print((out_dir / "compare.md").read_text())
    print(f"Wrote {out_dir / 'compare.md'}, {out_dir / 'compare.png'} and {out_dir / 'compare.json'}")


def train(method: str, run_dir: Path, flags: List[Any], fresh: bool) -> None:
    """Runs the method's finetune script as a user would; its progress bar shows through."""
    if fresh and run_dir.exists():
        for old in list(run_dir.glob("*.pth")) + [run_dir / "summary.json"]:
            old.unlink(missing_ok=True)  # --retrain: the finetune scripts refuse a folder with checkpoints
    spec = METHODS[method]
    cmd = [sys.executable, str(REPO / spec["script"]), *map(str, flags), *spec["args"], "--out_dir", str(run_dir)]
    print(f"\n=== {method}: {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise UserError(f"{method}: {spec['script']} failed (its error is printed above)")


def read_run(run_dir: Path, final: Path) -> Dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir)
    train_losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    last = train_losses[-max(1, len(train_losses) // 10) :]  # the last tenth: one micro-batch is noisy
    checkpoint = load_state_dict(final)
    return {
        "run_dir": str(run_dir),
        "final": str(final),
        # the final file holds exactly the trained tensors (LoRA, adapter, or every weight for full)
        "trainable_params": count_tensor_elements(checkpoint),
        "checkpoint_mb": final.stat().st_size / 1e6,
        "peak_memory_gb": max([float(r["peak_memory"]) for r in rows if r.get("peak_memory")], default=float("nan")),
        "train_seconds": summary["train_seconds"],
        "tokens": summary["tokens"],
        "tokens_per_sec": summary["tokens_per_sec"],
        "train_loss": sum(last) / len(last) if last else float("nan"),
        "val_loss": summary["val_loss"],
        "val_curve": [(int(r["tokens"]), float(r["val_loss"])) for r in rows if r.get("val_loss")],
    }


def read_metrics(run_dir: Path) -> List[Dict[str, str]]:
    rows: List[Dict[str, str]] = []
    for metrics in sorted(run_dir.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(metrics) as f:
            rows.extend(csv.DictReader(f))  # a resumed run continues in the next version folder
    return rows


def count_tensor_elements(checkpoint: Any) -> int:
    if isinstance(checkpoint, torch.Tensor):
        return checkpoint.numel()
    if isinstance(checkpoint, dict):
        return sum(count_tensor_elements(v) for v in checkpoint.values())
    return 0


def respond(
    method: str,
    checkpoint_dir: Path,
    final: str,
    prompts: List[str],
    precision: Optional[str],
    max_new_tokens: int,
    prompt_style: str = "alpaca",
) -> List[str]:
    """Greedy responses of one finetuned model, prompted in the style its data was prepared with."""
    device, dtype = default_device(), precision_dtype(precision)
    paths = resolve_checkpoint(checkpoint_dir)
    if method == "lora":
        model = load_lora_model(paths, Path(final), device, dtype)
    elif method.startswith("adapter"):
        model = load_adapter_model(paths, Path(final), device, dtype)
    else:
        model = load_model(resolve_checkpoint(checkpoint_path=Path(final)), device, dtype)
    model.eval()
    tokenizer = Tokenizer(paths.tokenizer)
    torch.manual_seed(0)
    responses = [generate_response(model, tokenizer, p, "", device, max_new_tokens, prompt_style=prompt_style)
                 for p in prompts]
    del model  # one model in memory at a time
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return responses


def write_markdown(runs: Dict[str, Dict[str, Any]], prompts: List[str], path: Path, flags: List[Any]) -> None:
    machine = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    lines = [
        "# Finetuning methods compared",
        "",
        f"Machine: {machine}. Shared settings: `{' '.join(map(str, flags))}`.",
        "",
        "| method | trainable params | checkpoint | peak memory | train time | tokens/s | train loss (ppl) "
        "| val loss (ppl) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, r in runs.items():
        lines.append(
            f"| {method} | {r['trainable_params']:,} | {size(r['checkpoint_mb'])} | {r['peak_memory_gb']:.2f} GB "
            f"| {r['train_seconds']:.1f} s | {r['tokens_per_sec']:.0f} | {r['train_loss']:.3f} "
            f"({perplexity(r['train_loss'])}) | {r['val_loss']:.3f} ({perplexity(r['val_loss'])}) |"
        )
    lines += ["", "Peak memory is GPU memory allocated on a GPU, the process's peak RSS on a CPU.", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"### {prompt}", ""]
        for method, r in runs.items():
            response = r["responses"][i].replace("\n", " ").replace("|", "\\|")
            lines.append(f"- **{method}**: {response}")
        lines.append("")
    path.write_text("\n".join(lines))


def size(megabytes: float) -> str:
    return f"{megabytes:.1f} MB" if megabytes >= 1 else f"{megabytes * 1000:.0f} kB"


def perplexity(loss: float) -> str:
    return f"{math.exp(loss):.1f}" if loss < 20 else "inf"


def plot(runs: Dict[str, Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, r in runs.items():
        tokens, losses = zip(*r["val_curve"])
        ax.plot(tokens, losses, marker="o", markersize=3, label=method)
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss while finetuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_cli(main)
