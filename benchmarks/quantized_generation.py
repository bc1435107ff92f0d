"""Quantized generation (generate.py --quantize): what int8 / int4 weight-only weights change and what they save.

    python benchmarks/quantized_generation.py                                   # CPU: int8, a small LLaMA shape
    python benchmarks/quantized_generation.py --model_size 7B --device cuda --modes '[int8, int4]'

On the same random weights and a fixed text (the repository's demo instructions, tokenized with the real
LLaMA tokenizer from ../shared when it is there, else a fixed random token sequence), for the full-precision
model (bf16 on a GPU, float32 on a CPU) and each quantized one: the largest logit difference (relative to the
largest logit), the perplexity of the text, the weight bytes of the linear layers, and greedy decoding
tokens/s (batch 1, 64 new tokens, eager). Adds the rows to benchmarks/RESULTS.md.
"""

import json
import platform
import sys
from datetime import date
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows, sync_time  # noqa: E402
from lit_llama.generation import generate  # noqa: E402
from lit_llama.model import Config, LLaMA  # noqa: E402
from lit_llama.quantize import check_generate_quantize, quantize_for_generation  # noqa: E402
from lit_llama.checkpoint import default_dtype
from lit_llama.cli import UserError, run_cli

RESULTS_HEADER = """
## Quantized generation: what it changes, what it saves

`python benchmarks/quantized_generation.py`: the same random weights, full precision against weight-only
int8 / int4 (torchao; LoRA merged first in generate/lora.py); a fixed text (the demo instructions); batch-1
greedy decoding of 64 tokens, eager. Logit difference relative to the largest logit.

| date | machine | model | weights | linear weight bytes | max logit difference | perplexity of the text | decode tokens/s |
|---|---|---|---|---|---|---|---|
"""

# a LLaMA shape small enough for a CPU: 4 layers of width 512, the real 32k vocabulary
SMALL = dict(n_layer=4, n_head=8, n_embd=512, intermediate_size=1376, vocab_size=32000, block_size=512)


def main(
    model_size: Optional[str] = None,
    modes: List[str] = ["int8"],
    device: str = "cpu",
    text_tokens: int = 256,
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> None:
    """Compares quantized weights with full-precision ones on one model.

    Args:
        model_size: A named size from lit_llama/model.py (e.g. 7B); default: a 4-layer, 512-wide LLaMA.
        modes: Which of int8 (CPU or GPU) and int4 (CUDA) to measure.
        device: cpu or cuda.
        text_tokens: Tokens of the fixed text the logits and perplexity are computed on.
        results_file: Markdown file to add the rows to ("" for none).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU here")
    for mode in modes:
        check_generate_quantize(mode)
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    config = Config.from_name(model_size) if model_size else Config(**SMALL)
    shape = model_size or "4x512 (32k vocab)"
    tokens, source = fixed_text(config, text_tokens)
    tokens = tokens.to(dev)
    print(f"text: {source}, {tokens.numel()} tokens")
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"

    rows, reference = [], None
    for mode in [None, *modes]:
        torch.manual_seed(0)
        with dev, default_dtype(dtype):
            model = LLaMA(config).eval()
        if mode:
            quantize_for_generation(model, mode)
        with torch.no_grad():
            logits = model(tokens.unsqueeze(0))[0].float()
        if reference is None:
            reference = logits
        difference = (logits - reference).abs().max().item() / reference.abs().max().item()
        perplexity = torch.exp(F.cross_entropy(logits[:-1], tokens[1:])).item()
        generate(model, tokens[:16], 4, temperature=0.0)  # warm-up
        t0 = sync_time(dev)
        new = generate(model, tokens[:16], 64, temperature=0.0).numel() - 16
        rate = new / (sync_time(dev) - t0)
        weights = linear_weight_bytes(model)
        name = mode or str(dtype).replace("torch.", "")
        print(f"{name}: linear weights {weights / 1e6:.1f} MB, max logit difference {difference:.2e}, "
              f"perplexity {perplexity:.1f}, {rate:.1f} tokens/s")
        rows.append(f"| {date.today()} | {machine} | {shape} | {name} | {weights / 1e6:.1f} MB | {difference:.2e} | "
                    f"{perplexity:.1f} | {rate:.1f} |")
        del model
    add_rows(results_file, RESULTS_HEADER, rows)


def fixed_text(config: Config, n: int):
    """The demo instructions, tokenized with the real LLaMA tokenizer when ../shared has it; else fixed random
    tokens."""
    tokenizer_path = SHARED / "tokenizers" / "llama" / "tokenizer.model"
    if tokenizer_path.is_file() and config.vocab_size == 32000:
        from lit_llama.tokenizer import Tokenizer

        records = json.loads((REPO / "lit_llama" / "demo_instructions.json").read_text())
        text = "\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in records)
        return Tokenizer(tokenizer_path).encode(text, bos=True)[:n], "the demo instructions, LLaMA tokenizer"
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, config.vocab_size, (n,), generator=g), "fixed random tokens"


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the linear layers' weights as stored (quantized tensors: their data and scales)."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            inner = [getattr(weight, name) for name in getattr(weight, "tensor_data_names", [])] or [weight]
            total += sum(t.numel() * t.element_size() for t in inner)
    return total


if __name__ == "__main__":
    run_cli(main)
