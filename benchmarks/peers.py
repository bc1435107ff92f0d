"""LoRA finetuning speed of lit-llama against Hugging Face PEFT, litgpt and torchtune, in one run: the same
weights, the same examples in the same order, the same LoRA settings (r 8, alpha 16, dropout 0.05 on query and
value), AdamW at the article's learning rate, each implementation in its own Python environment.

    python benchmarks/peers.py                                   # the real workload, a 4x512 LLaMA
    python benchmarks/peers.py --workload equal                  # equal work: random tokens, loss everywhere
    python benchmarks/peers.py --checkpoint_dir checkpoints/lit-llama/SmolLM2-135M-Instruct
    python benchmarks/peers.py --smoke true                      # a tiny model, two steps, the peers present

Workloads:
  real   Alpaca records (../shared's sample) tokenized by the model's tokenizer and cut at 256 tokens, loss on
         the response only, micro-batches of 4 drawn by the finetune loop's sampler. Each implementation trains
         them as its documented recipe does: ours, PEFT and litgpt on batches right-padded to their longest
         example (litgpt with its chunked output layer and cross-entropy, lm_head_chunk_size 128), torchtune
         with its packing (`packed: True`: the same examples in the same order, concatenated into rows of 256
         tokens, 4 rows a step, a block-causal mask) and its chunked cross-entropy.
  equal  Rows of random tokens filling max_seq_length, the loss on every position: the same work for all.

Environments: ours and PEFT run in this Python when it has them. litgpt and torchtune each get a virtual
environment under --cache_dir, made on first use (`pip install`, a few minutes, the package registry
needed); it sees this environment's packages through a .pth file, so torch is not installed twice. Or name a
Python with --peft_python, --litgpt_python, --torchtune_python. One that cannot be found or built is skipped
in one line.

Turns: the implementations each train their warm-up steps, then their timed steps in --rounds parts, one
implementation at a time, the order rotating each round, so that all see the same load of a shared machine.
Each round also times the machine's float32 (or bf16) matmul peak; the share of the peak is the step's
achieved FLOP/s (benchmarks/common.py `training_flops`, one formula for every implementation) over the
median of those peaks.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import venv
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows, matmul_peak_flops, training_flops, write_random_checkpoint
from benchmarks.peer_worker import ANSWER
from lit_llama.checkpoint import resolve_checkpoint
from lit_llama.cli import UserError, run_cli
from lit_llama.data import prepare_sample
from lit_llama.distributed import precision_dtype
from lit_llama.model import Config
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import batch_indices

IMPLEMENTATIONS = ("ours", "peft", "litgpt", "torchtune")
# what a made environment installs: releases that run on this repository's torch (2.14). litgpt pins
# huggingface-hub below 1.4, which the newest transformers does not accept; torchtune 0.6.1 imports
# torchao.dtypes.nf4tensor, gone after torchao 0.13
REQUIREMENTS = {"peft": ["peft"], "litgpt": ["litgpt==0.5.13", "transformers==5.3.0"],
                "torchtune": ["torchtune==0.6.1", "torchao==0.13.0"]}
MODULES = {"ours": "lit_llama", "peft": "peft", "litgpt": "litgpt", "torchtune": "torchtune"}
CONFIGURATION = {
    ("ours", "real"): "packed, one row per step (--packing), logits of scored positions only",
    ("peft", "real"): "padded batches, SDPA",
    ("litgpt", "real"): "padded batches, chunked head and loss",
    ("torchtune", "real"): "packed rows, chunked loss",
}
OURS_PADDED = "padded batches, logits of scored positions only"  # ours on the real workload, --ours_packing false
SMALL = dict(n_layer=4, n_head=8, n_embd=512, intermediate_size=1376, vocab_size=32000, block_size=512)

RESULTS_HEADER = """
## LoRA finetuning: lit-llama vs PEFT, litgpt and torchtune

`python benchmarks/peers.py`: LoRA r 8, alpha 16, dropout 0.05 on query and value, AdamW, the same weights and
examples for all; each implementation in its own environment, taking turns with the others (interleaved
rounds). Real: Alpaca records, loss on the response only, each peer's documented recipe (torchtune packs;
ours packs with --packing unless --ours_packing false).
Equal: random tokens filling the rows, loss everywhere. Tokens/s: real (unpadded) tokens over the timed steps.
Step peak: the most memory one step takes above what it starts with (CPU: benchmarks/measure.py
PeakTensorMemory). Share of peak: the step's FLOPs by benchmarks/common.py `training_flops` (the same count
for every implementation) per second, over the machine's `torch.matmul` peak timed in the same run.

| date | machine | model | workload | micro batch | implementation | configuration | tokens/s | ratio to ours | step peak | matmul peak | share of peak | padded | step-0 loss |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def main(
    workload: str = "real",
    checkpoint_dir: Optional[Path] = None,
    smoke: bool = False,
    implementations: List[str] = list(IMPLEMENTATIONS),
    micro_batch_size: int = 4,
    max_seq_length: int = 256,
    steps: int = 12,
    warmup_steps: int = 2,
    rounds: int = 4,
    threads: int = 1,
    device: str = "cpu",
    precision: str = "32-true",
    data_file: Path = SHARED / "data" / "alpaca_sample.json",
    peft_python: Optional[Path] = None,
    litgpt_python: Optional[Path] = None,
    torchtune_python: Optional[Path] = None,
    ours_packing: bool = True,
    make_envs: bool = True,
    cache_dir: Path = Path.home() / ".cache" / "lit_llama_peers",
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> Dict[str, Dict[str, Any]]:
    """Times LoRA training steps of each implementation in turns; returns each one's figures.

    Args:
        workload: real (Alpaca records, loss on the response, each peer's own recipe) or equal (random tokens
            filling every row, loss on every position).
        checkpoint_dir: A lit-llama checkpoint folder (e.g. SmolLM2 made by scripts/convert_gguf_checkpoint.py);
            default: a random 4-layer, 512-wide LLaMA with the LLaMA tokenizer (../shared's).
        smoke: A tiny random model, 2 timed steps in 2 rounds, only the implementations already installed
            (no environment is made): checks the whole path in seconds.
        implementations: Which of ours, peft, litgpt, torchtune to run.
        micro_batch_size: Examples (torchtune packed: rows) per step.
        max_seq_length: Examples are cut to this many tokens; rows of equal work are this long.
        steps: Timed steps per implementation (torchtune's packed steps: as many as its rows need).
        warmup_steps: Untimed steps first.
        rounds: The timed steps are run in this many turns per implementation.
        threads: torch threads of each implementation and of the matmul peak (CPU).
        device: cpu or cuda.
        precision: 32-true, or bf16-true (weights in bf16).
        data_file: Alpaca-format JSON records for the real workload.
        peft_python: The Python of an environment with PEFT (default: this one when it has PEFT).
        litgpt_python: The Python of an environment with litgpt (default: made under --cache_dir).
        torchtune_python: The Python of an environment with torchtune (default: made under --cache_dir).
        ours_packing: With the real workload, ours packs each step's examples into rows (finetune's
            `--packing true`, its best configuration, as torchtune packs in its recipe); false: padded batches.
        make_envs: Make the missing environments (pip install); false: skip those implementations.
        cache_dir: Where the made environments (and nothing else) are kept.
        results_file: Markdown file to add the rows to ("" for none).
    """
    if workload not in ("real", "equal"):
        raise UserError(f"--workload must be real or equal, got {workload!r}")
    unknown = [name for name in implementations if name not in IMPLEMENTATIONS]
    if unknown or not implementations:
        raise UserError(f"--implementations: {unknown or 'none'}; choose from {', '.join(IMPLEMENTATIONS)}")
    for flag, value in (("steps", steps), ("warmup_steps", warmup_steps), ("rounds", rounds),
                        ("micro_batch_size", micro_batch_size), ("threads", threads)):
        if value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if smoke:
        steps, warmup_steps, rounds, make_envs = 2, 1, 2, False
    rounds = min(rounds, steps)
    dev, dtype = torch.device(device), precision_dtype(precision)
    torch.set_num_threads(threads)
    pythons = {"peft": peft_python, "litgpt": litgpt_python, "torchtune": torchtune_python}

    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        work = Path(tmp)
        if checkpoint_dir is None:
            config = Config.from_name("tiny") if smoke else Config(**SMALL)
            checkpoint_dir = work / "model"
            write_random_checkpoint(config, checkpoint_dir, torch.device("cpu"), SHARED / "tokenizers" / "llama")
            shape = "tiny" if smoke else "4x512 (32k vocab, random)"
        else:
            shape = Path(checkpoint_dir).name
        paths = resolve_checkpoint(Path(checkpoint_dir))
        config = paths.config
        hf_dir = work / "hf"
        export = load_script(REPO / "scripts" / "export_hf.py")
        export.convert(checkpoint_dir=Path(checkpoint_dir), out_dir=hf_dir)
        examples, warmup, timed = make_examples(workload, paths, data_file, micro_batch_size, max_seq_length,
                                                warmup_steps + steps, warmup_steps)
        spec = {"device": device, "dtype": str(dtype).split(".")[-1], "threads": threads,
                "lit_checkpoint": str(checkpoint_dir), "hf_dir": str(hf_dir),
                "hf_config": json.loads((hf_dir / "config.json").read_text()),
                "lora": {"r": 8, "alpha": 16, "dropout": 0.05}, "learning_rate": 3e-4, "weight_decay": 0.0,
                "max_seq_length": max_seq_length, "micro_batch_size": micro_batch_size,
                "examples": examples, "warmup": warmup, "timed": timed}

        workers: Dict[str, Worker] = {}
        for name in implementations:
            python = find_python(name, pythons.get(name), make_envs, Path(cache_dir))
            if python is None:
                continue
            spec_file = work / f"{name}.json"
            pack = workload == "real" and (name == "torchtune" or (name == "ours" and ours_packing))
            spec_file.write_text(json.dumps({**spec, "pack": pack}))
            workers[name] = Worker(name, python, spec_file, work / f"{name}.log")
        for name, worker in list(workers.items()):
            ready = worker.receive()
            if "error" in ready:
                print(f"skip {name}: {ready['error']}")
                del workers[name]
            else:
                worker.trainable = ready["trainable"]
        if not workers:
            raise UserError("no implementation could run (see the skips above)")

        for worker in workers.values():
            worker.first_loss = worker.order(do="warmup")["losses"][0]
        peaks, names = [], list(workers)
        for r in range(rounds):
            peaks.append(matmul_peak_flops(dev, dtype, repeats=3))
            for name in names[r % len(names):] + names[:r % len(names)]:
                done = workers[name].order(do="chunk", index=r, of=rounds)
                for key in ("seconds", "tokens", "positions"):
                    setattr(workers[name], key, getattr(workers[name], key) + done[key])
                print(f"round {r + 1}/{rounds}: {name} {done['tokens'] / done['seconds']:.0f} tokens/s", flush=True)
        for worker in workers.values():
            worker.memory_gb = worker.order(do="memory")["memory_gb"]
            worker.close()

    peak = statistics.median(peaks)
    lora_params = workers["ours"].trainable if "ours" in workers else next(iter(workers.values())).trainable
    flops = training_flops(config, [len(examples[i]["input_ids"]) for step in timed for i in step], lora_params)
    machine = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else f"CPU {platform.processor() or platform.machine()}, {threads} thread{'s' * (threads > 1)}")
    ours_rate = workers["ours"].tokens / workers["ours"].seconds if "ours" in workers else None
    print(f"model {shape}, {workload} workload, {precision}, micro batch {micro_batch_size}, {steps} timed steps "
          f"in {rounds} rounds; matmul peak {peak / 1e9:.1f} GFLOP/s (median of {len(peaks)})")
    rows, results = [], {}
    for name, w in workers.items():
        rate = w.tokens / w.seconds
        share = flops / w.seconds / peak
        ratio = f"{rate / ours_rate:.2f}x" if ours_rate else "-"
        padded = 1 - w.tokens / w.positions
        results[name] = {"tokens_per_s": rate, "memory_gb": w.memory_gb, "share_of_peak": share,
                         "first_loss": w.first_loss}
        print(f"  {name:10s} {rate:8.0f} tokens/s  {ratio:>6s} ours  step peak {w.memory_gb:.3f} GB  "
              f"{share:.0%} of peak  padded {padded:.0%}  step-0 loss {w.first_loss:.4f}")
        configuration = CONFIGURATION.get((name, workload), "full rows")
        if name == "ours" and workload == "real" and not ours_packing:
            configuration = OURS_PADDED
        rows.append(f"| {date.today()} | {machine} | {shape} | {workload} | {micro_batch_size} | {name} | "
                    f"{configuration} | {rate:.0f} | {ratio} | {w.memory_gb:.3f} GB | {peak / 1e9:.1f} GFLOP/s | "
                    f"{share:.0%} | {padded:.0%} | {w.first_loss:.4f} |")
    add_rows(results_file, RESULTS_HEADER, rows)
    return results


class Worker:
    """One implementation's benchmarks/peer_worker.py process, given one order at a time."""

    def __init__(self, name: str, python: Path, spec_file: Path, log: Path) -> None:
        self.name, self.log = name, log
        self.seconds = 0.0
        self.tokens = self.positions = self.trainable = 0
        self.first_loss = self.memory_gb = 0.0
        env = {**os.environ, "PYTHONPATH": ""}  # the peer's own environment, with nothing of ours forced in
        self.process = subprocess.Popen(
            [str(python), str(REPO / "benchmarks" / "peer_worker.py"), name, str(spec_file)], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)

    def receive(self) -> Dict[str, Any]:
        for line in self.process.stdout:
            if line.startswith(ANSWER):
                return json.loads(line[len(ANSWER):])
        tail = self.log.read_text().strip().splitlines()[-1:] or ["no output"]
        return {"error": f"the worker ended: {tail[0]}"}

    def order(self, **order: Any) -> Dict[str, Any]:
        self.process.stdin.write(json.dumps(order) + "\n")
        self.process.stdin.flush()
        answer = self.receive()
        if "error" in answer:
            raise UserError(f"{self.name} failed during the run: {answer['error']} (log: {self.log})")
        return answer

    def close(self) -> None:
        self.process.stdin.write(json.dumps({"do": "quit"}) + "\n")
        self.process.stdin.close()
        self.process.wait(timeout=60)


def find_python(name: str, given: Optional[Path], make_envs: bool, cache_dir: Path) -> Optional[Path]:
    """The Python to run `name` with: the one given, this one when it has the package, the made environment
    under `cache_dir` (made now with `make_envs`), or None after a one-line skip."""
    import importlib.util

    if given is not None:
        if not Path(given).is_file():
            print(f"skip {name}: --{name}_python {given} not found")
            return None
        return Path(given)
    if importlib.util.find_spec(MODULES[name]) is not None:
        return Path(sys.executable)
    env_dir = cache_dir / name
    python = env_dir / "bin" / "python"
    if python.is_file():
        return python
    if not make_envs:
        print(f"skip {name}: not installed here, no --{name}_python, and --make_envs false")
        return None
    print(f"making the {name} environment in {env_dir}: pip install {' '.join(REQUIREMENTS[name])} (minutes)")
    venv.EnvBuilder(with_pip=True).create(env_dir)
    site_packages = next(env_dir.glob("lib/python*/site-packages"))
    # this environment's packages (torch above all) after the peer's own: no second torch to download
    here = [p for p in sys.path if p.endswith("site-packages")]
    (site_packages / "zz_lit_llama_base.pth").write_text("\n".join(here) + "\n")
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *REQUIREMENTS[name]], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        print(f"skip {name}: pip install failed: {lines[-1]}")
        import shutil

        shutil.rmtree(env_dir)
        return None
    return python


def make_examples(workload: str, paths, data_file: Path, micro_batch_size: int, max_seq_length: int, n_steps: int,
                  warmup_steps: int):
    """The examples (token ids and labels as lists) and the example indices of each warm-up and timed step."""
    n = micro_batch_size * n_steps
    if workload == "equal":
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, paths.config.vocab_size, (n, max_seq_length), generator=g).tolist()
        examples = [{"input_ids": row, "labels": row} for row in ids]
        steps = [list(range(i * micro_batch_size, (i + 1) * micro_batch_size)) for i in range(n_steps)]
    else:
        if not Path(data_file).is_file():
            raise UserError(f"--data_file {data_file} not found: the real workload needs Alpaca records")
        tokenizer = Tokenizer(paths.tokenizer)
        records = [{"input": "", **r} for r in json.loads(Path(data_file).read_text())]
        examples = []
        for record in records:
            sample = prepare_sample(record, tokenizer, max_seq_length)
            examples.append({"input_ids": sample["input_ids"].tolist(), "labels": sample["labels"].tolist()})
        steps = [batch_indices(len(examples), micro_batch_size, i, 0, 1, 1337) for i in range(n_steps)]
    return examples, steps[:warmup_steps], steps[warmup_steps:]


def load_script(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    run_cli(main)
