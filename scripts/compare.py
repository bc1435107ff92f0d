"""LoRA vs LLaMA-Adapter (v1, v2) vs full finetuning on the same base model, data, seed and tokens.

    python scripts/compare.py --checkpoint_dir checkpoints/lit-llama/7B --data_dir data/alpaca \
        --max_iters 200 --out_dir out/compare

Trains each method with its own finetune script (each method keeps its own learning rate and weight
decay; everything else - batches, iterations, warmup, block size, precision, seed - is shared, so every
method sees exactly the same examples), or reads runs that already finished (in --out_dir/<method>, or
--run_dirs). Then writes to --out_dir:
  compare.md    one row per method: trainable parameters, checkpoint size, peak memory, time, time per
                micro-batch iteration, tokens/s, validation loss before and after, final train loss and perplexity,
                and each method's greedy responses (with the base model's, --base_answers);
  compare.png   validation loss against tokens seen;
  compare.json  the same numbers, for scripts.
"""

import gc
import json
import math
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere, installed or not

import torch

from lit_llama.adapter import load_adapter_model
from lit_llama.checkpoint import load_model, load_state_dict, resolve_checkpoint
from lit_llama.cli import UserError, check_at_least, check_out_dir, deprecated_flag, run_cli
from lit_llama.disk import write_text_atomic
from lit_llama.distributed import default_device, precision_dtype
from lit_llama.generation import generate_response
from lit_llama.lora import load_lora_model
from lit_llama.prompts import prompt_style_of_data
from lit_llama.run_dir import METRICS_NAME
from lit_llama.runs import (
    answers_table,
    count_tensor_elements,
    last_tenth_mean,
    read_json,
    read_metrics,
    read_prompts,
)
from lit_llama.tokenizer import Tokenizer

# method -> its finetune script, extra flags, and the name of its final checkpoint
METHODS: Dict[str, Dict[str, Any]] = {
    "lora": dict(script="finetune/lora.py", args=[], final="lit-llama-lora-finetuned.pth"),
    "adapter": dict(script="finetune/adapter.py", args=["--adapter_version", "1"],
                    final="lit-llama-adapter-finetuned.pth"),
    "adapter_v2": dict(script="finetune/adapter.py", args=["--adapter_version", "2"],
                       final="lit-llama-adapter-finetuned.pth"),
    "full": dict(script="finetune/full.py", args=[], final="lit-llama-full-finetuned.pth"),
}
SETTINGS_NAME = "compare_settings.json"  # beside each run compare.py trains: what it was trained with
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
    max_seq_length: Optional[int] = None,
    precision: Optional[str] = None,
    devices: int = 1,
    seed: int = 1337,
    method_args: Optional[Dict[str, str]] = None,
    run_dirs: Optional[Dict[str, Path]] = None,
    retrain: bool = False,
    prompts: Union[List[str], Path] = PROMPTS,
    max_new_tokens: int = 100,
    block_size: Optional[int] = None,
    heldout_prompts: int = 0,
    base_answers: bool = False,
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
        max_seq_length: Longest training sequence in tokens; longer examples are cut (default: the finetune
            scripts', 512 or the model's context if shorter).
        precision: Passed to every finetune script (default: theirs: bf16-true on a GPU, 32-true on CPU).
        devices: Passed to every finetune script.
        seed: Random seed for every method.
        method_args: Extra flags per method, e.g. '{"adapter": "--adapter_start_layer 1"}'.
        run_dirs: Finished runs to read instead of training, e.g. '{"lora": "out/lora/alpaca"}'.
        retrain: Train again even where <out_dir>/<method> already holds a finished run.
        prompts: Instructions every method answers greedily for the report's table of answers: a list, or a
            text file of one instruction a line (the comparison page of serve.py saves its prompts so).
        max_new_tokens: The most tokens per response.
        block_size: Deprecated name of --max_seq_length.
        heldout_prompts: Answer the first N records of the data's held-out split (test.pt: instruction and
            input; records no method trained on) instead of --prompts.
        base_answers: Answer the prompts with the base model too, in a column before the methods'.
    """
    check_at_least("heldout_prompts", heldout_prompts, 0)
    if heldout_prompts:
        requests = heldout_requests(Path(data_dir), heldout_prompts)
        prompts = [instruction + (f"\n\n{text}" if text else "") for instruction, text in requests]
    elif not isinstance(prompts, list):
        prompts = read_prompts(Path(prompts))
    if not prompts or not all(p.strip() for p in prompts):
        raise UserError("--prompts: every prompt must have some text")
    if not methods:
        raise UserError(f"--methods is empty: name at least one of {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    check_matplotlib()  # before hours of training, not at the plot after them
    extra_flags = parse_method_args(method_args or {})
    max_seq_length = deprecated_flag("max_seq_length", max_seq_length, "block_size", block_size)
    for flag, value, low in [("max_iters", max_iters, 1), ("batch_size", batch_size, 1),
                             ("micro_batch_size", micro_batch_size, 1), ("eval_iters", eval_iters, 1),
                             ("devices", devices, 1),
                             ("max_new_tokens", max_new_tokens, 1)]:
        check_at_least(flag, value, low)
    check_at_least("max_seq_length", max_seq_length, 2, optional=True)
    check_at_least("warmup_iters", warmup_iters, 0, optional=True)
    check_at_least("eval_interval", eval_interval, 1, optional=True)
    check_out_dir(out_dir)
    precision_dtype(precision)  # checked here, not by each finetune script in turn
    steps = max_iters * devices * micro_batch_size // batch_size
    if steps < 1:
        raise UserError(f"--max_iters {max_iters} makes no optimizer step of --batch_size {batch_size}")
    shared_flags = [
        "--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir, "--max_iters", max_iters,
        "--batch_size", batch_size, "--micro_batch_size", micro_batch_size,
        "--warmup_iters", warmup_iters if warmup_iters is not None else max(1, steps // 10),
        "--eval_interval", eval_interval or max(1, steps // 10), "--eval_iters", eval_iters,
        "--save_interval", 0, "--devices", devices, "--seed", seed,
    ]
    if max_seq_length is not None:
        shared_flags += ["--max_seq_length", max_seq_length]
    if precision:
        shared_flags += ["--precision", precision]
    run_dirs = dict(run_dirs or {})

    # first every finished run to reuse is checked and read, then the others train: a broken one is found
    # before any training, not after hours of it
    runs, to_train = {}, []
    for method in methods:
        run_dir = Path(run_dirs.get(method, out_dir / method))
        final = run_dir / METHODS[method]["final"]
        finished = all((run_dir / name).is_file() for name in ("summary.json", METRICS_NAME, final.name))
        if method in run_dirs and not finished:
            raise UserError(
                f"--run_dirs: {run_dir} holds no finished {method} run (summary.json, {METRICS_NAME} and {final.name})"
            )
        flags = shared_flags + extra_flags.get(method, []) + METHODS[method]["args"]
        wanted = run_settings(method, checkpoint_dir, data_dir, flags)
        if not finished or (retrain and method not in run_dirs):
            to_train.append((method, run_dir, final, flags, wanted))
            continue
        if method in run_dirs:
            print(f"{method}: reading the finished run in {run_dir} (--run_dirs: trained elsewhere)")
        else:  # a run compare.py trained before: reused only if it was trained exactly as asked now
            check_same_settings(method, run_dir, wanted)
            print(f"{method}: reading the finished run in {run_dir}")
        runs[method] = read_run(run_dir, final)
    for method, run_dir, final, flags, wanted in to_train:
        train(method, run_dir, flags, fresh=retrain)
        (run_dir / SETTINGS_NAME).write_text(json.dumps(wanted, indent=2) + "\n")
        runs[method] = read_run(run_dir, final)
    runs = {method: runs[method] for method in methods}  # in the order asked

    print("Generating the greedy responses ...")
    if not heldout_prompts:
        requests = [(prompt, "") for prompt in prompts]
    answers = {}
    if base_answers:
        answers["base"] = respond("base", checkpoint_dir, None, requests, precision, max_new_tokens,
                                  prompt_style_of_data(data_dir))
    for method, run in runs.items():
        run["responses"] = respond(method, checkpoint_dir, run["final"], requests, precision, max_new_tokens,
                                   prompt_style_of_data(data_dir))
        answers[method] = run["responses"]

    out_dir.mkdir(parents=True, exist_ok=True)
    write_markdown(runs, prompts, answers, out_dir / "compare.md", shared_flags)
    plot(runs, out_dir / "compare.png")
    write_text_atomic(json.dumps(runs, indent=2, default=str) + "\n", out_dir / "compare.json")
    print((out_dir / "compare.md").read_text())
    print(f"Wrote {out_dir / 'compare.md'}, {out_dir / 'compare.png'} and {out_dir / 'compare.json'}")


def heldout_requests(data_dir: Path, n: int) -> List[Tuple[str, str]]:
    """(instruction, input) of the first `n` records of the held-out split prepare_*.py wrote."""
    test_file = data_dir / "test.pt"
    if not test_file.is_file():
        raise UserError(f"--heldout_prompts: {test_file} does not exist (prepare the data first)")
    records = torch.load(test_file, weights_only=True)
    if len(records) < n or not all(isinstance(r, dict) and "instruction" in r for r in records[:n]):
        raise UserError(f"--heldout_prompts {n}: {test_file} holds {len(records)} records, not {n} with their "
                        "instruction text (prepare the data again with this version)")
    return [(r["instruction"], r.get("input") or "") for r in records[:n]]


def check_matplotlib() -> None:
    """compare.png needs matplotlib, an optional dependency."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("scripts/compare.py draws compare.png with matplotlib, which is not installed: "
                        "pip install matplotlib") from None


def parse_method_args(method_args: Dict[str, str]) -> Dict[str, List[str]]:
    """--method_args' extra flags per method, split as a shell would split them."""
    parsed = {}
    for method, text in method_args.items():
        if method not in METHODS:
            raise UserError(f"--method_args: unknown method {method!r}; choose from {', '.join(METHODS)}")
        try:
            parsed[method] = shlex.split(text)
        except ValueError as e:  # an unclosed quote
            raise UserError(f"--method_args: the flags of {method} ({text!r}) cannot be split: {e}") from None
    return parsed


def run_settings(method: str, checkpoint_dir: Path, data_dir: Path, flags: List[Any]) -> Dict[str, Any]:
    """What a run was trained from and with: the base checkpoint and the data (by path, size and time of their
    files, and the prepare settings) and every flag of the finetune script."""
    paths = resolve_checkpoint(checkpoint_dir)

    def identity(path: Path) -> str:
        stat = path.stat()
        return f"{path.resolve()} ({stat.st_size} bytes, modified {stat.st_mtime_ns})"

    data_files = [Path(data_dir) / name for name in ("train.pt", "test.pt", "prepare_config.json")]
    return {
        "method": method,
        "checkpoint": identity(paths.weights),
        "data": [identity(f) for f in data_files if f.is_file()],
        "flags": [str(flag) for flag in flags],
    }


def check_same_settings(method: str, run_dir: Path, wanted: Dict[str, Any]) -> None:
    """A finished run in --out_dir is reused only when it was trained from the same checkpoint and data with
    the same flags; otherwise one line says what differs."""
    settings_file = run_dir / SETTINGS_NAME
    if not settings_file.is_file():
        raise UserError(f"{run_dir} holds a finished {method} run whose settings were not recorded: pass "
                        "--retrain true to train it again with these settings, or choose another --out_dir")
    recorded = read_json(settings_file, "remove it, or pass --retrain true to train that run again")
    differences = []
    if recorded.get("checkpoint") != wanted["checkpoint"]:
        differences.append(f"base checkpoint {recorded.get('checkpoint')}")
    if recorded.get("data") != wanted["data"]:
        differences.append("other data (--data_dir or its files changed)")
    old_flags, new_flags = flag_values(recorded.get("flags", [])), flag_values(wanted["flags"])
    for flag in sorted(set(old_flags) | set(new_flags)):
        if old_flags.get(flag) != new_flags.get(flag):
            differences.append(f"{flag} {old_flags.get(flag, '(not given)')} (now {new_flags.get(flag, '(not given)')})")
    if differences:
        raise UserError(f"{run_dir} holds a {method} run trained with {'; '.join(differences[:3])}: pass "
                        "--retrain true to train it again with the settings asked now, or choose another --out_dir")


def flag_values(flags: List[str]) -> Dict[str, str]:
    """["--a", "1", "--b", "x"] -> {"--a": "1", "--b": "x"} (a flag given twice: the last value counts)."""
    values, current = {}, None
    for item in flags:
        if item.startswith("--"):
            current = item
            values[current] = ""
        elif current is not None:
            values[current] = f"{values[current]} {item}".strip()
    return values


def train(method: str, run_dir: Path, flags: List[Any], fresh: bool) -> None:
    """Runs the method's finetune script as a user would; its progress bar shows through."""
    if fresh and run_dir.exists():
        for old in list(run_dir.glob("*.pth")) + [run_dir / "summary.json", run_dir / SETTINGS_NAME]:
            # --retrain: the finetune scripts refuse a folder with checkpoints (a sharded one is a folder)
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    spec = METHODS[method]
    cmd = [sys.executable, str(REPO / spec["script"]), *map(str, flags), "--out_dir", str(run_dir)]
    print(f"\n=== {method}: {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd).returncode != 0:  # in the caller's folder: relative paths mean what they said
        raise UserError(f"{method}: {spec['script']} failed (its error is printed above)")


SUMMARY_NUMBERS = ("train_seconds", "tokens", "tokens_per_sec", "val_loss")  # what the table takes from summary.json


def read_run(run_dir: Path, final: Path) -> Dict[str, Any]:
    retrain = "pass --retrain true to train that run again (or give another folder in --run_dirs)"
    summary = read_json(run_dir / "summary.json", retrain)
    for key in SUMMARY_NUMBERS:
        if isinstance(summary.get(key), bool) or not isinstance(summary.get(key), (int, float)):
            raise UserError(f"{run_dir / 'summary.json'}: {key!r} is {summary.get(key)!r}, expected a number: "
                            f"{retrain}")
    rows = read_metrics(run_dir, retrain)
    checkpoint = load_state_dict(final)
    settings_file = run_dir / SETTINGS_NAME
    return {
        "run_dir": str(run_dir),
        "settings": read_json(settings_file, retrain) if settings_file.is_file() else None,
        "final": str(final),
        # the final file holds exactly the trained tensors (LoRA, adapter, or every weight for full)
        "trainable_params": count_tensor_elements(checkpoint),
        "checkpoint_mb": final.stat().st_size / 1e6,
        "peak_memory_gb": max([float(r["peak_memory"]) for r in rows if r.get("peak_memory")], default=float("nan")),
        "train_seconds": summary["train_seconds"],
        # per micro-batch iteration (forward and backward; validation and saving are not in the time)
        "seconds_per_iter": summary["train_seconds"] / summary["iters"] if summary.get("iters") else float("nan"),
        "tokens": summary["tokens"],
        "tokens_per_sec": summary["tokens_per_sec"],
        "train_loss": last_tenth_mean([float(r["train_loss"]) for r in rows if r.get("train_loss")]),
        "val_loss": summary["val_loss"],
        "val_curve": [(int(float(r.get("tokens") or 0)), float(r["val_loss"])) for r in rows if r.get("val_loss")],
    }


def respond(
    method: str,
    checkpoint_dir: Path,
    final: Optional[str],
    requests: List[Tuple[str, str]],
    precision: Optional[str],
    max_new_tokens: int,
    prompt_style: str = "alpaca",
) -> List[str]:
    """Greedy responses to (instruction, input) pairs of one finetuned model (method "base": the base model),
    prompted in the style its data was prepared with."""
    device, dtype = default_device(), precision_dtype(precision)
    paths = resolve_checkpoint(checkpoint_dir)
    if method == "lora":
        model = load_lora_model(paths, Path(final), device, dtype)
    elif method.startswith("adapter"):
        model = load_adapter_model(paths, Path(final), device, dtype)
    elif method == "base":
        model = load_model(paths, device, dtype)
    else:
        model = load_model(resolve_checkpoint(checkpoint_path=Path(final)), device, dtype)
    model.eval()
    tokenizer = Tokenizer(paths.tokenizer)
    torch.manual_seed(0)
    responses = [generate_response(model, tokenizer, instruction, text, device, max_new_tokens,
                                   prompt_style=prompt_style) for instruction, text in requests]
    del model  # one model in memory at a time
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return responses


def write_markdown(runs: Dict[str, Dict[str, Any]], prompts: List[str], answers: Dict[str, List[str]], path: Path,
                   flags: List[Any]) -> None:
    machine = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    lines = [
        "# Finetuning methods compared",
        "",
        f"Machine: {machine}. Settings asked for: `{' '.join(map(str, flags))}`.",
        "",
        "| method | trainable params | checkpoint | peak memory | train time | per iteration | tokens/s "
        "| train loss (ppl) | val loss before | val loss after (ppl) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, r in runs.items():
        # the finetune scripts validate once before the first step (the base model's loss, at 0 tokens)
        before = next((loss for tokens, loss in r["val_curve"] if tokens == 0), None)
        lines.append(
            f"| {method} | {r['trainable_params']:,} | {size(r['checkpoint_mb'])} | {r['peak_memory_gb']:.2f} GB "
            f"| {r['train_seconds']:.1f} s | {r.get('seconds_per_iter', float('nan')):.1f} s "
            f"| {r['tokens_per_sec']:.0f} | {r['train_loss']:.3f} ({perplexity(r['train_loss'])}) "
            f"| {'-' if before is None else f'{before:.3f}'} | {r['val_loss']:.3f} ({perplexity(r['val_loss'])}) |"
        )
    lines += ["", "Peak memory is GPU memory allocated on a GPU, the process's peak RSS on a CPU.", "",
              "Each row was trained with:", ""]
    for method, r in runs.items():
        settings = r.get("settings")
        trained_with = " ".join(settings["flags"]) if settings else "(trained elsewhere: settings not recorded)"
        lines.append(f"- **{method}** ({r['run_dir']}): `{trained_with}`")
    lines += ["", "## Answers", "", "Greedy, each in the prompt style of the data.", "",
              *answers_table(prompts, answers), ""]
    write_text_atomic("\n".join(lines), path)


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
        if not r["val_curve"]:  # a metrics.csv without validation rows: nothing to draw
            continue
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
