"""Real tasks trained together in one run (finetune/multi_lora.py) against each trained alone (finetune/lora.py)
on the same rows in the same order: each task's held-out loss, and the wall time of each arm.

    python benchmarks/multi_task_heldout.py --checkpoint_dir checkpoints/lit-llama/SmolLM2-135M-Instruct \
        --task math=data/tasks/math --task code=data/tasks/code --task roleplay=data/tasks/roleplay \
        --task tools=data/tasks/tools

Each DATA_DIR is a task prepared with the checkpoint's tokenizer (scripts/prepare_alpaca.py). Together: one run,
micro-batches of T x --rows_per_task rows, each row through its task's LoRA. Alone: finetune/lora.py per task with
micro-batches of --rows_per_task rows and the same seed: the rows each task trains on in the same order (see
finetune/multi_lora.py --task). Both arms run as the scripts (a process each), one after the other, with the
same flags otherwise. The held-out loss: the mean loss per scored token over each task's first --heldout
test examples, for the base model, the task's LoRA trained together and trained alone (float32, batches of 8).
Adds the rows to benchmarks/RESULTS.md.
"""

import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows  # noqa: E402
from lit_llama.checkpoint import load_model, resolve_checkpoint  # noqa: E402
from lit_llama.cli import UserError, normalize_repeated_flag, run_cli  # noqa: E402
from lit_llama.lora import load_lora_model  # noqa: E402
from lit_llama.data import IGNORE_INDEX, load_prepared  # noqa: E402
from lit_llama.training import compute_loss, pad_batch  # noqa: E402

FINAL = "lit-llama-lora-finetuned.pth"
RESULTS_HEADER = """
## Several LoRAs trained together vs alone: held-out loss on real tasks

`python benchmarks/multi_task_heldout.py`: T real tasks, one LoRA each (r 8, alpha 16, query and value, no
dropout), trained together in one run (finetune/multi_lora.py: micro-batches of T x rows, each row through its
task's LoRA) and each alone (finetune/lora.py: the same rows in the same order, micro-batches of rows), with the
same iterations, learning rate and schedule. Held-out loss: mean loss per scored token (the response) over the
task's first held-out examples. Time: wall time of the training processes (loading and the validations
included), together's one run against the T runs one after another.

| date | machine | model | task | iterations x rows | held-out examples | base | together | alone | together - alone | time together / alone |
|---|---|---|---|---|---|---|---|---|---|---|
"""


def main(
    checkpoint_dir: Path = Path("checkpoints/lit-llama/SmolLM2-135M-Instruct"),
    task: List[str] = [],
    rows_per_task: int = 2,
    max_iters: int = 16,
    learning_rate: float = 2e-3,
    max_seq_length: int = 256,
    heldout: int = 24,
    seed: int = 1337,
    out_dir: Path = Path("out/multi_task_heldout"),
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> None:
    """Trains the tasks together and alone, then scores each task's held-out examples.

    Args:
        checkpoint_dir: The base model's checkpoint folder.
        task: NAME=DATA_DIR, repeated: each task's prepared data.
        rows_per_task: Rows of each task in a micro-batch (one optimizer step per micro-batch).
        max_iters: Training iterations of each arm.
        learning_rate: Peak learning rate (warmup of 2 steps, then cosine), the same for every task.
        max_seq_length: Examples cut to this many tokens in training.
        heldout: Held-out examples scored per task (the first of its test split).
        seed: Random seed of both arms (the rows each task trains on follow from it).
        out_dir: Where the runs are written (together/, alone/<task>/); must not exist yet.
        results_file: Markdown file to add the rows to (none: print only).
    """
    tasks: Dict[str, Path] = {}
    for item in task:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--task {item!r}: expected NAME=DATA_DIR")
        tasks[name] = Path(folder)
    if len(tasks) < 2:
        raise UserError("--task: give at least two tasks")
    if Path(out_dir).exists():
        raise UserError(f"--out_dir {out_dir} already exists: give a new folder")
    common = ["--checkpoint_dir", checkpoint_dir, "--precision", "32-true", "--max_iters", max_iters,
              "--learning_rate", learning_rate, "--warmup_iters", 2, "--lora_r", 8, "--lora_alpha", 16,
              "--lora_dropout", 0.0, "--max_seq_length", max_seq_length, "--eval_interval", 0, "--eval_iters", 1,
              "--save_interval", 0, "--log_interval", max(1, max_iters // 4), "--seed", seed]

    rows = len(tasks) * rows_per_task
    start = time.perf_counter()
    run("finetune/multi_lora.py", *common, *[f for n, d in tasks.items() for f in ("--task", f"{n}={d}")],
        "--micro_batch_size", rows, "--batch_size", rows, "--out_dir", Path(out_dir) / "together")
    together_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for name, folder in tasks.items():
        run("finetune/lora.py", *common, "--data_dir", folder, "--micro_batch_size", rows_per_task,
            "--batch_size", rows_per_task, "--out_dir", Path(out_dir) / "alone" / name)
    alone_seconds = time.perf_counter() - start

    paths = resolve_checkpoint(Path(checkpoint_dir))
    losses: Dict[str, Dict[str, float]] = {name: {} for name in tasks}
    base = load_model(paths, torch.device("cpu"), torch.float32).eval()
    for name, folder in tasks.items():
        losses[name]["base"] = heldout_loss(base, folder, heldout)
    del base
    for name, folder in tasks.items():
        for arm, lora_path in (("together", Path(out_dir) / "together" / name / FINAL),
                               ("alone", Path(out_dir) / "alone" / name / FINAL)):
            model = load_lora_model(paths, lora_path, torch.device("cpu"), torch.float32).eval()
            losses[name][arm] = heldout_loss(model, folder, heldout)
            del model

    machine = f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    result_rows = []
    for name, loss in losses.items():
        print(f"{name}: held-out loss base {loss['base']:.4f}, together {loss['together']:.4f}, "
              f"alone {loss['alone']:.4f}")
        result_rows.append(
            f"| {date.today()} | {machine} | {Path(checkpoint_dir).name} | {name} | {max_iters} x {rows_per_task} | {heldout} | "
            f"{loss['base']:.4f} | {loss['together']:.4f} | {loss['alone']:.4f} | "
            f"{loss['together'] - loss['alone']:+.2e} | {together_seconds:.0f} s / {alone_seconds:.0f} s |")
    print(f"time: together {together_seconds:.0f} s, alone one after another {alone_seconds:.0f} s "
          f"({alone_seconds / together_seconds:.2f}x)")
    if results_file and Path(results_file) != Path(""):
        add_rows(results_file, RESULTS_HEADER, result_rows)
        print(f"rows added to {results_file}")


def heldout_loss(model: torch.nn.Module, data_dir: Path, n: int, batch: int = 8) -> float:
    """Mean loss per scored token over the first `n` test examples of a prepared data folder."""
    test = load_prepared(data_dir)[1][:n]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(test), batch):
            input_ids, labels = pad_batch(test[i : i + batch], model.config.block_size)
            scored = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += compute_loss(model, input_ids, labels).item() * scored
            tokens += scored
    return total / max(tokens, 1)


def run(script: str, *args) -> None:
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"{script} failed (its error is above)")


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *normalize_repeated_flag(sys.argv[1:], "--task")]  # --task A --task B: a list
    run_cli(main)
