"""Batch-1 greedy decoding speed, side by side in one run: ours (eager, compiled, int8, int4) against Hugging Face
transformers' `generate` (eager, and with its static cache + torch.compile) on the same weights and prompt.

    python benchmarks/generate_vs_hf.py                                        # CPU: a small LLaMA shape
    python benchmarks/generate_vs_hf.py --model_size TinyLlama-1.1B --new_tokens 32 --repeats 1
    python benchmarks/generate_vs_hf.py --model_size 7B --device cuda          # what the GPU suite runs

Random weights of the named shape (speed does not depend on the values), converted to `LlamaForCausalLM` with
lit_llama.convert for the transformers side. Every implementation decodes `--new_tokens` tokens greedily after
the same prompt, with no end-of-text stop. Compilation happens in a warm-up call whose time is reported apart;
tokens/s is the median over `--repeats` timed calls (prefill included, as a user sees it), the
implementations taking turns call by call so that all see the same machine load (each of ours on a model of
its own: 7B needs about 65 GB of GPU memory for all of them). The bandwidth bound
is what decoding could reach if every token only read the weights once at the copy rate measured on the
device (weight bytes per token / bytes per second of a large on-device copy); the last column says whether
the implementation's tokens equal the first implementation's (ours eager by default; random weights make
near-ties, so a rare difference after a few tokens is float rounding, not a bug).
"""

import platform
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows, hf_llama, sync_time  # noqa: E402
from lit_llama.generation import generate  # noqa: E402
from lit_llama.model import Config, LLaMA  # noqa: E402
from lit_llama.quantize import quantize_for_generation  # noqa: E402
from lit_llama.checkpoint import default_dtype
from lit_llama.cli import UserError, run_cli

RESULTS_HEADER = """
## Generation speed: lit-llama vs Hugging Face transformers

`python benchmarks/generate_vs_hf.py`: batch 1, greedy, a 16-token prompt, the same random weights on both
sides, no end-of-text stop; tokens/s is the median of the timed calls (prefill included), compilation excluded
and shown apart. "vs HF eager": tokens/s over transformers' eager `generate` in the same run. Bandwidth bound:
weight bytes read per token at the device's measured copy rate. "same tokens": equal to ours eager.

| date | machine | model | dtype | implementation | new tokens | tokens/s | vs HF eager | % of bandwidth bound | compile s | same tokens |
|---|---|---|---|---|---|---|---|---|---|---|
"""

# a LLaMA shape small enough for a CPU: 4 layers of width 512, the real 32k vocabulary
SMALL = dict(n_layer=4, n_head=8, n_embd=512, intermediate_size=1376, vocab_size=32000, block_size=512)
OURS = ("ours", "ours-compile", "ours-int8", "ours-int8-compile", "ours-int4", "ours-int4-compile")
HF = ("hf", "hf-static-compile")
IMPLEMENTATIONS = OURS + HF


def main(
    model_size: Optional[str] = None,
    device: str = "cpu",
    new_tokens: int = 64,
    prompt_tokens: int = 16,
    repeats: int = 3,
    implementations: Optional[List[str]] = None,
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> None:
    """Measures batch-1 greedy decoding of every implementation on the same weights, taking turns.

    Args:
        model_size: A named size from lit_llama/model.py (e.g. TinyLlama-1.1B, 7B); default: a 4-layer,
            512-wide LLaMA with the 32k vocabulary.
        device: cpu or cuda.
        new_tokens: Tokens to decode per call.
        prompt_tokens: Length of the (random) prompt.
        repeats: Timed calls per implementation (after one warm-up call).
        implementations: Which of ours, ours-compile, ours-int8, ours-int8-compile, ours-int4,
            ours-int4-compile, hf, hf-static-compile to run (default: all that this device can run; int4 needs
            CUDA).
        results_file: Markdown file to add the rows to ("" for none).
    """
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU here")
    for name, value in (("new_tokens", new_tokens), ("prompt_tokens", prompt_tokens), ("repeats", repeats)):
        if value < 1:
            raise UserError(f"--{name} {value}: expected at least 1")
    cuda = device == "cuda"
    if implementations is None:
        implementations = [name for name in IMPLEMENTATIONS if cuda or "int4" not in name]
    if not implementations:
        raise UserError("--implementations is empty: name at least one of " + ", ".join(IMPLEMENTATIONS))
    for name in implementations:
        if name not in IMPLEMENTATIONS:
            raise UserError(f"--implementations {name!r}: not one of {', '.join(IMPLEMENTATIONS)}")
        if "int4" in name and not cuda:
            raise UserError(f"--implementations {name}: int4 needs CUDA (torchao's int4 kernels)")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("this benchmark compares against Hugging Face transformers: pip install transformers")

    dev, dtype = torch.device(device), torch.bfloat16 if cuda else torch.float32
    try:
        config = Config.from_name(model_size) if model_size else Config(**SMALL)
    except ValueError as e:
        raise UserError(f"--model_size: {e}")
    if prompt_tokens + new_tokens > config.block_size:
        raise UserError(f"--prompt_tokens + --new_tokens is more than the model's context of {config.block_size}")
    shape = model_size or "4x512 (32k vocab)"
    machine = torch.cuda.get_device_name(dev) if cuda else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    torch.manual_seed(0)
    with torch.device("cpu"), default_dtype(dtype):  # the weights every implementation starts from
        weights = LLaMA(config).state_dict()
    prompt = torch.randint(3, config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
    bandwidth = copy_rate(dev)
    print(f"{shape}, {dtype}, {machine}: measured copy rate {bandwidth / 1e9:.1f} GB/s")

    # every implementation is built and warmed up first (the warm-up call compiles), then they take turns call by
    # call, so that all of them see the same machine load. Each of ours has a model of its own: a compiled one
    # keeps its KV cache between calls (CUDA graphs replay on the same buffers), which an eager call would drop;
    # transformers' two share one model (its static cache is its own)
    models: Dict[str, torch.nn.Module] = {}
    decoders: Dict[str, Callable[[], List[int]]] = {}
    compile_seconds: Dict[str, float] = {}
    outputs: Dict[str, List[int]] = {}
    for name in dict.fromkeys(implementations):
        family = "hf" if name in HF else name
        if family not in models:
            models[family] = build_model(family, config, weights, dev, dtype)
        decoders[name] = make_decoder(name, models[family], prompt.to(dev), new_tokens)
        t0 = sync_time(dev)
        outputs[name] = decoders[name]()  # warm-up: compilation, kernel selection, allocator
        compile_seconds[name] = sync_time(dev) - t0
        decoders[name]()  # CUDA graphs are recorded on a later call than the first
        print(f"{name}: warm-up {compile_seconds[name]:.1f} s", flush=True)
    times: Dict[str, List[float]] = {name: [] for name in decoders}
    for _ in range(repeats):
        for name, decode in decoders.items():
            t0 = sync_time(dev)
            decode()
            times[name].append(sync_time(dev) - t0)

    reference = next(iter(outputs.values()))
    rates = {name: new_tokens / statistics.median(t) for name, t in times.items()}
    hf_eager = rates.get("hf")
    rows = []
    for name, rate in rates.items():
        bound = bandwidth / weight_bytes_per_token(models["hf" if name in HF else name])
        ratio = f"{rate / hf_eager:.2f}x" if hf_eager else "-"
        compile_cell = f"{compile_seconds[name]:.1f}" if "compile" in name else "-"
        rows.append(f"| {date.today()} | {machine} | {shape} | {str(dtype).replace('torch.', '')} | {name} | "
                    f"{new_tokens} | {rate:.1f} | {ratio} | {100 * rate / bound:.0f}% | {compile_cell} | "
                    f"{same_tokens(outputs[name], reference)} |")
    print("\n".join(rows))
    add_rows(results_file, RESULTS_HEADER, rows)


def build_model(family: str, config: Config, weights: Dict[str, torch.Tensor], dev: torch.device,
                dtype: torch.dtype) -> torch.nn.Module:
    """hf (LlamaForCausalLM), or one of ours (LLaMA; int8 / int4 in the name: weight-only quantized), holding
    `weights`."""
    if family == "hf":
        return hf_llama(config, weights, dev, dtype).eval()
    with dev, default_dtype(dtype):
        model = LLaMA(config).eval()
    model.load_state_dict(weights)
    quantize = next((mode for mode in ("int8", "int4") if mode in family), None)
    if quantize:
        quantize_for_generation(model, quantize)
    return model


def make_decoder(name: str, model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], List[int]]:
    """A call that decodes `new_tokens` greedy tokens after the prompt with this implementation and returns them."""
    if name in HF:
        return hf_decoder(name, model, prompt, new_tokens)
    compiled = name.endswith("-compile")

    def decode() -> List[int]:
        return generate(model, prompt, new_tokens, temperature=0.0, compiled=compiled)[prompt.numel():].tolist()

    return decode


def hf_decoder(name: str, model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], List[int]]:
    from transformers import CompileConfig, GenerationConfig

    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                    pad_token_id=0, bos_token_id=1, temperature=None, top_p=None, top_k=None)
    if name == "hf-static-compile":
        # transformers' documented fast path: a static cache makes `generate` compile the forward pass; on a CPU
        # it must be told to compile all devices
        compile_config = CompileConfig(mode="reduce-overhead" if prompt.device.type == "cuda" else "default")
        compile_config._compile_all_devices = True
        settings.update(cache_implementation="static", compile_config=compile_config)
    generation_config = GenerationConfig(**settings)
    input_ids = prompt.unsqueeze(0)

    def decode() -> List[int]:
        with torch.inference_mode():
            output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                    generation_config=generation_config)
        return output[0, prompt.numel():].tolist()

    return decode


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decoded token reads: every parameter but the embedding tables (one row of them),
    quantized tensors counted as stored (their data and scales)."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for param in module.parameters(recurse=False):
            inner = [getattr(param, n) for n in getattr(param, "tensor_data_names", [])] or [param]
            total += sum(t.numel() * t.element_size() for t in inner)
    return total


def copy_rate(dev: torch.device, size: int = 512 * 2**20) -> float:
    """Bytes per second moved by a large on-device copy (read once, written once), the best of three."""
    x = torch.empty(size, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(4):
        t0 = sync_time(dev)
        y.copy_(x)
        best = min(best, sync_time(dev) - t0)
    return 2 * size / best


def same_tokens(tokens: List[int], reference: Optional[List[int]]) -> str:
    if reference is None or tokens == reference:
        return "yes"
    first = next(i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b)
    return f"first {first} of {len(tokens)}"


if __name__ == "__main__":
    run_cli(main)
