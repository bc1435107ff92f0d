"""Autoregressive sampling with the KV cache: prefill the prompt once, then one token at a time."""

import sys
import time
from typing import List, Optional, Tuple

import torch

from lit_llama.checks import check_at_least, check_range
from lit_llama.data import generate_prompt
from lit_llama.model import LLaMA
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import CheckpointPaths, UserError, check_vocab, default_device, precision_dtype


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None) -> torch.Tensor:
    """Picks the next token from the last position's logits (B, vocab); temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1)


@torch.inference_mode()
def generate(
    model: LLaMA,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    eos_id: Optional[int] = None,
    use_kv_cache: bool = True,
) -> torch.Tensor:
    """Returns the prompt (1-D tensor of token ids) followed by up to `max_new_tokens` new tokens,
    stopping after `eos_id`. Without the KV cache every step re-reads the whole sequence (slow; tests
    use it to check that the cache changes nothing)."""
    max_seq_length = min(prompt.size(0) + max_new_tokens, model.config.block_size)
    if prompt.size(0) >= max_seq_length:
        raise ValueError(f"the prompt has {prompt.size(0)} tokens; the model's block size is {model.config.block_size}")
    tokens = prompt.unsqueeze(0)
    if use_kv_cache:
        model.set_kv_cache(batch_size=1, max_seq_length=max_seq_length, device=prompt.device)
    try:
        input_pos = torch.arange(prompt.size(0), device=prompt.device)
        next_input = tokens
        while tokens.size(1) < max_seq_length:
            if use_kv_cache:
                logits = model(next_input, input_pos)
            else:
                logits = model(tokens)
            next_token = sample(logits[:, -1], temperature, top_k)
            tokens = torch.cat((tokens, next_token), dim=1)
            if eos_id is not None and next_token.item() == eos_id:
                break
            next_input, input_pos = next_token, input_pos[-1:] + 1
    finally:
        if use_kv_cache:
            model.clear_kv_cache()
    return tokens[0]


def check_sampling_flags(
    num_samples: int, max_new_tokens: int, temperature: float, top_k: Optional[int], seed: int
) -> None:
    """The flags every generate script shares, checked before anything is loaded."""
    check_at_least("num_samples", num_samples, 1)
    check_at_least("max_new_tokens", max_new_tokens, 1)
    check_range("temperature", temperature, 0, 100)  # 0 is greedy; far above 1 is noise
    check_at_least("top_k", top_k, 1, optional=True)
    check_range("seed", seed, 0, 2**63 - 1)


def setup_generation(
    paths: CheckpointPaths, precision: Optional[str], prompt: str, max_new_tokens: int
) -> Tuple[Tokenizer, torch.device, torch.dtype]:
    """The checkpoint's tokenizer (checked against the model), the device and the weights' dtype; and the
    `prompt` (as the model will read it) checked to leave room in the model's context, before any weights load."""
    tokenizer = Tokenizer(paths.tokenizer)
    check_vocab(tokenizer, paths)
    context = paths.config.block_size
    if max_new_tokens > context:
        raise UserError(f"--max_new_tokens {max_new_tokens} is more than the model's context of {context} tokens")
    prompt_tokens = len(tokenizer.encode(prompt, bos=True))
    if prompt_tokens >= context:
        raise UserError(f"--prompt is {prompt_tokens} tokens: the model's context is {context} (with the answer)")
    return tokenizer, default_device(), precision_dtype(precision)


def report_speed(new_tokens: int, seconds: float, device: torch.device) -> None:
    """Prints generation speed (and peak GPU memory) to stderr, so stdout holds only the text."""
    print(f"Time: {seconds:.2f} s, {new_tokens / seconds:.2f} tokens/s", file=sys.stderr)
    if device.type == "cuda":
        print(f"Peak memory: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB", file=sys.stderr)


def generate_response(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    instruction: str,
    input: str = "",
    device: Optional[torch.device] = None,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
) -> str:
    """Wraps the instruction in the Alpaca template, generates, and returns only the response text."""
    was_training = model.training
    model.eval()
    prompt = tokenizer.encode(generate_prompt(instruction, input), bos=True, device=device)
    max_new_tokens = min(max_new_tokens, model.config.block_size - prompt.size(0))
    output = generate(model, prompt, max_new_tokens, temperature, top_k, eos_id=tokenizer.eos_id)
    model.train(was_training)
    return tokenizer.decode(output[prompt.size(0) :]).strip()


def respond_and_report(
    model: LLaMA,
    tokenizer: Tokenizer,
    instruction: str,
    input: str,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    seed: int,
    device: torch.device,
) -> List[str]:
    """What every generate/*.py script does once its model is built: respond to the instruction
    `num_samples` times, printing each response (stdout) with its speed and memory (stderr)."""
    torch.manual_seed(seed)
    responses = []
    for _ in range(num_samples):
        t0 = time.perf_counter()
        response = generate_response(model, tokenizer, instruction, input, device, max_new_tokens, temperature, top_k)
        elapsed = time.perf_counter() - t0
        print(response)
        report_speed(len(tokenizer.encode(response, bos=False)), elapsed, device)
        responses.append(response)
    return responses
