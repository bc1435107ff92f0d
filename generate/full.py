"""Generate a response with a fully finetuned model (the checkpoint of finetune/full.py).

    python generate/full.py --checkpoint_path out/full/alpaca/lit-llama-full-finetuned.pth \
        --prompt "Please explain how weight decay works"

The instruction is wrapped in the prompt template the model was finetuned with (--prompt_style, Alpaca by
default). The model config and tokenizer are read from beside the checkpoint (finetune/full.py writes them
into its --out_dir), or else from the base model folder --checkpoint_dir. The checkpoint is a file, or, from a
run with `--state_dict_type sharded`, a folder of FSDP shards: it is then put together here, in one process.
"""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.checkpoint import CONFIG_NAME, CheckpointPaths, load_model, load_sharded, resolve_checkpoint
from lit_llama.cli import UserError, run_cli
from lit_llama.data import generate_prompt
from lit_llama.generation import check_sampling_flags, respond_and_report, setup_generation
from lit_llama.model import Config
from lit_llama.quantize import check_generate_quantize, quantize_for_generation
from lit_llama.tokenizer import find_tokenizer


def main(
    prompt: str = "What food do llamas eat?",
    input: str = "",
    checkpoint_path: Path = Path("out/full/alpaca/lit-llama-full-finetuned.pth"),
    checkpoint_dir: Optional[Path] = Path("checkpoints/lit-llama/7B"),
    tokenizer_path: Optional[Path] = None,
    num_samples: int = 1,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    seed: int = 1234,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    prompt_style: str = "alpaca",
) -> None:
    """Responds to an instruction with a fully finetuned model.

    Args:
        prompt: The instruction.
        input: Optional context for the instruction (the template's "### Input:" section).
        checkpoint_path: The checkpoint written by finetune/full.py: a .pth file, or the folder of a
            --state_dict_type sharded run.
        checkpoint_dir: The base model folder, read for the model config and tokenizer only when there is
            no lit_config.json beside --checkpoint_path.
        tokenizer_path: Lit-LLaMA's original flag: the tokenizer (default: beside the checkpoint).
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
        prompt_style: The prompt style the model was finetuned with: alpaca, llama2-chat, chatml or llama3 (as
            given to the prepare script).
    """
    check_sampling_flags(num_samples, max_new_tokens, temperature, top_k, seed)
    check_generate_quantize(quantize)
    paths = resolve_finetuned(checkpoint_path, checkpoint_dir, tokenizer_path)
    tokenizer, device, dtype = setup_generation(paths, precision, generate_prompt(prompt, input), max_new_tokens)

    if paths.weights.is_dir():
        model = load_sharded(paths, device, dtype)
    else:
        model = load_model(paths, device, dtype)  # checks that every weight is there, with its shape
    model.eval()
    if quantize:
        quantize_for_generation(model, quantize)
    respond_and_report(model, tokenizer, prompt, input, num_samples, max_new_tokens, temperature, top_k, seed, device,
                       prompt_style, compiled=compile)


def resolve_finetuned(
    checkpoint_path: Path, checkpoint_dir: Optional[Path], tokenizer_path: Optional[Path]
) -> CheckpointPaths:
    """The finetuned weights, with the config and tokenizer beside them, or else those of --checkpoint_dir."""
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.exists():
        raise UserError(f"--checkpoint_path {checkpoint_path} does not exist")
    folder = checkpoint_path.parent
    if not (folder / CONFIG_NAME).is_file():
        if checkpoint_dir is None:
            raise UserError(f"no {CONFIG_NAME} beside {checkpoint_path}: give --checkpoint_dir, the base model folder")
        try:
            base = resolve_checkpoint(checkpoint_dir, None, tokenizer_path)
        except UserError as e:
            raise UserError(f"no {CONFIG_NAME} beside {checkpoint_path}, so the base model's is needed: {e}")
        return CheckpointPaths(checkpoint_path, base.config, base.tokenizer)
    try:
        config = Config.from_json(folder / CONFIG_NAME)
    except (ValueError, TypeError) as e:
        raise UserError(f"{folder / CONFIG_NAME} is not a valid model config: {e}")
    tokenizer_path = Path(tokenizer_path or find_tokenizer(folder))
    if not tokenizer_path.is_file():
        raise UserError(f"tokenizer {tokenizer_path} not found (give --tokenizer_path)")
    return CheckpointPaths(checkpoint_path, config, tokenizer_path)


if __name__ == "__main__":
    run_cli(main)
