"""Generate a response with a LoRA-finetuned model: the base checkpoint plus the LoRA file.

    python generate/lora.py --checkpoint_dir checkpoints/lit-llama/7B \
        --lora_path out/lora/alpaca/lit-llama-lora-finetuned.pth --prompt "Please explain how weight decay works"

The instruction is wrapped in the prompt style the LoRA was finetuned with (recorded in the LoRA file;
Alpaca for files from before styles). By default the
LoRA update is merged into the weights at load time (W + alpha/r * B A), so generation is as fast as the
base model's; `--merge false` keeps the LoRA branch separate (same output, slower).
"""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.checkpoint import resolve_checkpoint
from lit_llama.cli import UserError, run_cli
from lit_llama.generation import check_sampling_flags, respond_and_report, setup_generation
from lit_llama.lora import lora_prompt_style, read_lora_checkpoint
from lit_llama.lora_tree import load_leaf_model
from lit_llama.prompts import get_prompt_style
from lit_llama.quantize import check_generate_quantize, quantize_for_generation


def main(
    prompt: str = "What food do llamas eat?",
    input: str = "",
    lora_path: Path = Path("out/lora/alpaca/lit-llama-lora-finetuned.pth"),
    checkpoint_dir: Optional[Path] = Path("checkpoints/lit-llama/7B"),
    pretrained_path: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
    merge: bool = True,
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
    """Responds to an instruction with a LoRA-finetuned model.

    Args:
        prompt: The instruction.
        input: Optional context for the instruction (the template's "### Input:" section).
        lora_path: The LoRA checkpoint written by finetune/lora.py (its r, alpha and targets are read from it). A
            leaf of a LoRA tree (--parent_lora) brings its ancestors: the files it records, checked unchanged.
        checkpoint_dir: The base model folder the LoRA weights were trained on.
        pretrained_path: The article's / Lit-LLaMA's flag: the base weights .pth (instead of --checkpoint_dir).
        tokenizer_path: Lit-LLaMA's original flag: the tokenizer (default: beside the weights).
        merge: Merge the LoRA weights into the base weights at load time (no extra latency or memory).
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
        prompt_style: alpaca, llama2-chat, chatml or llama3; default: the style recorded in the LoRA file (the one
            it was trained with). Give it only to override that.
    """
    check_sampling_flags(num_samples, max_new_tokens, temperature, top_k, seed)
    check_generate_quantize(quantize)
    if quantize and not merge:
        raise UserError("--quantize needs --merge true: the LoRA is merged into the weights before they are quantized")
    paths = resolve_checkpoint(checkpoint_dir, pretrained_path, tokenizer_path)
    trained_with = lora_prompt_style(read_lora_checkpoint(lora_path), lora_path)
    style = get_prompt_style(prompt_style or trained_with)
    print(f"prompt style: {style.name}" + (" (from the LoRA file)" if prompt_style is None else
                                           f" (the LoRA was trained with {trained_with})"), file=sys.stderr)
    tokenizer, device, dtype = setup_generation(paths, precision, style.prompt(prompt, input), max_new_tokens)

    model = load_leaf_model(paths, lora_path, device, dtype, merge)  # a leaf of a LoRA tree: its whole path
    model.eval()
    if quantize:  # after merging: the quantized weights hold the update
        quantize_for_generation(model, quantize)
    respond_and_report(model, tokenizer, prompt, input, num_samples, max_new_tokens, temperature, top_k, seed, device,
                       style.name, compiled=compile)


if __name__ == "__main__":
    run_cli(main)
