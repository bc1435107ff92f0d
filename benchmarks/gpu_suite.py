"""The GPU suite: one command that measures the 24 GB story on one CUDA GPU (about 10 to 20 minutes), or the
most important part of it in a short slot (--budget_s; see howto/gpu_suite.md).

    python benchmarks/gpu_suite.py                 # one CUDA GPU: appends every row to benchmarks/RESULTS.md
    python benchmarks/gpu_suite.py --budget_s 360  # the stages in order, skipping each that would not fit
    python benchmarks/gpu_suite.py --dry_run --budget_s 360   # the plan only: each stage's estimate
    python benchmarks/gpu_suite.py --smoke         # the same code on a CPU with tiny shapes (the tests run it)

Random weights of the real shapes (7B, TinyLlama-1.1B): they cost the same memory and time as real ones, and
no download is needed. Installs nothing: it needs torch with CUDA, lightning, sentencepiece and tqdm; a stage
that needs more (REQUIRES below: torchao, transformers and peft, jsonargparse) is skipped in one line when its
package is missing.

Stages, in order of importance, each adding its rows to its own table of benchmarks/RESULTS.md with the GPU's
name:
  lora     7B LoRA (query and value, r 8), micro batch 4, 256 and 512 tokens, with and without activation
           checkpointing: peak memory and tokens/s of a training step (benchmarks/finetune_memory.py)
  qlora    the same with the frozen base in NF4 (finetune/lora.py --quantize nf4; needs torchao)
  generate 7B bf16 greedy decoding with the KV cache (what generate.py and generate/lora.py run): base,
           LoRA merged, LoRA unmerged: tokens/s and peak memory
  peft     ours vs Hugging Face PEFT LoRA on the same 7B model and batches (benchmarks/lora_vs_peft.py), and
           the training speed levers one at a time against the same run: torch.compile, chunked
           cross-entropy, length-grouped batches (tokens/s, step peak memory, padding, compile time)
  packing  7B LoRA on real Alpaca records at 256 and 512 tokens: padded micro-batches against
           --group_by_length and --packing (packed rows through flash attention's variable-length kernel):
           tokens/s, step peak memory, padded positions (benchmarks/lora_vs_peft.py's lever rows)
  adapter  7B LLaMA-Adapter v1 and v2 at 256 tokens (the same)
  fsdp     full finetuning of a TinyLlama-1.1B shape through finetune/full.py --strategy fsdp on one GPU
           (bf16-mixed): tokens/s and peak memory from the run's summary.json
  quantized 7B int8 and int4 weight-only generation against bf16: logit and perplexity difference, weight
           bytes, tokens/s (benchmarks/quantized_generation.py; needs torchao)
  decode   7B batch-1 greedy decoding side by side with transformers: ours eager, compiled, int8 and int4
           (eager and compiled) against transformers' generate, eager and static cache + compile, with the %
           of the memory-bandwidth bound (benchmarks/generate_vs_hf.py; needs transformers and torchao, ~65 GB)
A stage that fails prints one line and the others still run; the exit code is then 1. Before each stage the
suite prints its estimate (benchmarks/suite_plan.py: FLOPs and bytes over the machine's matmul rate and
bandwidth, measured at the start); with --budget_s a stage whose estimate exceeds the time left is skipped.
"""

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import platform
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import finetune_memory, generate_vs_hf, lora_vs_peft, quantized_generation  # noqa: E402
from benchmarks.common import add_rows, sync_time, write_random_checkpoint  # noqa: E402
from benchmarks.suite_plan import Machine, measure_machine, stage_estimates  # noqa: E402
from lit_llama.data import prepare_dataset  # noqa: E402
from lit_llama.generation import generate  # noqa: E402
from lit_llama.lora import LoRAConfig, LoRALLaMA  # noqa: E402
from lit_llama.model import LLaMA, Config  # noqa: E402
from lit_llama.tokenizer import Tokenizer  # noqa: E402
from lit_llama.checkpoint import default_dtype

STAGES = ("lora", "qlora", "generate", "peft", "packing", "adapter", "fsdp", "quantized", "decode")  # most important first
REQUIRES = {"qlora": ["torchao"], "peft": ["transformers", "peft"], "packing": ["transformers", "peft"], "fsdp": ["jsonargparse"],
            "quantized": ["torchao"], "decode": ["transformers", "torchao"]}  # beyond torch, lightning, sentencepiece

FSDP_SECTION = """
## Full finetuning under FSDP (GPU suite)

`python benchmarks/gpu_suite.py` (stage fsdp): finetune/full.py with --strategy fsdp (FSDP2, one unit per
block) on random weights, Alpaca-style records of the offline demo set, AdamW; tokens/s over the training
iterations (validation and saving excluded) and the peak memory, from the run's summary.json.

| date | device | model | devices | precision | micro batch | max seq length | iterations | tokens/s | peak memory |
|---|---|---|---|---|---|---|---|---|---|
"""

GENERATE_SECTION = """
## Generation speed (GPU suite)

`python benchmarks/gpu_suite.py` (stage generate): lit_llama.generation.generate (what generate.py and
generate/*.py run: prefill, then one token at a time with the KV cache, eager), batch 1, greedy, a 16-token
prompt, random weights (no end-of-text stop). LoRA: query and value, r 8, B random (a trained LoRA's cost).

| date | device | model | precision | weights | new tokens | tokens/s | peak memory |
|---|---|---|---|---|---|---|---|
"""


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="run every stage on the CPU with tiny shapes (a check of the code, not a measurement)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--results_file", type=Path, default=None,
                        help="Markdown file for the rows (default: benchmarks/RESULTS.md on a GPU; with --smoke none)")
    parser.add_argument("--work_dir", type=Path, default=None,
                        help="folder for the temporary checkpoint and data of the fsdp stage (default: a temp dir)")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="seconds the whole run may take (from its start): the stages run in order and each one "
                             "whose estimate exceeds the time left is skipped (default: no limit)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print each stage's estimate and whether it fits --budget_s, then stop (no CUDA needed "
                             "with the two --assume flags)")
    parser.add_argument("--assume_matmul_tflops", type=float, default=None,
                        help="with --dry_run: the machine's matmul rate (TFLOP/s, bf16) instead of measuring it")
    parser.add_argument("--assume_bandwidth_tbps", type=float, default=None,
                        help="with --dry_run: the machine's memory bandwidth (TB/s) instead of measuring it")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"error: --stages {','.join(unknown)}: not one of {','.join(STAGES)}", file=sys.stderr)
        return 1
    if args.budget_s is not None and args.budget_s < 0:
        print(f"error: --budget_s {args.budget_s:g}: expected 0 or more seconds", file=sys.stderr)
        return 1
    assumed = (args.assume_matmul_tflops, args.assume_bandwidth_tbps)
    if any(a is not None for a in assumed) and not (args.dry_run and all(a is not None and a > 0 for a in assumed)):
        print("error: --assume_matmul_tflops and --assume_bandwidth_tbps go together, positive, with --dry_run",
              file=sys.stderr)
        return 1
    assume = assumed[0] is not None
    if not args.smoke and not assume and not torch.cuda.is_available():
        print("error: no CUDA GPU here: the GPU suite measures on one CUDA GPU (--smoke checks its code on a CPU)",
              file=sys.stderr)
        return 1
    results_file = args.results_file
    if results_file is None and not args.smoke:
        results_file = REPO / "benchmarks" / "RESULTS.md"
    suite = Suite(smoke=args.smoke, results_file=results_file)
    if assume:
        machine = Machine("the assumed machine", args.assume_matmul_tflops * 1e12, args.assume_bandwidth_tbps * 1e12)
    else:
        print(suite.describe())
        machine = measure_machine(suite.device, torch.bfloat16, suite.device_name())
    estimates = stage_estimates(suite, machine)
    print(f"estimates for {machine.describe()}" + (f"; budget {args.budget_s:.0f} s" if args.budget_s is not None
                                                       else ""))
    if args.dry_run:
        return print_plan(stages, estimates, args.budget_s)

    failed = []
    for stage in stages:
        t0 = time.perf_counter()
        left = None if args.budget_s is None else args.budget_s - (t0 - start)
        missing = [name for name in REQUIRES.get(stage, []) if importlib.util.find_spec(name) is None]
        print(f"\n=== {stage}: estimate {estimates[stage]:.0f} s"
              + ("" if left is None else f", {max(left, 0):.0f} s of the budget left") + suite.held_memory()
              + " ===", flush=True)
        if missing:
            print(f"=== {stage}: skipped: needs {', '.join(missing)} (not installed) ===", flush=True)
            continue
        if left is not None and estimates[stage] > left:
            print(f"=== {stage}: skipped: its estimate does not fit the budget ===", flush=True)
            continue
        try:
            with tempfile.TemporaryDirectory(dir=args.work_dir) as work_dir:
                getattr(suite, stage)(Path(work_dir))
        except Exception as e:  # noqa: BLE001 - one failed stage must not cost the others' rows
            traceback.print_exc()
            print(f"stage {stage} failed: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(stage)
        finally:
            suite.free_memory()
        print(f"=== {stage}: {time.perf_counter() - t0:.0f} s ===", flush=True)
    print(f"\nsuite: {time.perf_counter() - start:.0f} s")
    if results_file:
        print(f"rows added to {results_file}")
    if failed:
        print(f"error: stages failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def print_plan(stages: List[str], estimates: Dict[str, float], budget_s: Optional[float]) -> int:
    """--dry_run: the stages in order with their estimates, as the budget would run or skip them."""
    total = 0.0
    for stage in stages:
        fits = budget_s is None or total + estimates[stage] <= budget_s
        total += estimates[stage] if fits else 0
        print(f"{stage:10} {estimates[stage]:7.0f} s  {'run' if fits else 'skip'}  (total {total:.0f} s)")
    return 0


class Suite:
    """The stages. With `smoke`, the same code with tiny shapes on the CPU: a check that nothing is broken
    before a GPU minute is spent, never a figure for RESULTS.md."""

    def __init__(self, smoke: bool, results_file: Optional[Path]) -> None:
        self.smoke, self.results_file = smoke, results_file
        self.device = torch.device("cpu" if smoke else "cuda")
        self.size_7b = "tiny" if smoke else "7B"
        self.size_1b = "tiny-gqa" if smoke else "TinyLlama-1.1B"
        self.lengths = [64, 128] if smoke else [256, 512]
        self.precision = "bf16-true"  # frozen weights in bf16, trainable ones in float32, as finetune/*.py do
        # the stages' amounts of work, which benchmarks/suite_plan.py's estimates read too
        self.micro_batch_size, self.train_steps = 4, 5
        self.peft_steps, self.peft_warmup = (2, 1) if smoke else (10, 3)
        # packing stage: 24 steps of 4 cover the 102-record Alpaca sample, so grouped batches see every example
        self.packing_steps, self.packing_warmup = (2, 1) if smoke else (24, 3)
        self.new_tokens = 16 if smoke else 128  # generate stage
        self.text_tokens = 64 if smoke else 256  # quantized stage
        self.decode_tokens, self.decode_repeats = (8, 1) if smoke else (128, 3)  # decode stage
        self.fsdp_precision, self.fsdp_micro_batch, self.fsdp_iterations = (
            ("32-true", 2, 4) if smoke else ("bf16-mixed", 4, 40))
        self.fsdp_tokens = self.fsdp_micro_batch * self.lengths[1] * self.fsdp_iterations

    def describe(self) -> str:
        import lightning

        versions = f"torch {torch.__version__}, lightning {lightning.__version__}"
        for name, stage in (("transformers", "peft"), ("peft", "peft"), ("torchao", "qlora")):
            try:
                versions += f", {name} {importlib.metadata.version(name)}"
            except importlib.metadata.PackageNotFoundError:
                versions += f", {name} missing (the {stage} stage will fail)"
        device = "CPU smoke run (tiny shapes; no figures)" if self.smoke else torch.cuda.get_device_name()
        return f"GPU suite on {device}; {versions}"

    def free_memory(self) -> None:
        """Releases what a stage left behind, so that the next stage's peak is its own. torch.compile's caches
        hold the compiled model (a whole 7B in the peft stage) until dynamo is reset: on an H200 the adapter and
        fsdp rows after it read 13 GB high before this reset was added."""
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def held_memory(self) -> str:
        """The device memory still allocated between stages (0 when nothing leaked)."""
        if self.device.type != "cuda":
            return ""
        return f", {torch.cuda.memory_allocated() / 1e9:.2f} GB held"

    def lora(self, work_dir: Path) -> None:
        for checkpointing in (False, True):
            finetune_memory.main(self.size_7b, "lora", self.device.type, self.precision,
                                 micro_batch_size=self.micro_batch_size, seq_lengths=self.lengths,
                                 steps=self.train_steps, activation_checkpointing=checkpointing,
                                 results_file=self.results_file)
            self.free_memory()

    def qlora(self, work_dir: Path) -> None:
        """LoRA on a base in NF4 (finetune/lora.py --quantize nf4)."""
        finetune_memory.main(self.size_7b, "lora", self.device.type, self.precision,
                             micro_batch_size=self.micro_batch_size, seq_lengths=self.lengths, steps=self.train_steps,
                             quantize="nf4", results_file=self.results_file)

    def adapter(self, work_dir: Path) -> None:
        for method in ("adapter", "adapter_v2"):
            finetune_memory.main(self.size_7b, method, self.device.type, self.precision,
                                 micro_batch_size=self.micro_batch_size, seq_lengths=self.lengths[:1],
                                 steps=self.train_steps, results_file=self.results_file)
            self.free_memory()

    def peft(self, work_dir: Path) -> None:
        lora_vs_peft.main(self.size_7b, micro_batch_size=self.micro_batch_size, max_seq_length=self.lengths[0],
                          steps=self.peft_steps, warmup_steps=self.peft_warmup,
                          device=self.device.type, precision=self.precision, data=self.peft_data(), levers=True,
                          results_file=self.results_file)

    def packing(self, work_dir: Path) -> None:
        """Padded batches against --group_by_length and --packing, the same examples, at each length."""
        for length in self.lengths:
            lora_vs_peft.main(self.size_7b, micro_batch_size=self.micro_batch_size, max_seq_length=length,
                              steps=self.packing_steps, warmup_steps=self.packing_warmup, device=self.device.type,
                              precision=self.precision, data=self.peft_data(), group_by_length=True, packing=True,
                              results_file=self.results_file)
            self.free_memory()

    def peft_data(self) -> str:
        """Real Alpaca records where ../shared is beside the repository (and the vocabulary is LLaMA's)."""
        shared = REPO.parent / "shared"
        have = (shared / "data" / "alpaca_sample.json").is_file() and (shared / "tokenizers" / "llama").is_dir()
        return "alpaca" if have and not self.smoke else "random"

    def fsdp(self, work_dir: Path) -> None:
        """finetune/full.py --strategy fsdp --devices 1 on a random checkpoint of the 1.1B shape."""
        finetune_full = load_script(REPO / "finetune" / "full.py")
        config = Config.from_name(self.size_1b)
        checkpoint_dir, data_dir, out_dir = work_dir / "checkpoint", work_dir / "data", work_dir / "out"
        write_random_checkpoint(config, checkpoint_dir, self.device)
        tokenizer = Tokenizer(checkpoint_dir / "tokenizer.model")
        records = json.loads((REPO / "lit_llama" / "demo_instructions.json").read_text())
        prepare_dataset(records, tokenizer, data_dir, test_split_size=8, seed=42, max_example_tokens=self.lengths[1])
        precision, micro_batch_size, iterations = self.fsdp_precision, self.fsdp_micro_batch, self.fsdp_iterations
        finetune_full.setup(
            checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, precision=precision, devices=1,
            strategy="fsdp", batch_size=micro_batch_size * 4, micro_batch_size=micro_batch_size,
            max_iters=iterations, warmup_iters=2, eval_interval=0, eval_iters=2, save_interval=0,
            max_seq_length=self.lengths[1],
        )
        summary = json.loads((out_dir / "summary.json").read_text())
        row = (f"| {date.today()} | {self.device_name()} | {self.size_1b} | 1 | {precision} | {micro_batch_size} | "
               f"{self.lengths[1]} | {iterations} | {summary['tokens_per_sec']:.0f} | "
               f"{summary['peak_memory_gb']:.2f} GB |")
        self.report(FSDP_SECTION, [row])

    def generate(self, work_dir: Path) -> None:
        config = Config.from_name(self.size_7b)
        new_tokens = self.new_tokens
        prompt = torch.randint(3, config.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
        prompt = prompt.to(self.device)
        torch.manual_seed(0)
        with self.device, default_dtype(torch.bfloat16):
            base = LLaMA(config).eval()
        rows = [self.decode_row(base, prompt, new_tokens, "base")]
        with torch.device("meta"), default_dtype(torch.bfloat16):
            model = LoRALLaMA(config, LoRAConfig(r=8, alpha=16, dropout=0.0))
        model.to_empty(device=self.device)
        model.load_state_dict(base.state_dict(), strict=False)
        del base
        self.free_memory()
        with torch.no_grad():
            for layer in model.lora_layers():
                layer.reset_extra_parameters()
                layer.lora_B.normal_(std=0.01)  # a trained LoRA's B is not zero: its branch costs what it costs
        model.eval()
        rows.append(self.decode_row(model, prompt, new_tokens, "LoRA unmerged"))
        model.merge_lora()
        rows.append(self.decode_row(model, prompt, new_tokens, "LoRA merged"))
        self.report(GENERATE_SECTION, rows)

    def quantized(self, work_dir: Path) -> None:
        quantized_generation.main(None if self.smoke else self.size_7b, ["int8"] if self.smoke else ["int8", "int4"],
                                  self.device.type, text_tokens=self.text_tokens,
                                  results_file=self.results_file)

    def decode(self, work_dir: Path) -> None:
        """Ours vs transformers (benchmarks/generate_vs_hf.py). The smoke run leaves out the compiled variants:
        tests/test_benchmarks.py runs those on the CPU already."""
        implementations = ["ours", "ours-int8", "hf"] if self.smoke else None
        generate_vs_hf.main(self.size_7b, self.device.type, new_tokens=self.decode_tokens,
                            repeats=self.decode_repeats, implementations=implementations,
                            results_file=self.results_file)

    def decode_row(self, model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, weights: str) -> str:
        generate(model, prompt, 4, temperature=0.0)  # warm-up: kernels, allocator
        self.free_memory()
        rates = []
        for _ in range(3):
            t0 = sync_time(self.device)
            output = generate(model, prompt, new_tokens, temperature=0.0)
            rates.append((output.size(0) - prompt.size(0)) / (sync_time(self.device) - t0))
        peak = torch.cuda.max_memory_allocated() / 1e9 if self.device.type == "cuda" else float("nan")
        rate = sorted(rates)[1]  # the median of three
        print(f"{weights}: {rate:.1f} tokens/s, peak {peak:.2f} GB")
        return (f"| {date.today()} | {self.device_name()} | {self.size_7b} | bf16-true | {weights} | {new_tokens} | "
                f"{rate:.1f} | {peak:.2f} GB |")

    def report(self, section: str, rows: List[str]) -> None:
        print("\n".join(rows))
        if self.results_file:
            add_rows(self.results_file, section, rows)

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name()
        return f"CPU {platform.machine()}, smoke run"


def load_script(path: Path):
    """A repository script as a module, to call its setup() in this process (no command line to parse)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



if __name__ == "__main__":
    sys.exit(main())
