"""Peak memory of scripts/convert_hf_checkpoint.py: does converting a checkpoint need more RAM than its output?

    python benchmarks/convert_memory.py                                    # TinyLlama-1.1B's shape, fp32 -> bf16
    python benchmarks/convert_memory.py --n_layer 4 --shard_size_gb 0.5    # a quick, smaller run

Writes a random Hugging Face `LlamaForCausalLM` checkpoint straight to disk (no model is built: each weight
is made from the name/shape table lit_llama.convert.expected_hf_shapes gives, written to sharded float32
safetensors with model.safetensors.index.json, config.json and a tiny tokenizer.model) in a temporary folder
under /tmp, runs `python scripts/convert_hf_checkpoint.py --dtype bfloat16` on it in a subprocess and measures
the subprocess: peak RSS (the kernel's ru_maxrss, from wait4), and, sampled from /proc/<pid>/status while it
runs, how that RSS splits into anonymous memory (tensors the converter allocated) and file-backed pages
(memory-mapped input touched so far: clean page cache the kernel can drop at any time, shown in RSS only
while the file stays mapped). Also runs a subprocess that only imports the converter's modules, for the
baseline every Python + torch process pays. Prints a table with the sizes of the input on disk and of the
output lit-llama.pth, and appends it to benchmarks/RESULTS.md. The temporary folder is deleted at the end.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows
from lit_llama.convert import config_from_hf, expected_hf_shapes
from lit_llama.model import Config
from lit_llama.tokenizer import train_from_texts
from lit_llama.checkpoint import WEIGHTS_NAME
from lit_llama.cli import UserError, run_cli

HEADING = "## Checkpoint conversion memory"
TABLE_HEADER = (
    "| date | machine | model (params) | input on disk | output lit-llama.pth | peak RSS | "
    "of which anon / file-backed | baseline | time | peak / output | peak / input |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|\n"
)
GB = 1e9


def main(
    n_embd: int = 2048,
    n_layer: int = 22,
    n_head: int = 32,
    n_query_groups: int = 4,
    intermediate_size: int = 5632,
    vocab_size: int = 32000,
    shard_size_gb: float = 2.0,
    dtype: str = "bfloat16",
    workdir: Optional[Path] = None,
    keep: bool = False,
    sample_interval: float = 0.02,
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> None:
    """Measures the peak memory and time of converting a random float32 Hugging Face checkpoint.

    Args:
        n_embd: Hidden size (default: TinyLlama-1.1B's shape, 1.1B parameters, 4.4 GB in float32).
        n_layer: Number of transformer blocks.
        n_head: Attention heads.
        n_query_groups: Key/value heads (grouped-query attention when fewer than n_head).
        intermediate_size: SwiGLU hidden size.
        vocab_size: Rows of the embedding and output head.
        shard_size_gb: Largest input shard, in GB (Hugging Face's save_pretrained shards the same way).
        dtype: Target precision given to the converter: bfloat16, float16 or float32.
        workdir: Parent folder of the temporary checkpoint folders (default: /tmp).
        keep: Keep the temporary folder (input and output checkpoints) instead of deleting it.
        sample_interval: Seconds between samples of the converter's /proc/<pid>/status.
        results_file: Markdown file to append the result to (none: print only).
    """
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": n_embd,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_query_groups,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    try:
        config = config_from_hf(hf_config)
    except ValueError as e:
        raise UserError(f"invalid model shape: {e}")
    root = Path(tempfile.mkdtemp(prefix="convert_memory_", dir=workdir or "/tmp"))
    hf_dir, out_dir = root / "hf", root / "lit"
    try:
        t0 = time.perf_counter()
        n_params, shards = write_hf_checkpoint(hf_dir, hf_config, config, shard_size_gb)
        input_bytes = sum(p.stat().st_size for p in shards)
        print(f"wrote {n_params:,} parameters as {len(shards)} float32 shards, {input_bytes / GB:.2f} GB, "
              f"in {time.perf_counter() - t0:.0f} s: {hf_dir}")

        baseline = measure([sys.executable, "-c", IMPORTS_ONLY], root / "baseline.log", sample_interval)
        command = [
            sys.executable, str(REPO / "scripts" / "convert_hf_checkpoint.py"),
            "--checkpoint_dir", str(hf_dir), "--out_dir", str(out_dir), "--dtype", dtype,
        ]
        print("running", " ".join(command))
        run = measure(command, root / "convert.log", sample_interval)
        if run["returncode"] != 0:
            log = (root / "convert.log").read_text()
            raise RuntimeError(f"the converter failed (exit code {run['returncode']}):\n{log[-3000:]}")
        output_bytes = (out_dir / WEIGHTS_NAME).stat().st_size
        report(config, n_params, len(shards), max(p.stat().st_size for p in shards), input_bytes, output_bytes,
               dtype, run, baseline, results_file)
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


# the modules scripts/convert_hf_checkpoint.py imports: what any run of it costs before reading a weight
IMPORTS_ONLY = (
    "import sys; sys.path.insert(0, %r); import torch, tqdm, jsonargparse, safetensors; "
    "import lit_llama.convert, lit_llama.checkpoint" % str(REPO)
)


def write_hf_checkpoint(
    hf_dir: Path, hf_config: Dict, config: Config, shard_size_gb: float
) -> Tuple[int, List[Path]]:
    """Writes config.json, float32 safetensors shards of random weights (in Hugging Face's order and names),
    model.safetensors.index.json and a small tokenizer.model. Only one shard is in memory at a time."""
    from safetensors.torch import save_file

    hf_dir.mkdir(parents=True)
    (hf_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    shapes = expected_hf_shapes(config)  # HF names in HF's order: embed_tokens, layers.0..., norm, lm_head
    groups: List[List[str]] = [[]]
    group_bytes = 0
    for name, shape in shapes.items():
        nbytes = 4 * _numel(shape)
        if groups[-1] and group_bytes + nbytes > shard_size_gb * GB:
            groups.append([])
            group_bytes = 0
        groups[-1].append(name)
        group_bytes += nbytes

    generator = torch.Generator().manual_seed(0)
    weight_map: Dict[str, str] = {}
    files: List[Path] = []
    for i, names in enumerate(groups, 1):
        file = hf_dir / f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(shapes[name])
            else:
                shard[name] = torch.empty(shapes[name]).uniform_(-0.02, 0.02, generator=generator)
            weight_map[name] = file.name
        save_file(shard, str(file), metadata={"format": "pt"})
        del shard
        files.append(file)
    n_params = sum(_numel(s) for s in shapes.values())
    index = {"metadata": {"total_size": 4 * n_params}, "weight_map": weight_map}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    # the converter only copies the tokenizer: its vocabulary need not match the model's
    generator = torch.Generator().manual_seed(0)
    words = "the a model weight convert memory tensor shard file disk peak page map copy cast save load".split()
    texts = [" ".join(words[j] for j in torch.randint(len(words), (12,), generator=generator)) for _ in range(400)]
    train_from_texts(texts, hf_dir, vocab_size=300)
    return n_params, files


def _numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _status_kb(pid: int) -> Optional[Dict[str, int]]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    values = {}
    for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        match = re.search(key + r":\s+(\d+) kB", text)
        if match:
            values[key] = int(match.group(1))
    return values


# Runs argv[2:] as its child and writes "pid" at once, then "maxrss_kB exit_code wall_s" when it ends. Why not
# wait4 on the command directly: Python spawns with vfork, and exec records the *parent's* RSS high-water mark
# in the new process's ru_maxrss, so a child of this (large) benchmark process would inherit our peak. Forked
# from this small wrapper instead, the command's ru_maxrss is its own.
WRAPPER = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(f"{pid}\\n")
_, status, rusage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "a") as f:
    f.write(f"{rusage.ru_maxrss} {os.waitstatus_to_exitcode(status)} {wall}\\n")
"""


def measure(command: List[str], log: Path, sample_interval: float) -> Dict[str, float]:
    """Runs `command` (output to `log`) and returns its exit code, wall time, peak RSS (its ru_maxrss, the
    kernel's own high-water mark) and, sampled from /proc, the peaks of anonymous and file-backed RSS and the
    split of RSS at the sample where it was highest. Sizes in bytes."""
    peak = {"rss": 0, "anon": 0, "file": 0, "anon_at_peak": 0, "file_at_peak": 0}
    result_file = log.with_suffix(".rusage")
    with open(log, "w") as out:
        wrapper = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, str(result_file), *command], stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )
        pid = None
        while wrapper.poll() is None:
            if pid is None and result_file.is_file() and result_file.read_text().endswith("\n"):
                pid = int(result_file.read_text().split()[0])
            s = _status_kb(pid) if pid is not None else None
            if s and "RssAnon" in s:
                peak["anon"] = max(peak["anon"], s["RssAnon"])
                peak["file"] = max(peak["file"], s["RssFile"])
                if s["VmRSS"] >= peak["rss"]:
                    peak.update(rss=s["VmRSS"], anon_at_peak=s["RssAnon"], file_at_peak=s["RssFile"])
            time.sleep(sample_interval)
    lines = result_file.read_text().splitlines() if result_file.is_file() else []
    if wrapper.returncode != 0 or len(lines) < 2:
        raise RuntimeError(f"measuring {command[:2]} failed: {log.read_text()[-3000:]}")
    maxrss_kb, returncode, wall = lines[1].split()
    return {
        "returncode": int(returncode),
        "wall_s": float(wall),
        "maxrss": int(maxrss_kb) * 1024,  # Linux reports kB
        "sampled_rss": peak["rss"] * 1024,
        "anon": peak["anon"] * 1024,
        "file": peak["file"] * 1024,
        "anon_at_peak": peak["anon_at_peak"] * 1024,
        "file_at_peak": peak["file_at_peak"] * 1024,
    }


def report(
    config: Config,
    n_params: int,
    n_shards: int,
    largest_shard: int,
    input_bytes: int,
    output_bytes: int,
    dtype: str,
    run: Dict[str, float],
    baseline: Dict[str, float],
    results_file: Optional[Path],
) -> None:
    peak = run["maxrss"]
    machine = f"CPU, {os.cpu_count()} cores"
    shape = (f"{n_params / 1e9:.2f}B: {config.n_layer} layers, {config.n_embd} wide, {config.n_head} heads "
             f"({config.n_query_groups} kv), mlp {config.intermediate_size}, vocab {config.vocab_size}")
    rows = [
        ("model", shape),
        ("input on disk", f"{input_bytes / GB:.2f} GB float32 safetensors, {n_shards} shards, "
                          f"largest {largest_shard / GB:.2f} GB"),
        ("output lit-llama.pth", f"{output_bytes / GB:.2f} GB {dtype}"),
        ("peak RSS (ru_maxrss)", f"{peak / GB:.2f} GB"),
        ("  sampled at the peak", f"{run['anon_at_peak'] / GB:.2f} GB anonymous + "
                                  f"{run['file_at_peak'] / GB:.2f} GB file-backed (mapped input)"),
        ("  sampled maxima", f"anonymous {run['anon'] / GB:.2f} GB, file-backed {run['file'] / GB:.2f} GB"),
        ("baseline (imports only)", f"{baseline['maxrss'] / GB:.2f} GB: {baseline['anon_at_peak'] / GB:.2f} GB anonymous + "
                                    f"{baseline['file_at_peak'] / GB:.2f} GB file-backed (torch's libraries)"),
        ("wall time", f"{run['wall_s']:.1f} s (input in the page cache: just written)"),
        ("peak RSS / output", f"{peak / output_bytes:.2f}x"),
        ("peak RSS / input", f"{peak / input_bytes:.2f}x"),
        ("anonymous peak / output", f"{run['anon'] / output_bytes:.2f}x"),
    ]
    print(f"\nscripts/convert_hf_checkpoint.py --dtype {dtype} on {machine}")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:{width}s}  {value}")
    print(
        "\nHow to read it: RSS counts two kinds of pages. Anonymous pages are memory the converter allocated: the\n"
        "converted tensors, all held until torch.save writes them (= the output size), plus the Python/torch\n"
        "baseline and the tensor being cast. File-backed pages are the parts of the memory-mapped input that\n"
        "have been read (and torch's shared libraries, see the baseline); they are clean page cache, shared with\n"
        "the OS file cache, dropped by the kernel under memory pressure and leave RSS when the file is unmapped.\n"
        "So the RAM the conversion really needs is about the anonymous peak; the rest of the peak is mapped\n"
        "input. Frugal means: anonymous peak ~ output + baseline (one copy of the weights, in the target dtype),\n"
        "far below input + output (what reading everything, then converting, would cost)."
    )
    if results_file:
        row = (
            f"| {date.today()} | {machine} | {n_params / 1e9:.2f}B ({config.n_layer}x{config.n_embd}, "
            f"vocab {config.vocab_size}) | {input_bytes / GB:.2f} GB fp32, {n_shards} shards "
            f"(largest {largest_shard / GB:.2f} GB) | {output_bytes / GB:.2f} GB {dtype} | {peak / GB:.2f} GB | "
            f"{run['anon_at_peak'] / GB:.2f} / {run['file_at_peak'] / GB:.2f} GB | "
            f"{baseline['maxrss'] / GB:.2f} GB | {run['wall_s']:.0f} s | {peak / output_bytes:.2f}x | "
            f"{peak / input_bytes:.2f}x |\n"
        )
        append_result(Path(results_file), row)
        print(f"\nappended to {results_file}")


def append_result(results_file: Path, row: str) -> None:
    """Adds the row to this section's table (the section and its header first, if the file lacks them)."""
    section = (
        f"{HEADING}\n\n"
        "`python benchmarks/convert_memory.py`: scripts/convert_hf_checkpoint.py on a random float32 Hugging "
        "Face checkpoint (sharded safetensors), converted to bfloat16. Peak RSS is the converter process's "
        "ru_maxrss; sampled from /proc at the peak, it splits into anonymous memory (the converted tensors, held until torch.save, plus the "
        "Python/torch baseline) and file-backed pages of the memory-mapped input shard being read (clean page "
        "cache, reclaimable, released when the shard is closed). The RAM actually needed is about the "
        "anonymous part. Baseline: a process that only imports the converter's modules. Input in the page "
        "cache (just written).\n\n"
        + TABLE_HEADER
    )
    add_rows(results_file, section, [row])


if __name__ == "__main__":
    run_cli(main)
