"""The GPU suite: one command that measures the 24 GB story on one CUDA GPU (about 10 to 20 minutes).

    python benchmarks/gpu_suite.py                 # one CUDA GPU: appends every row to benchmarks/RESULTS.md
    python benchmarks/gpu_suite.py --smoke         # the same code on a CPU with tiny shapes (the tests run it)

Random weights of the real shapes (7B, TinyLlama-1.1B): they cost the same memory and time as real ones, and
no download is needed. Installs nothing: it needs torch with CUDA, lightning, sentencepiece and tqdm; the
qlora stage needs torchao and the peft stage transformers and peft (a stage whose package is missing fails
alone, with one line). It calls the finetune scripts' functions in-process, so jsonargparse is not needed.

Stages, each adding its rows to its own table of benchmarks/RESULTS.md with the GPU's name:
  lora     7B LoRA (query and value, r 8), micro batch 4, 256 and 512 tokens, with and without activation
           checkpointing: peak memory and tokens/s of a training step (benchmarks/finetune_memory.py)
  qlora    the same with the frozen base in NF4 (finetune/lora.py --quantize nf4; needs torchao)
  adapter  7B LLaMA-Adapter v1 and v2 at 256 tokens (the same)
  peft     ours vs Hugging Face PEFT LoRA on the same 7B model and batches (benchmarks/lora_vs_peft.py), and
           the training speed levers one at a time against the same run: torch.compile, chunked
           cross-entropy, length-grouped batches (tokens/s, step peak memory, padding, compile time)
  fsdp     full finetuning of a TinyLlama-1.1B shape through finetune/full.py --strategy fsdp on one GPU
           (bf16-mixed): tokens/s and peak memory from the run's summary.json
  generate 7B bf16 greedy decoding with the KV cache (what generate.py and generate/lora.py run): base,
           LoRA merged, LoRA unmerged: tokens/s and peak memory
  quantized 7B int8 and int4 weight-only generation against bf16: logit and perplexity difference, weight
           bytes, tokens/s (benchmarks/quantized_generation.py; needs torchao)
  decode   7B batch-1 greedy decoding side by side with transformers: ours eager, compiled, int8 and int4
           (eager and compiled) against transformers' generate, eager and static cache + compile, with the %
           of the memory-bandwidth bound (benchmarks/generate_vs_hf.py; needs transformers and torchao, ~65 GB)
A stage that fails prints one line and the others still run; the exit code is then 1.
"""

import argparse
import importlib.metadata
import json
import platform
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path
from typing import List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import finetune_memory, generate_vs_hf, lora_vs_peft, quantized_generation  # noqa: E402
from benchmarks.common import add_rows, sync_time, write_random_checkpoint  # noqa: E402
from lit_llama.data import prepare_dataset  # noqa: E402
from lit_llama.generation import generate  # noqa: E402
from lit_llama.lora import LoRAConfig, LoRALLaMA  # noqa: E402
from lit_llama.model import LLaMA, Config  # noqa: E402
from lit_llama.tokenizer import Tokenizer  # noqa: E402
from lit_llama.checkpoint import default_dtype

STAGES = ("lora", "qlora", "adapter", "peft", "fsdp", "generate", "quantized", "decode")

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
    args = parser.parse_args(argv)

    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"error: --stages {','.join(unknown)}: not one of {','.join(STAGES)}", file=sys.stderr)
        return 1
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here: the GPU suite measures on one CUDA GPU (--smoke checks its code on a CPU)",
              file=sys.stderr)
        return 1
    results_file = args.results_file
    if results_file is None and not args.smoke:
        results_file = REPO / "benchmarks" / "RESULTS.md"
    suite = Suite(smoke=args.smoke, results_file=results_file)
    print(suite.describe())

    failed = []
    for stage in stages:
        t0 = time.perf_counter()
        print(f"\n=== {stage} ===", flush=True)
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
    if results_file:
        print(f"\nrows added to {results_file}")
    if failed:
        print(f"error: stages failed: {', '.join(failed)}", file=sys.stderr)
        return 1
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
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def lora(self, work_dir: Path) -> None:
        for checkpointing in (False, True):
            finetune_memory.main(self.size_7b, "lora", self.device.type, self.precision, micro_batch_size=4,
                                 seq_lengths=self.lengths, steps=5, activation_checkpointing=checkpointing,
                                 results_file=self.results_file)
            self.free_memory()

    def qlora(self, work_dir: Path) -> None:
        """LoRA on a base in NF4 (finetune/lora.py --quantize nf4)."""
        finetune_memory.main(self.size_7b, "lora", self.device.type, self.precision, micro_batch_size=4,
                             seq_lengths=self.lengths, steps=5, quantize="nf4", results_file=self.results_file)

    def adapter(self, work_dir: Path) -> None:
        for method in ("adapter", "adapter_v2"):
            finetune_memory.main(self.size_7b, method, self.device.type, self.precision, micro_batch_size=4,
                                 seq_lengths=self.lengths[:1], steps=5, results_file=self.results_file)
            self.free_memory()

    def peft(self, work_dir: Path) -> None:
        lora_vs_peft.main(self.size_7b, micro_batch_size=4, max_seq_length=self.lengths[0],
                          steps=2 if self.smoke else 10, warmup_steps=1 if self.smoke else 3,
                          device=self.device.type, precision=self.precision, data=self.peft_data(), levers=True,
                          results_file=self.results_file)

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
        precision, micro_batch_size, iterations = ("32-true", 2, 4) if self.smoke else ("bf16-mixed", 4, 40)
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
        new_tokens = 16 if self.smoke else 128
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
                                  self.device.type, text_tokens=64 if self.smoke else 256,
                                  results_file=self.results_file)

    def decode(self, work_dir: Path) -> None:
        """Ours vs transformers (benchmarks/generate_vs_hf.py). The smoke run leaves out the compiled variants:
        tests/test_benchmarks.py runs those on the CPU already."""
        implementations = ["ours", "ours-int8", "hf"] if self.smoke else None
        generate_vs_hf.main(self.size_7b, self.device.type, new_tokens=8 if self.smoke else 128,
                            repeats=1 if self.smoke else 3, implementations=implementations,
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
