"""Autoregressive sampling with the KV cache: prefill the prompt once, then one token at a time."""

import sys
import time
from typing import Callable, List, Optional, Tuple

import torch

from lit_llama.model import LLaMA
from lit_llama.prompts import DEFAULT_PROMPT_STYLE, get_prompt_style
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import CheckpointPaths, check_vocab, default_device, precision_dtype


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
    stop: Optional[Callable[[torch.Tensor], bool]] = None,
) -> torch.Tensor:
    """Returns the prompt (1-D tensor of token ids) followed by up to `max_new_tokens` new tokens,
    stopping after `eos_id`, or once `stop(new tokens so far)` is true (a prompt style's stop text). Without
    the KV cache every step re-reads the whole sequence (slow; tests
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
            if stop is not None and stop(tokens[0, prompt.size(0) :]):
                break
            next_input, input_pos = next_token, input_pos[-1:] + 1
    finally:
        if use_kv_cache:
            model.clear_kv_cache()
    return tokens[0]


def setup_generation(paths: CheckpointPaths, precision: Optional[str]) -> Tuple[Tokenizer, torch.device, torch.dtype]:
    """The checkpoint's tokenizer (checked against the model), the device and the weights' dtype."""
    tokenizer = Tokenizer(paths.tokenizer)
    check_vocab(tokenizer, paths)
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
    prompt_style: str = DEFAULT_PROMPT_STYLE,
) -> str:
    """Wraps the instruction in the prompt style's template (Alpaca by default), generates until EOS or the
    style's stop text, and returns only the response text (without the stop text)."""
    style = get_prompt_style(prompt_style)
    was_training = model.training
    model.eval()
    prompt = tokenizer.encode(style.prompt(instruction, input), bos=True, device=device)
    max_new_tokens = min(max_new_tokens, model.config.block_size - prompt.size(0))
    stop = (lambda new: style.cut_at_stop(tokenizer.decode(new))[1]) if style.stop_strings else None
    output = generate(model, prompt, max_new_tokens, temperature, top_k, eos_id=tokenizer.eos_id, stop=stop)
    model.train(was_training)
    return style.cut_at_stop(tokenizer.decode(output[prompt.size(0) :]))[0].strip()


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
    prompt_style: str = DEFAULT_PROMPT_STYLE,
) -> List[str]:
    """What every generate/*.py script does once its model is built: respond to the instruction
    `num_samples` times, printing each response (stdout) with its speed and memory (stderr)."""
    torch.manual_seed(seed)
    responses = []
    for _ in range(num_samples):
        t0 = time.perf_counter()
        response = generate_response(model, tokenizer, instruction, input, device, max_new_tokens, temperature, top_k,
                                     prompt_style)
        elapsed = time.perf_counter() - t0
        print(response)
        report_speed(len(tokenizer.encode(response, bos=False)), elapsed, device)
        responses.append(response)
    return responses
