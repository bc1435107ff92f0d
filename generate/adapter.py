"""Generate a response with a LLaMA-Adapter-finetuned model: the base checkpoint plus the adapter file.

    python generate/adapter.py --checkpoint_dir checkpoints/lit-llama/7B \
        --adapter_path out/adapter/alpaca/lit-llama-adapter-finetuned.pth \
        --prompt "Please explain how weight decay works"

The instruction is wrapped in the prompt style the adapter was finetuned with (recorded in the adapter file;
Alpaca for files from before styles). The adapter file says which model to build (v1 or v2, prompt length, start layer); it must have been
trained on this base model.
"""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.adapter import adapter_prompt_style, load_adapter_model
from lit_llama.checkpoint import load_state_dict, resolve_checkpoint
from lit_llama.cli import run_cli
from lit_llama.generation import check_sampling_flags, respond_and_report, setup_generation
from lit_llama.prompts import get_prompt_style
from lit_llama.quantize import check_generate_quantize, quantize_for_generation


def main(
    prompt: str = "What food do llamas eat?",
    input: str = "",
    adapter_path: Path = Path("out/adapter/alpaca/lit-llama-adapter-finetuned.pth"),
    checkpoint_dir: Optional[Path] = Path("checkpoints/lit-llama/7B"),
    pretrained_path: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
    num_samples: int = 1,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    seed: int = 1234,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    prompt_style: Optional[str] = None,
) -> None:
    """Responds to an instruction with a LLaMA-Adapter-finetuned model.

    Args:
        prompt: The instruction.
        input: Optional context for the instruction (the template's "### Input:" section).
        adapter_path: The adapter checkpoint written by finetune/adapter.py (its version, prompt length and
            start layer are read from it).
        checkpoint_dir: The base model folder the adapter was trained on.
        pretrained_path: The article's / Lit-LLaMA's flag: the base weights .pth (instead of --checkpoint_dir).
        tokenizer_path: Lit-LLaMA's original flag: the tokenizer (default: beside the weights).
        num_samples: How many responses to sample.
        max_new_tokens: The most tokens per response.
        temperature: Sampling temperature; 0 is greedy decoding.
        top_k: Sample only among the k most likely tokens.
        seed: Random seed, for repeatable samples.
        precision: 32-true, 16-true or bf16-true (default: bf16-true on a GPU that has it, else 32-true).
        quantize: int8 (CPU or GPU) or int4 (CUDA GPUs): weight-only quantized linear layers for generation,
            through torchao: a half or a quarter of the bf16 weight bytes to read per token.
        compile: torch.compile the prefill and the decode step (gpt-fast's recipe: a static KV cache, no host sync
            per token, CUDA graphs on a GPU): faster decoding after a one-time compilation, printed apart.
        prompt_style: alpaca, llama2-chat, chatml or llama3; default: the style recorded in the adapter file (the
            one it was trained with). Give it only to override that.
    """
    check_sampling_flags(num_samples, max_new_tokens, temperature, top_k, seed)
    check_generate_quantize(quantize)
    paths = resolve_checkpoint(checkpoint_dir, pretrained_path, tokenizer_path)
    trained_with = adapter_prompt_style(load_state_dict(adapter_path), adapter_path)
    style = get_prompt_style(prompt_style or trained_with)
    print(f"prompt style: {style.name}" + (" (from the adapter file)" if prompt_style is None else
                                           f" (the adapter was trained with {trained_with})"), file=sys.stderr)
    tokenizer, device, dtype = setup_generation(paths, precision, style.prompt(prompt, input), max_new_tokens)

    model = load_adapter_model(paths, adapter_path, device, dtype)
    model.eval()
    if quantize:
        quantize_for_generation(model, quantize)
    respond_and_report(model, tokenizer, prompt, input, num_samples, max_new_tokens, temperature, top_k, seed, device,
                       style.name, compiled=compile)


if __name__ == "__main__":
    run_cli(main)
