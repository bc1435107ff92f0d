"""Evaluate a model with lm-evaluation-harness (`pip install lm-eval`), and its perplexity on a text file.

    python scripts/evaluate.py --checkpoint_dir checkpoints/lit-llama/SmolLM2-135M-Instruct \
        --tasks lit_demo_choice --perplexity_file LICENSE --output out/eval/base.json

A LoRA or adapter finetune is the base plus its file (`--lora_path`, merged at load; or `--adapter_path`).
`--tasks` takes this package's offline tasks (lit_demo_choice, lit_demo_answer: lit_llama/eval_tasks/), task
YAML files of your own (their documents local JSON files: see howto/evaluate.md), or any of lm-eval's task
names (their datasets come from the Hugging Face hub: network, or the local cache with HF_DATASETS_OFFLINE=1).
The results (each task's metrics, the perplexity, the settings) are printed as a table and written as JSON.
"""

import importlib.util
import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.adapter import load_adapter_model
from lit_llama.checkpoint import check_vocab, load_model, resolve_checkpoint
from lit_llama.cli import UserError, check_at_least, check_file, check_range, run_cli
from lit_llama.disk import write_text_atomic
from lit_llama.distributed import default_device, precision_dtype
from lit_llama.lora import load_lora_model
from lit_llama.tokenizer import Tokenizer


def main(
    checkpoint_dir: Path = Path("checkpoints/lit-llama/7B"),
    lora_path: Optional[Path] = None,
    adapter_path: Optional[Path] = None,
    tasks: Optional[List[str]] = None,
    include_path: Optional[List[Path]] = None,
    limit: Optional[int] = None,
    num_fewshot: Optional[int] = None,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    perplexity_file: Optional[Path] = None,
    output: Optional[Path] = None,
    precision: Optional[str] = None,
    seed: int = 1234,
) -> None:
    """Evaluates a base model, or a LoRA or adapter finetune of it, on lm-eval tasks and/or a text file.

    Args:
        checkpoint_dir: The base model folder (lit-llama.pth, lit_config.json, the tokenizer).
        lora_path: A LoRA file from finetune/lora.py, trained on this base (merged into the weights at load).
        adapter_path: An adapter file from finetune/adapter.py, trained on this base.
        tasks: lm-eval tasks: names (this package's lit_demo_choice and lit_demo_answer, or lm-eval's own) or
            task YAML files, e.g. --tasks '[lit_demo_choice, my_task.yaml]'.
        include_path: Folders of your own task YAML files, to name them in --tasks.
        limit: Evaluate only the first N documents of each task (a quick look, not a score to report).
        num_fewshot: Examples put before each question (default: the task's own setting, usually 0).
        batch_size: Sequences per forward pass, or prompts per generation batch.
        max_length: The longest sequence the model reads (default: its context length); longer inputs lose
            their beginning, and the perplexity file is read in windows of this many tokens.
        perplexity_file: A UTF-8 text file to measure the model's perplexity on.
        output: Where to write the results as JSON (default: print only).
        precision: 32-true, 16-true or bf16-true (default: bf16-true on a GPU that has it, else 32-true).
        seed: Random seed (lm-eval's few-shot sampling; sampled generation).
    """
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("scripts/evaluate.py needs lm-evaluation-harness: pip install lm-eval "
                        "(or pip install -e '.[eval]')")
    if lora_path is not None and adapter_path is not None:
        raise UserError("give --lora_path or --adapter_path, not both: a model is evaluated with one finetune")
    if not tasks and perplexity_file is None:
        raise UserError("nothing to evaluate: give --tasks (e.g. --tasks lit_demo_choice) and/or --perplexity_file")
    check_at_least("batch_size", batch_size, 1)
    check_at_least("limit", limit, 1, optional=True)
    check_at_least("num_fewshot", num_fewshot, 0, optional=True)
    check_at_least("max_length", max_length, 2, optional=True)
    check_range("seed", seed, 0, 2**32 - 1)
    check_file(lora_path, "lora_path")
    check_file(adapter_path, "adapter_path")
    check_file(perplexity_file, "perplexity_file")
    for folder in include_path or []:
        if not Path(folder).is_dir():
            raise UserError(f"--include_path {folder} is not a folder")
    if output is not None and Path(output).is_dir():
        raise UserError(f"--output {output} is a folder: give the JSON file to write")

    # lm-eval is optional: imported once it is known to be installed
    from lit_llama.evaluation import LitLM, load_tasks, perplexity, run_tasks, task_manager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices; its errors still show

    paths = resolve_checkpoint(checkpoint_dir)
    tokenizer = Tokenizer(paths.tokenizer)
    check_vocab(tokenizer, paths)
    if max_length is not None and max_length > paths.config.context_length:
        raise UserError(f"--max_length {max_length} is more than the model's context of "
                        f"{paths.config.context_length} tokens")
    # the tasks are found and their documents read before the weights load: a wrong name or an unreachable
    # dataset is said at once
    manager = task_manager(tasks, include_path or []) if tasks else None
    if tasks:
        load_tasks(tasks, manager)

    t0 = time.perf_counter()
    device, dtype = default_device(), precision_dtype(precision)
    if lora_path is not None:
        model = load_lora_model(paths, lora_path, device, dtype, merge=True)
    elif adapter_path is not None:
        model = load_adapter_model(paths, adapter_path, device, dtype)
    else:
        model = load_model(paths, device, dtype)
    model.eval()
    lm = LitLM(model, tokenizer, batch_size, max_length)
    print(f"Loaded {paths.weights}" + (f" + {lora_path or adapter_path}" if lora_path or adapter_path else "")
          + f" in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    results = {"checkpoint_dir": str(checkpoint_dir), "lora_path": lora_path and str(lora_path),
               "adapter_path": adapter_path and str(adapter_path), "limit": limit, "num_fewshot": num_fewshot,
               "batch_size": batch_size, "max_length": lm.max_length, "dtype": str(dtype).removeprefix("torch."),
               "device": str(device)}
    if tasks:
        t0 = time.perf_counter()
        results["tasks"] = run_tasks(lm, tasks, manager, limit, num_fewshot, seed)
        results["tasks_seconds"] = round(time.perf_counter() - t0, 1)
    if perplexity_file is not None:
        t0 = time.perf_counter()
        results["perplexity"] = perplexity(lm, perplexity_file)
        results["perplexity"]["seconds"] = round(time.perf_counter() - t0, 1)
    print(format_results(results))
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(results, indent=2) + "\n", Path(output))
        print(f"Saved the results to {output}", file=sys.stderr)


def format_results(results: dict) -> str:
    """The results as a Markdown table: one row per task and metric, and the perplexity."""
    lines = ["| task | metric | value | stderr | documents |", "|---|---|---:|---:|---:|"]
    for task, metrics in results.get("tasks", {}).items():
        for name, value in metrics["metrics"].items():
            stderr = metrics["stderr"].get(name)
            lines.append(f"| {task} | {name} | {value:.4f} | {'' if stderr is None else f'{stderr:.4f}'} | "
                         f"{metrics['documents']} |")
    if "perplexity" in results:
        p = results["perplexity"]
        lines.append(f"| {Path(p['file']).name} | perplexity | {p['perplexity']:.3f} |  | {p['tokens']} tokens |")
        lines.append(f"| {Path(p['file']).name} | bits per byte | {p['bits_per_byte']:.4f} |  | {p['bytes']} bytes |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
