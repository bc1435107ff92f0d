"""Generate text with a base (or merged) LLaMA checkpoint.

    python generate.py --checkpoint_dir checkpoints/lit-llama/open_llama_3b --prompt "Hello, my name is"
"""

import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere, installed or not

from lit_llama.checkpoint import load_model, resolve_checkpoint
from lit_llama.cli import run_cli
from lit_llama.generation import check_sampling_flags, generate, report_compilation, report_speed, setup_generation
from lit_llama.quantize import check_generate_quantize, quantize_for_generation


def main(
    prompt: str = "Hello, my name is",
    checkpoint_dir: Optional[Path] = None,
    checkpoint_path: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
    num_samples: int = 1,
    max_new_tokens: int = 50,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    seed: int = 1234,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
) -> None:
    """Samples from a pretrained model.

    Args:
        prompt: The text to continue.
        checkpoint_dir: A converted checkpoint folder (lit-llama.pth, lit_config.json, tokenizer.model).
        checkpoint_path: Lit-LLaMA's original flag: the .pth weights file (instead of --checkpoint_dir).
        tokenizer_path: Lit-LLaMA's original flag: the tokenizer.model (default: beside the weights).
        num_samples: How many samples to draw.
        max_new_tokens: The most tokens to generate per sample.
        temperature: Sampling temperature; 0 is greedy decoding (always the most likely token), as is one so small
            that logits / temperature overflow (e.g. 1e-45).
        top_k: Sample only among the k most likely tokens.
        seed: Random seed, for repeatable samples.
        precision: 32-true, 16-true or bf16-true (default: bf16-true on a GPU that has it, else 32-true).
        quantize: int8 (CPU or GPU) or int4 (CUDA GPUs): weight-only quantized linear layers for generation,
            through torchao: a half or a quarter of the bf16 weight bytes to read per token.
        compile: torch.compile the prefill and the decode step (gpt-fast's recipe: a static KV cache, no host sync
            per token, CUDA graphs on a GPU): faster decoding after a one-time compilation, printed apart.
    """
    check_sampling_flags(num_samples, max_new_tokens, temperature, top_k, seed)
    check_generate_quantize(quantize)
    paths = resolve_checkpoint(checkpoint_dir, checkpoint_path, tokenizer_path)
    tokenizer, device, dtype = setup_generation(paths, precision, prompt, max_new_tokens)

    t0 = time.perf_counter()
    model = load_model(paths, device, dtype).eval()
    if quantize:
        quantize_for_generation(model, quantize)
    print(f"Loaded {paths.weights} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)

    encoded = tokenizer.encode(prompt, bos=True, device=device)
    if compile:
        report_compilation(model, encoded, max_new_tokens, temperature, top_k)
    torch.manual_seed(seed)
    for _ in range(num_samples):
        t0 = time.perf_counter()
        output = generate(model, encoded, max_new_tokens, temperature, top_k, tokenizer.stop_ids,
                          compiled=compile)
        elapsed = time.perf_counter() - t0
        print(tokenizer.decode(output))
        report_speed(output.size(0) - encoded.size(0), elapsed, device)


if __name__ == "__main__":
    run_cli(main)
