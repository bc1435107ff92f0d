"""What the benchmarks share: adding result rows to their own table in benchmarks/RESULTS.md (not simply at
the end of the file, where they would land under whichever table happens to be last), timing, the peak
memory of one training step (on a GPU and on a CPU), the FLOPs of a training step and the machine's matmul
peak they are a share of, the same model as Hugging Face's `LlamaForCausalLM`
for the side-by-side comparisons, and random checkpoints of real shapes for the scripts to load."""

import json
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from benchmarks.measure import PeakTensorMemory, median_seconds, step_peak_memory, sync_time  # noqa: F401 (used by the benchmarks)
from lit_llama.convert import lit_to_hf
from lit_llama.model import Config, LLaMA
from lit_llama.tokenizer import Tokenizer
from lit_llama.checkpoint import WEIGHTS_NAME, default_dtype, save_weights
from lit_llama.cli import UserError


def add_rows(results_file: Optional[Path], section: str, rows: List[str]) -> None:
    """`section` is a table's whole heading block: its "## title" line, a description and the table's header
    and separator rows. The rows go right after the last row of that table; a file without the section
    gets it, with the rows, at its end. Nothing else in the file changes."""
    if not results_file or Path(results_file) == Path(""):  # --results_file "": print only
        return
    results_file = Path(results_file)
    if results_file.is_dir():
        raise UserError(f"--results_file {results_file} is a directory; give a Markdown file (or \"\" for none)")
    section = section.strip("\n") + "\n"
    title = section.splitlines()[0]
    text = results_file.read_text() if results_file.is_file() else ""
    rows_text = "".join(row.rstrip("\n") + "\n" for row in rows)
    lines = text.splitlines(keepends=True)
    if title not in (line.rstrip("\n") for line in lines):
        separator = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
        results_file.write_text(text + separator + section + rows_text)
        return
    start = [line.rstrip("\n") for line in lines].index(title)
    # the table: the first run of "|" lines after the title; rows go after its last line
    i = start + 1
    while i < len(lines) and not lines[i].startswith("|"):
        i += 1
    while i < len(lines) and lines[i].startswith("|"):
        i += 1
    if i > 0 and not lines[i - 1].endswith("\n"):
        lines[i - 1] += "\n"
    lines.insert(i, rows_text)
    results_file.write_text("".join(lines))


def hf_llama(config: Config, weights: Dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    """transformers' `LlamaForCausalLM` of `config`'s shape holding our `weights` (lit_llama.convert's names),
    with PyTorch's scaled_dot_product_attention like ours."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups, max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, attn_implementation="sdpa",
    )
    with device, default_dtype(dtype):
        model = LlamaForCausalLM(hf_config)
    model.load_state_dict(dict(lit_to_hf(weights.items(), config)), strict=True)
    return model


def training_flops(config: Config, lengths: Iterable[int], lora_params: Optional[int] = None) -> float:
    """The FLOPs of one training step (forward and backward) on examples of `lengths` real tokens: THE formula
    every share-of-peak figure uses, whichever implementation ran the step.

    Matrix products only (norms, softmax, RoPE and the optimizer are left out); a multiply-add is 2 FLOPs.
    For an example of T tokens, with N the weights of the linear layers (attention, MLP and the output layer,
    embedding lookups excluded), L layers and d = n_head * head_size:
      forward   2 N T  +  attention 2 L d T (T + 1)   (Q K^T and A V, 2 d FLOPs each per query and key; causal:
                                                     query t sees t keys, sum_t 2 * 2 d t = 2 d T (T + 1))
      backward  the input gradients: 2 N T again, and twice the attention's forward (its two operands
                both need gradients); the weight gradients: 2 N T more when every weight trains
    so full finetuning costs 6 N T + 6 L d T (T + 1), and LoRA, whose base weights are frozen, 4 N T plus
    6 FLOPs per LoRA weight per token (`lora_params`: A and B, forward and both gradients) + 6 L d T (T + 1).
    The output layer counts at every position, as the model defines the work: an implementation that skips
    the logits of unscored positions does less, and its share is that much higher. Padding counts nothing."""
    with torch.device("meta"):
        model = LLaMA(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    d = config.n_head * config.head_size
    per_token = (6 * linear if lora_params is None else 4 * linear + 6 * lora_params)
    return sum(per_token * t + 6 * config.n_layer * d * t * (t + 1) for t in lengths)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: Optional[int] = None, repeats: int = 5) -> float:
    """The machine's own peak: FLOP/s of `torch.matmul` on large square matrices of `dtype` (the best of
    `repeats` timings, as the peak of a machine shared with other work). Default size: 8192 on a GPU; on a CPU
    the size doubles from 256 until one product takes a tenth of a second, up to 2048 (float32 reaches 2048 in
    about a second; bf16, emulated on most CPUs at well under 1 GFLOP/s, stops far earlier instead of taking
    a minute per product)."""
    if size is None and device.type != "cuda":
        size = 256
        while size < 2048 and _matmul_seconds(size, device, dtype) < 0.1:
            size *= 2
    size = size or 8192
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    calls = 10 if device.type == "cuda" else 1
    torch.matmul(a, b)  # the first call sets up the library
    best = float("inf")
    for _ in range(repeats):
        t0 = sync_time(device)
        for _ in range(calls):
            torch.matmul(a, b)
        best = min(best, (sync_time(device) - t0) / calls)
    return 2 * size**3 / best


def _matmul_seconds(size: int, device: torch.device, dtype: torch.dtype) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, a)
    t0 = sync_time(device)
    torch.matmul(a, a)
    return sync_time(device) - t0


def write_random_checkpoint(config: Config, checkpoint_dir: Path, device: torch.device,
                            tokenizer_dir: Optional[Path] = None) -> None:
    """lit-llama.pth (random, bf16), lit_config.json and a tokenizer with exactly the config's vocabulary: the
    real LLaMA tokenizer from `tokenizer_dir` when it is there and the vocabulary is LLaMA's, else one trained
    here (`train_padded_tokenizer`)."""
    torch.manual_seed(0)
    with device, default_dtype(torch.bfloat16):
        model = LLaMA(config)
    checkpoint_dir.mkdir(parents=True)
    save_weights({name: t.cpu() for name, t in model.state_dict().items()}, checkpoint_dir / WEIGHTS_NAME)
    del model
    config.to_json(checkpoint_dir / "lit_config.json")
    real = tokenizer_dir / "tokenizer.model" if tokenizer_dir else None
    if real is not None and real.is_file() and config.vocab_size == 32000:
        shutil.copy(real, checkpoint_dir / "tokenizer.model")
    else:
        train_padded_tokenizer(checkpoint_dir, config.vocab_size)


def train_padded_tokenizer(destination: Path, vocab_size: int) -> None:
    """A SentencePiece tokenizer trained on the demo instructions, padded with unused pieces to `vocab_size`:
    no text we have offline makes 32,000 real pieces, and the scripts check tokenizer and model agree."""
    records = json.loads((Path(__file__).resolve().parents[1] / "lit_llama" / "demo_instructions.json").read_text())
    corpus = destination / "corpus.txt"
    corpus.write_text("\n".join(" ".join(r.values()) for r in records))
    real_pieces = min(vocab_size, 1000)
    unused = [f"<unused{i}>" for i in range(vocab_size - real_pieces)]
    Tokenizer.train(corpus, destination, vocab_size=vocab_size, user_defined_symbols=unused)
    corpus.unlink()
