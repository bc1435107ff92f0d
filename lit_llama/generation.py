"""Autoregressive sampling with the KV cache: prefill the prompt once, then one token at a time."""

import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from lit_llama.checks import check_at_least, check_range
from lit_llama.model import LLaMA
from lit_llama.prompts import DEFAULT_PROMPT_STYLE, PromptStyle, get_prompt_style
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
    stop: Optional[Callable[[torch.Tensor], bool]] = None,
) -> torch.Tensor:
    """Returns the prompt (1-D tensor of token ids) followed by up to `max_new_tokens` new tokens,
    stopping after `eos_id`, or once `stop(new tokens so far)` is true (a prompt style's stop text). Without
    the KV cache every step re-reads the whole sequence (slow; tests
    use it to check that the cache changes nothing)."""
    if use_kv_cache:
        return generate_batch(model, [prompt], max_new_tokens, temperature, top_k, eos_id, [stop])[0]
    max_seq_length = check_prompt_lengths(model, [prompt.size(0)], max_new_tokens)
    tokens = prompt.unsqueeze(0)
    while tokens.size(1) < max_seq_length:
        next_token = sample(model(tokens)[:, -1], temperature, top_k)
        tokens = torch.cat((tokens, next_token), dim=1)
        if eos_id is not None and next_token.item() == eos_id:
            break
        if stop is not None and stop(tokens[0, prompt.size(0) :]):
            break
    return tokens[0]


@torch.inference_mode()
def generate_batch(
    model: LLaMA,
    prompts: List[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    eos_id: Optional[int] = None,
    stops: Optional[Sequence[Optional[Callable[[torch.Tensor], bool]]]] = None,
) -> List[torch.Tensor]:
    """`generate` for several prompts of different lengths at once: returns, per prompt, the prompt followed
    by up to `max_new_tokens` new tokens, each row stopping after its own `eos_id` or once its `stops[i](new
    tokens so far)` is true (a prompt style's stop text).

    The prompts are right-padded into one batch and prefilled together at positions 0..T-1: padding comes
    after every real token, so the causal mask keeps it out of sight. Then each row decodes at its own
    position (`input_pos` of shape (B, 1)): its first new token overwrites its first padding slot in the KV
    cache, and so on, so no row ever attends to padding. Rows that are done wait (re-writing one slot)
    until the last one is."""
    lengths = [p.size(0) for p in prompts]
    max_seq_length = check_prompt_lengths(model, lengths, max_new_tokens)
    device, B = prompts[0].device, len(prompts)
    limits = [min(max_new_tokens, max_seq_length - length) for length in lengths]  # new tokens per row
    padded = torch.zeros(B, max(lengths), dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        padded[b, : lengths[b]] = prompt
    new_tokens: List[List[int]] = [[] for _ in range(B)]
    done = [limit == 0 for limit in limits]
    model.set_kv_cache(batch_size=B, max_seq_length=max_seq_length, device=device)
    try:
        logits = model(padded, torch.arange(padded.size(1), device=device))
        position = torch.tensor(lengths, device=device) - 1  # each row's last prompt token
        logits = logits[torch.arange(B, device=device), position]
        while not all(done):
            next_token = sample(logits, temperature, top_k)  # (B, 1)
            for b, token in enumerate(next_token.view(-1).tolist()):  # one host sync per step
                if not done[b]:
                    new_tokens[b].append(token)
                    stop = stops[b] if stops else None
                    done[b] = (token == eos_id or len(new_tokens[b]) == limits[b]
                               or (stop is not None and stop(torch.tensor(new_tokens[b]))))
            if all(done):
                break
            # the new token goes at the slot after the row's last one; rows that are done stay where they are
            position = position + torch.tensor([not d for d in done], device=device)
            logits = model(next_token, position.unsqueeze(1))[:, -1]
    finally:
        model.clear_kv_cache()
    return [torch.cat((prompt, torch.tensor(new, dtype=prompt.dtype, device=device)))
            for prompt, new in zip(prompts, new_tokens)]


def check_prompt_lengths(model: LLaMA, lengths: List[int], max_new_tokens: int) -> int:
    """The sequence length to allocate: the longest prompt plus `max_new_tokens`, at most the block size."""
    block_size = model.config.block_size
    if max(lengths) >= block_size:
        raise ValueError(f"the prompt has {max(lengths)} tokens; the model's block size is {block_size}")
    return min(max(lengths) + max_new_tokens, block_size)


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
    prompt_style: str = DEFAULT_PROMPT_STYLE,
) -> str:
    """Wraps the instruction in the prompt style's template (Alpaca by default), generates until EOS or the
    style's stop text, and returns only the response text (without the stop text)."""
    style = get_prompt_style(prompt_style)
    was_training = model.training
    model.eval()
    prompt = tokenizer.encode(style.prompt(instruction, input), bos=True, device=device)
    max_new_tokens = min(max_new_tokens, model.config.block_size - prompt.size(0))
    stop = stop_at_text(style, tokenizer)
    output = generate(model, prompt, max_new_tokens, temperature, top_k, eos_id=tokenizer.eos_id, stop=stop)
    model.train(was_training)
    return style.cut_at_stop(tokenizer.decode(output[prompt.size(0) :]))[0].strip()


def generate_responses(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    requests: Sequence[Tuple[str, str]],
    device: Optional[torch.device] = None,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    prompt_styles: Optional[Sequence[str]] = None,
) -> List[str]:
    """`generate_response` for several (instruction, input) pairs in one batch (`generate_batch`), each in its
    own prompt style (Alpaca by default): the response texts, in order."""
    styles = [get_prompt_style(name) for name in (prompt_styles or [DEFAULT_PROMPT_STYLE] * len(requests))]
    prompts = [tokenizer.encode(style.prompt(instruction, input), bos=True, device=device)
               for style, (instruction, input) in zip(styles, requests)]
    stops = [stop_at_text(style, tokenizer) for style in styles]
    outputs = generate_batch(model, prompts, max_new_tokens, temperature, top_k, tokenizer.eos_id, stops)
    return [style.cut_at_stop(tokenizer.decode(output[prompt.size(0) :]))[0].strip()
            for style, prompt, output in zip(styles, prompts, outputs)]


def stop_at_text(style: PromptStyle, tokenizer: Tokenizer) -> Optional[Callable[[torch.Tensor], bool]]:
    """For a style whose answers end with text rather than a token (ChatML's <|im_end|>): is it there yet?"""
    return (lambda new: style.cut_at_stop(tokenizer.decode(new))[1]) if style.stop_strings else None


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
