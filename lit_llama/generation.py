"""Autoregressive sampling with the KV cache: prefill the prompt once, then one token at a time."""

import functools
import math
import sys
import time
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch

from lit_llama.checkpoint import CheckpointPaths, check_vocab
from lit_llama.cli import UserError, check_at_least, check_range
from lit_llama.distributed import default_device, precision_dtype
from lit_llama.model import LLaMA
from lit_llama.prompts import DEFAULT_PROMPT_STYLE, PromptStyle, get_prompt_style
from lit_llama.tokenizer import Tokenizer, check_text

SYNC_EVERY = 8  # decoded tokens between looks from the host (end-of-text, stop text): see `stream_batch`


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None) -> torch.Tensor:
    """Picks the next token from the last position's logits (B, vocab); temperature 0 is greedy, and so is a
    temperature too small for logits / temperature to be a float32 number."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    greedy = logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature  # in float32: in float16, logit 70 / temperature 0.001 already overflows
    # a temperature so small that this overflows (float32 ends at 3.4e38: e.g. 1e-45) is greedy, its limit:
    # softmax would be NaN. Decided per row on the device: the decoding loop never waits for the host
    finite = torch.isfinite(logits).all(dim=-1, keepdim=True)  # before top-k's -inf
    logits = torch.where(finite, logits, 0.0)
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.where(finite, torch.multinomial(probs, num_samples=1), greedy)


@torch.inference_mode()
def generate(
    model: LLaMA,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    eos_id: Union[int, Iterable[int], None] = None,
    use_kv_cache: bool = True,
    stop: Optional[Callable[[torch.Tensor], bool]] = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Returns the prompt (1-D tensor of token ids) followed by up to `max_new_tokens` new tokens,
    stopping after `eos_id`, or once `stop(new tokens so far)` is true (a prompt style's stop text). Without
    the KV cache every step re-reads the whole sequence (slow; tests
    use it to check that the cache changes nothing). `compiled`: the torch.compile'd steps (`compile_steps`)."""
    if use_kv_cache:
        return generate_batch(model, [prompt], max_new_tokens, temperature, top_k, eos_id, [stop], compiled)[0]
    max_seq_length = check_prompt_lengths(model, [prompt.size(0)], max_new_tokens)
    tokens = prompt.unsqueeze(0)
    while tokens.size(1) < max_seq_length:
        next_token = sample(model(tokens)[:, -1], temperature, top_k)
        tokens = torch.cat((tokens, next_token), dim=1)
        if next_token.item() in stop_id_set(eos_id):
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
    eos_id: Union[int, Iterable[int], None] = None,
    stops: Optional[Sequence[Optional[Callable[[torch.Tensor], bool]]]] = None,
    compiled: bool = False,
) -> List[torch.Tensor]:
    """`generate` for several prompts of different lengths at once: returns, per prompt, the prompt followed
    by up to `max_new_tokens` new tokens, each row stopping after its own `eos_id` or once its `stops[i](new
    tokens so far)` is true (a prompt style's stop text). `compiled`: run the torch.compile'd steps
    (`compile_steps`); greedy output is the same."""
    new_tokens: List[List[int]] = [[] for _ in prompts]
    for chunk in stream_batch(model, prompts, max_new_tokens, temperature, top_k, eos_id, stops, compiled):
        for row, tokens in zip(new_tokens, chunk):
            row.extend(tokens)
    return [torch.cat((prompt, torch.tensor(new, dtype=prompt.dtype, device=prompt.device)))
            for prompt, new in zip(prompts, new_tokens)]


@torch.inference_mode()
def stream_batch(
    model: LLaMA,
    prompts: List[torch.Tensor],
    max_new_tokens: Union[int, Sequence[int]],
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    eos_id: Union[int, Iterable[int], None] = None,
    stops: Optional[Sequence[Optional[Callable[[torch.Tensor], bool]]]] = None,
    compiled: bool = False,
    sync_every: int = SYNC_EVERY,
) -> Iterator[List[List[int]]]:
    """The decoding loop behind `generate_batch`, as a stream: yields, every `sync_every` tokens, each row's
    new tokens since the last yield (an empty list for a row that is done), until every row is done.
    `max_new_tokens`: one limit for every row, or one per row (a server's requests each bring their own).

    The prompts are right-padded into one batch and prefilled together at positions 0..T-1: padding comes
    after every real token, so the causal mask keeps it out of sight. Then each row decodes at its own
    position (`input_pos` of shape (B, 1)): its first new token overwrites its first padding slot in the KV
    cache, and so on, so no row ever attends to padding, and rows never see each other's cache.

    The loop itself never waits for the device: tokens stay on it, and a row that is done simply goes on
    decoding into its own cache (its extra tokens are thrown away). Only every `sync_every` tokens are they
    copied to the host, where each row's end (end-of-text, its limit, its stop text) is found token by
    token, and the loop ends once every row has ended. So a GPU is never idle waiting on Python, at the
    cost of at most `sync_every - 1` extra steps."""
    lengths = [p.size(0) for p in prompts]
    row_limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    max_seq_length = check_prompt_lengths(model, lengths, max(row_limits))
    device, B = prompts[0].device, len(prompts)
    limits = [min(n, max_seq_length - length) for n, length in zip(row_limits, lengths)]  # new tokens per row
    padded = torch.zeros(B, max(lengths), dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        padded[b, : lengths[b]] = prompt
    prefill_step, decode_step = compile_steps() if compiled else (prefill, decode_one_token)
    cache_length = static_cache_length(model, max_seq_length) if compiled else max_seq_length
    model.set_kv_cache(batch_size=B, max_seq_length=cache_length, device=device)
    new_tokens: List[List[int]] = [[] for _ in range(B)]
    done = [limit <= 0 for limit in limits]
    steps = max(limits)
    tokens = torch.empty(B, steps, dtype=torch.long, device=device)  # decoded so far, on the device
    try:
        position = torch.tensor(lengths, device=device) - 1  # each row's last prompt token
        next_token = sample(prefill_step(model, padded, position), temperature, top_k)  # (B, 1)
        synced = 0  # tokens[:, :synced] are on the host
        for step in range(steps):
            tokens[:, step] = next_token[:, 0]
            if step + 1 - synced == sync_every or step + 1 == steps:
                chunk = tokens[:, synced : step + 1].tolist()  # the one host sync every sync_every tokens
                synced = step + 1
                fresh: List[List[int]] = [[] for _ in range(B)]
                for b in range(B):
                    if not done[b]:
                        stop = stops[b] if stops else None
                        fresh[b], done[b] = take_until_done(new_tokens[b], chunk[b], limits[b], eos_id, stop)
                yield fresh
                if all(done):
                    break
            # the next token goes at the slot after each row's last one (a done row's position no longer matters)
            position = (position + 1).clamp(max=cache_length - 1)
            next_token = decode_step(model, next_token, position.unsqueeze(1), temperature, top_k).clone()
    finally:
        if not compiled:  # compiled steps keep their cache for the next call (same buffers, no re-recording)
            model.clear_kv_cache()


def take_until_done(
    row: List[int],
    chunk: List[int],
    limit: int,
    eos_id: Union[int, Iterable[int], None],
    stop: Optional[Callable[[torch.Tensor], bool]],
) -> Tuple[List[int], bool]:
    """Appends the chunk's tokens to the row one at a time until the row is done (end-of-text, its limit of
    new tokens, its stop text); returns the tokens it appended and whether the row is done."""
    stop_ids = stop_id_set(eos_id)
    for i, token in enumerate(chunk):
        row.append(token)
        if token in stop_ids or len(row) == limit or (stop is not None and stop(torch.tensor(row))):
            return chunk[: i + 1], True
    return chunk, False


def prefill(model: LLaMA, tokens: torch.Tensor, last_positions: torch.Tensor) -> torch.Tensor:
    """Runs the (right-padded) prompts (B, T) at positions 0..T-1, filling the KV cache; returns the logits
    (B, vocab) at each row's last prompt token."""
    logits = model(tokens, torch.arange(tokens.size(1), device=tokens.device))
    return logits[torch.arange(tokens.size(0), device=tokens.device), last_positions]


def decode_one_token(
    model: LLaMA, token: torch.Tensor, position: torch.Tensor, temperature: float, top_k: Optional[int]
) -> torch.Tensor:
    """One decoding step for every row: its last token (B, 1) at its position (B, 1) -> its next token (B, 1)."""
    return sample(model(token, position)[:, -1], temperature, top_k)


@functools.lru_cache(maxsize=None)
def compile_steps() -> Tuple[Callable, Callable]:
    """The prefill as it is and the one-token decode step compiled as one whole graph, replayed as a CUDA graph on
    a GPU ("reduce-overhead": one launch per token instead of hundreds of kernel launches). The prefill runs once
    per request on all the prompt's tokens at a time: its matmuls are large, and compiling it for every prompt
    length (dynamic shapes) cost a third of the warm-up for little (gpt-fast leaves it eager too): on this
    repository's 2-core CPU, 36 s of warm-up became 24 s for a 4x512 model. Compilation happens on first use:
    see `warm_up`."""
    if torch.cuda.is_available():
        decode = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    else:  # no CUDA graphs on a CPU: the step's wrapper code in C++ instead of Python saves the overhead there
        decode = torch.compile(decode_one_token, fullgraph=True, options={"cpp_wrapper": True})
    return prefill, decode


def static_cache_length(model: LLaMA, max_seq_length: int) -> int:
    """The compiled steps' KV-cache length: rounded up to a multiple of 256 (at most the block size), so
    requests of other lengths mostly reuse the same compiled graphs instead of compiling new ones."""
    return min(model.config.context_length, 256 * math.ceil(max_seq_length / 256))


def warm_up(model: LLaMA, prompt: torch.Tensor, max_new_tokens: int, temperature: float, top_k: Optional[int]) -> float:
    """Compiles the steps for this prompt's shape by generating a few tokens, so that timed generation after it
    excludes compilation; returns the seconds it took (printed by the scripts)."""
    t0 = time.perf_counter()
    devices = [prompt.device] if prompt.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the warm-up draws no samples from the user's seed
        for _ in range(3):  # CUDA graphs are recorded on a later call than the first
            stream = stream_batch(model, [prompt], max_new_tokens, temperature, top_k, compiled=True)
            next(stream)  # one chunk runs both steps
            stream.close()
    return time.perf_counter() - t0


def check_prompt_lengths(model: LLaMA, lengths: List[int], max_new_tokens: int) -> int:
    """The sequence length to allocate: the longest prompt plus `max_new_tokens`, at most the block size."""
    block_size = model.config.context_length  # Mistral v0.1: its sliding window
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
    check_text(prompt, "--prompt")
    tokenizer = Tokenizer(paths.tokenizer)
    check_vocab(tokenizer, paths)
    context = paths.config.context_length
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


def report_compilation(
    model: LLaMA, prompt: torch.Tensor, max_new_tokens: int, temperature: float, top_k: Optional[int]
) -> None:
    """`warm_up` with the message the scripts print (stderr) before the timed samples."""
    print("Compiling the prefill and decode steps (torch.compile) ...", file=sys.stderr)
    seconds = warm_up(model, prompt, max_new_tokens, temperature, top_k)
    print(f"Compiled in {seconds:.2f} s (not counted in the speed below)", file=sys.stderr)


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
    compiled: bool = False,
) -> str:
    """Wraps the instruction in the prompt style's template (Alpaca by default), generates until EOS or the
    style's stop text, and returns only the response text (without the stop text)."""
    style = get_prompt_style(prompt_style)
    was_training = model.training
    model.eval()
    prompt = tokenizer.encode(style.prompt(instruction, input), bos=True, device=device)
    max_new_tokens = min(max_new_tokens, model.config.context_length - prompt.size(0))
    stop = stop_at_text(style, tokenizer)
    output = generate(model, prompt, max_new_tokens, temperature, top_k, stop_ids(tokenizer, [style]), stop=stop,
                      compiled=compiled)
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
    compiled: bool = False,
) -> List[str]:
    """`generate_response` for several (instruction, input) pairs in one batch (`generate_batch`), each in its
    own prompt style (Alpaca by default): the response texts, in order."""
    styles = [get_prompt_style(name) for name in (prompt_styles or [DEFAULT_PROMPT_STYLE] * len(requests))]
    prompts = [tokenizer.encode(style.prompt(instruction, input), bos=True, device=device)
               for style, (instruction, input) in zip(styles, requests)]
    stops = [stop_at_text(style, tokenizer) for style in styles]
    outputs = generate_batch(model, prompts, max_new_tokens, temperature, top_k, stop_ids(tokenizer, styles), stops,
                             compiled)
    return [style.cut_at_stop(tokenizer.decode(output[prompt.size(0) :]))[0].strip()
            for style, prompt, output in zip(styles, prompts, outputs)]


def stop_id_set(eos_id: Union[int, Iterable[int], None]) -> Set[int]:
    """`eos_id` as a set: the generation functions take one id (LLaMA's eos) or several (Llama 3 Instruct stops
    on both <|eot_id|> and <|end_of_text|>)."""
    if eos_id is None:
        return set()
    return {eos_id} if isinstance(eos_id, int) else set(eos_id)


def stop_ids(tokenizer: Tokenizer, styles: Sequence[PromptStyle] = ()) -> Tuple[int, ...]:
    """Every token that ends an answer: the tokenizer's stop ids (eos and generation_config.json's
    eos_token_id), and a style's stop text where it is one special token of this tokenizer (Llama 3's
    <|eot_id|>, ChatML's <|im_end|> in tokenizers that have it)."""
    ids = list(tokenizer.stop_ids)
    for style in styles:
        ids += [tokenizer.token_id(text) for text in style.stop_strings if tokenizer.token_id(text) is not None]
    return tuple(dict.fromkeys(ids))


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
    compiled: bool = False,
) -> List[str]:
    """What every generate/*.py script does once its model is built: respond to the instruction
    `num_samples` times, printing each response (stdout) with its speed and memory (stderr). `compiled`:
    compile first (printed apart), so every sample's speed excludes compilation."""
    if compiled:
        prompt = get_prompt_style(prompt_style).prompt(instruction, input)
        report_compilation(model, tokenizer.encode(prompt, bos=True, device=device), max_new_tokens, temperature, top_k)
    torch.manual_seed(seed)
    responses = []
    for _ in range(num_samples):
        t0 = time.perf_counter()
        response = generate_response(model, tokenizer, instruction, input, device, max_new_tokens, temperature, top_k,
                                     prompt_style, compiled)
        elapsed = time.perf_counter() - t0
        print(response)
        report_speed(len(tokenizer.encode(response, bos=False)), elapsed, device)
        responses.append(response)
    return responses
