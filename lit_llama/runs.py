"""A finished finetune run folder (finetune/lora.py, adapter.py or full.py's --out_dir), read back: which method,
its final checkpoint, its training curves (metrics.csv) and the numbers a comparison shows. scripts/compare.py
writes its table from these, and serve.py's comparison page shows them.

A run folder holds `run.json` (method and settings), `metrics.csv` (one row per logged iteration: tokens seen,
train loss, validation loss on validation iterations, peak memory), `summary.json` (time, tokens, final loss)
and the final checkpoint, named by the method (`FINAL_NAMES`)."""

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List

import torch

from lit_llama.checkpoint import load_state_dict
from lit_llama.cli import UserError
from lit_llama.run_dir import METRICS_NAME, RUN_NAME

# the method -> the name its finetune script gives the final checkpoint
FINAL_NAMES = {"lora": "lit-llama-lora-finetuned.pth", "adapter": "lit-llama-adapter-finetuned.pth",
               "full": "lit-llama-full-finetuned.pth"}
NUMBER_COLUMNS = ("iter", "tokens", "train_loss", "val_loss", "peak_memory")  # metrics.csv's columns read here


def read_json(path: Path, expected: str) -> Dict[str, Any]:
    """A JSON object a run wrote (summary.json, run.json, ...), or one line saying why it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}): {expected}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object: {expected}")
    return data


def run_method(run_dir: Path) -> str:
    """lora, adapter or full: as run.json says, else by the final checkpoint the folder holds (a run written
    before run.json existed). UserError if the folder holds no finished run."""
    if (run_dir / RUN_NAME).is_file():
        method = read_json(run_dir / RUN_NAME, "the run folder's record of its method").get("method")
        if method in FINAL_NAMES and (run_dir / FINAL_NAMES[method]).exists():
            return method
    found = [method for method, name in FINAL_NAMES.items() if (run_dir / name).exists()]
    if len(found) != 1:
        raise UserError(f"{run_dir} holds no finished finetune run: expected one of {', '.join(FINAL_NAMES.values())}")
    return found[0]


def read_metrics(run_dir: Path, remedy: str = "") -> List[Dict[str, str]]:
    """The rows of the run's metrics.csv (one file, also for a resumed run), their numbers checked; `remedy` ends
    the error message."""
    path = run_dir / METRICS_NAME
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path} is not a UTF-8 CSV file ({type(e).__name__}){': ' + remedy if remedy else ''}") from None
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        for key in NUMBER_COLUMNS:
            try:
                float(row.get(key) or 0)
            except (TypeError, ValueError):
                raise UserError(f"{path}: line {i}: {key} {row.get(key)!r} is not a number"
                                f"{': ' + remedy if remedy else ''}") from None
    return rows


def curves(rows: List[Dict[str, str]]) -> Dict[str, List[List[float]]]:
    """Train and validation loss against tokens seen: {"train": [[tokens, loss], ...], "val": [...]}."""
    return {kind: [[float(row.get("tokens") or 0), float(row[f"{kind}_loss"])] for row in rows
                   if row.get(f"{kind}_loss") and math.isfinite(float(row[f"{kind}_loss"]))]
            for kind in ("train", "val")}


def last_tenth_mean(losses: List[float]) -> float:
    """The mean of the last tenth of the logged train losses (one micro-batch is noisy); NaN without any."""
    last = losses[-max(1, len(losses) // 10):]
    return sum(last) / len(last) if last else float("nan")


def count_tensor_elements(checkpoint: Any) -> int:
    if isinstance(checkpoint, torch.Tensor):
        return checkpoint.numel()
    if isinstance(checkpoint, dict):
        return sum(count_tensor_elements(v) for v in checkpoint.values())
    return 0


def run_card(run_dir: Path) -> Dict[str, Any]:
    """What the comparison page shows of a run: its settings (the fields of compare.py's table, with the rank
    and learning rate from run.json) and its curves, None where the folder has no metrics.csv. Fields a run did
    not record are None."""
    method = run_method(run_dir)
    final = run_dir / FINAL_NAMES[method]
    info = read_json(run_dir / RUN_NAME, "") if (run_dir / RUN_NAME).is_file() else {}
    summary = read_json(run_dir / "summary.json", "") if (run_dir / "summary.json").is_file() else {}
    rows = read_metrics(run_dir) if (run_dir / METRICS_NAME).is_file() else None
    if method == "adapter":
        version = (info.get("adapter") or {}).get("adapter_version")
        method = f"adapter v{version}" if version else method
    def number(value: Any) -> Any:  # a finite number, else None (the page's JSON has no NaN)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None

    settings = {
        "method": method,
        "rank": (info.get("lora") or {}).get("r"),
        "learning rate": (info.get("training") or {}).get("learning_rate"),
        # the final file holds exactly the trained tensors (LoRA, adapter, or every weight for full)
        "trainable params": count_tensor_elements(load_state_dict(final)) if final.is_file() else None,
        "checkpoint MB": round(final.stat().st_size / 1e6, 3) if final.is_file() else None,
        # as compare.py's table: the peak over metrics.csv's rows, the train loss of the last tenth of them
        "peak memory GB": max([float(r["peak_memory"]) for r in rows or [] if r.get("peak_memory")],
                              default=number(summary.get("peak_memory_gb"))),
        "train time s": number(summary.get("train_seconds")),
        "tokens": number(summary.get("tokens")),
        "tokens/s": number(summary.get("tokens_per_sec")),
        "train loss": number(last_tenth_mean([float(r["train_loss"]) for r in rows or [] if r.get("train_loss")])),
        "val loss": number(summary.get("val_loss")),
    }
    return {"run_dir": str(run_dir), "settings": settings, "curves": curves(rows) if rows is not None else None}


def read_prompts(path: Path) -> List[str]:
    """The prompts of a file, for scripts/compare.py --prompts FILE: one a line (blank lines skipped), or, from a
    comparison the page saved (a .md file), the first column of its table of answers."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {path} cannot be read as UTF-8 text: {getattr(e, 'strerror', None) or e}") from None
    if path.suffix == ".md":
        prompts = prompts_of_answers_table(text)
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompt: write one prompt a line"
                        + (" (or save a comparison with answers from the page)" if path.suffix == ".md" else ""))
    return prompts


def prompts_of_answers_table(markdown: str) -> List[str]:
    """The prompts of the first table `answers_table` wrote into a Markdown text (its first column)."""
    prompts, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("| prompt |"):
            in_table = True
        elif in_table and line.startswith("|---"):
            continue
        elif in_table and line.startswith("| "):
            cell = re.match(r"\| ((?:[^|\\]|\\.)*) \|", line)
            if cell:
                prompts.append(re.sub(r"\\(.)", r"\1", cell.group(1).replace("<br>", "\n")))
        elif in_table:
            break
    return prompts


def markdown_cell(text: str) -> str:
    """Text in one cell of a Markdown table: on one line, its pipes escaped."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def answers_table(prompts: List[str], answers: Dict[str, List[str]]) -> List[str]:
    """The answers as a Markdown table: a row per prompt, a column per model. The comparison page saves the
    same table (lit_llama/web/compare.js, `answersTable`)."""
    lines = ["| prompt | " + " | ".join(map(markdown_cell, answers)) + " |", "|---" * (len(answers) + 1) + "|"]
    for i, prompt in enumerate(prompts):
        lines.append("| " + " | ".join(markdown_cell(cell) for cell in [prompt, *(a[i] for a in answers.values())])
                     + " |")
    return lines
