"""The whole LoRA pipeline, offline, on a CPU, in about half a minute, with nothing from outside the repository.

    python scripts/demo.py

It builds a tiny random LLaMA and trains a tiny tokenizer on the instruction set the repository ships
(lit_llama/demo_instructions.json), then runs the same commands a user runs on real weights:
prepare_alpaca.py -> finetune/lora.py -> generate/lora.py -> merge_lora.py -> generate.py.
A randomly initialised model of 170k parameters learns the shape of the answers, not much more:
quality needs real pretrained weights (howto/download_weights.md).
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere, installed or not

import torch

from lit_llama.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_weights
from lit_llama.cli import UserError, check_at_least, check_out_dir, check_range, run_cli
from lit_llama.data import load_records
from lit_llama.disk import write_text_atomic
from lit_llama.model import Config, LLaMA, llama_configs
from lit_llama.tokenizer import train_from_texts

DEMO_DATA = REPO / "lit_llama" / "demo_instructions.json"
MANIFEST = "demo_manifest.json"  # what a demo run wrote in --out_dir: the files --overwrite may remove
PROMPTS = ["What is the opposite of hot?", "What color is a strawberry?"]


def main(
    out_dir: Path = Path("out/demo"),
    max_iters: int = 600,
    model_size: str = "tiny",
    seed: int = 1337,
    overwrite: bool = False,
) -> None:
    """Runs prepare -> finetune/lora -> generate -> merge on a tiny model.

    Args:
        out_dir: Work folder for the tiny checkpoint, the prepared data and the LoRA run.
        max_iters: LoRA finetuning iterations (micro-batches of 4).
        model_size: A named size from lit_llama/model.py (keep it tiny on a CPU).
        seed: Random seed of the model, the split and the training.
        overwrite: Replace an earlier demo run in --out_dir.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():  # replacing an earlier demo removes the folder: never through a link
        raise UserError(f"--out_dir {out_dir} is a symbolic link: give a real folder (or one to create)")
    check_out_dir(out_dir)
    check_at_least("max_iters", max_iters, 1)
    check_range("seed", seed, 0, 2**63 - 1)
    if model_size not in llama_configs:
        raise UserError(f"--model_size {model_size!r} is not one of {', '.join(llama_configs)}")
    if out_dir.exists():
        if not overwrite:
            raise UserError(f"{out_dir} already exists; pass --overwrite true to run the demo again there")
        remove_earlier_demo(out_dir)
    start = time.perf_counter()
    checkpoint_dir, data_dir, lora_dir = out_dir / "checkpoint", out_dir / "data", out_dir / "lora"
    record_written_files(out_dir)

    step("1/5 a tiny random base model and a tokenizer trained on the demo instructions")
    records = load_records(DEMO_DATA)
    texts = [" ".join((r["instruction"], r["input"], r["output"])) for r in records]
    config = Config.from_name(model_size)
    train_from_texts(texts, checkpoint_dir, vocab_size=config.vocab_size)
    torch.manual_seed(seed)
    save_weights(LLaMA(config).state_dict(), checkpoint_dir / WEIGHTS_NAME)
    config.to_json(checkpoint_dir / CONFIG_NAME)

    record_written_files(out_dir)

    step("2/5 python scripts/prepare_alpaca.py")
    run("scripts/prepare_alpaca.py", "--checkpoint_dir", checkpoint_dir, "--data_file", DEMO_DATA,
        "--out_dir", data_dir, "--test_split_size", 20, "--seed", seed)

    record_written_files(out_dir)

    step("3/5 python finetune/lora.py")
    # A random base knows nothing, so LoRA adapts every layer with a larger rank and learning rate
    # than the article's 7B settings (r 8 on query and value, lr 3e-4).
    run("finetune/lora.py", "--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir, "--out_dir", lora_dir,
        "--precision", "32-true", "--batch_size", 8, "--micro_batch_size", 4, "--max_iters", max_iters,
        "--learning_rate", 1e-2, "--warmup_iters", 10, "--lora_r", 16, "--lora_alpha", 16, "--lora_dropout", 0.0,
        "--lora_key", "true", "--lora_projection", "true", "--lora_mlp", "true", "--lora_head", "true",
        "--eval_interval", 25, "--eval_iters", 5, "--save_interval", 0, "--log_interval", 10, "--seed", seed)
    lora_path = lora_dir / "lit-llama-lora-finetuned.pth"

    record_written_files(out_dir)

    step("4/5 python generate/lora.py (greedy, merged at load)")
    for prompt in PROMPTS:
        response = run("generate/lora.py", "--checkpoint_dir", checkpoint_dir, "--lora_path", lora_path,
                       "--prompt", prompt, "--temperature", 0, "--max_new_tokens", 30, quiet=True)
        print(f"  {prompt}\n  -> {response.strip()}")

    step("5/5 python scripts/merge_lora.py, then generate.py on the merged checkpoint")
    merged_dir = out_dir / "checkpoint-lora"
    run("scripts/merge_lora.py", "--checkpoint_dir", checkpoint_dir, "--lora_path", lora_path,
        "--out_dir", merged_dir)
    run("generate.py", "--checkpoint_dir", merged_dir, "--prompt", "The opposite of", "--temperature", 0,
        "--max_new_tokens", 10)

    record_written_files(out_dir)
    val_losses = validation_losses(lora_dir)
    print(f"\nValidation loss: {val_losses[0]:.3f} before LoRA finetuning, {val_losses[-1]:.3f} after "
          f"({len(val_losses)} validations). Done in {time.perf_counter() - start:.0f} s; outputs in {out_dir}.")
    print("This is a tiny random model: it shows the pipeline works, not what LoRA does for a real LLaMA. "
          "For that, get real weights: howto/download_weights.md, then howto/finetune_lora.md.")


def record_written_files(out_dir: Path) -> None:
    """Lists in --out_dir's manifest every file there: all were written by this demo, which started in an empty
    folder. `--overwrite` later removes the folder only if it holds nothing else (see `remove_earlier_demo`)."""
    files = sorted(str(path.relative_to(out_dir)) for path in demo_entries(out_dir) if path.name != MANIFEST)
    write_text_atomic(json.dumps({"files": files}, indent=1) + "\n", out_dir / MANIFEST)


def demo_entries(out_dir: Path) -> List[Path]:
    """Everything in `out_dir` but folders: files, and links (to a file or a folder: never followed)."""
    entries = []
    for folder, dirs, files in os.walk(out_dir):
        entries += [Path(folder) / name for name in files + [d for d in dirs if (Path(folder) / d).is_symlink()]]
    return entries


def remove_earlier_demo(out_dir: Path) -> None:
    """Removes --out_dir for a new run, only if everything in it is listed in the manifest of an earlier run:
    files the user put there (beside the demo's or inside its folders) are never deleted."""
    manifest = out_dir / MANIFEST
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        raise UserError(f"--out_dir {out_dir} has no {MANIFEST}: it is not a folder the demo wrote; not replacing it")
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable, not UTF-8 JSON, or another shape
        raise UserError(f"{manifest} is not a demo manifest ({type(e).__name__}: {e}); not replacing {out_dir}")
    if not isinstance(listed, list):
        raise UserError(f"{manifest}: 'files' must be a list of file names; not replacing {out_dir}")
    # only what is there is removed, and only when listed: the manifest's names are compared, never opened
    unknown = sorted(str(p.relative_to(out_dir)) for p in demo_entries(out_dir)
                     if p != manifest and str(p.relative_to(out_dir)) not in listed)
    if unknown:
        raise UserError(f"--out_dir {out_dir} holds {unknown[0]!r}, which the demo did not write: not replacing it "
                        "(move it away, or choose another --out_dir)")
    shutil.rmtree(out_dir)


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(script: str, *args, quiet: bool = False) -> str:
    """Runs a repository script as a user would; stops the demo with its error if it fails."""
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    # in the caller's folder, like the user's own commands: --out_dir and the paths under it mean what they said
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if not quiet else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise UserError(f"{script} failed (exit {proc.returncode}): {(proc.stderr or '').strip()[-500:]}")
    if not quiet:
        print(proc.stdout, end="")
    return proc.stdout


def validation_losses(run_dir: Path) -> List[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(row["val_loss"]) for row in csv.DictReader(f) if row.get("val_loss")]


if __name__ == "__main__":
    run_cli(main)
