"""What the benchmarks share: adding result rows to their own table in benchmarks/RESULTS.md (not simply at
the end of the file, where they would land under whichever table happens to be last), timing, the peak
memory of one training step (on a GPU and on a CPU), the same model as Hugging Face's `LlamaForCausalLM`
for the side-by-side comparisons, and random checkpoints of real shapes for the scripts to load."""

import json
import shutil
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


def sync_time(device: torch.device) -> float:
    """The time after the device finished its queued work (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


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


class PeakTensorMemory(TorchDispatchMode):
    """On a CPU, where no allocator keeps statistics: the peak bytes of the tensors created while it is active
    and alive together, counted over their storages (a view is not counted twice; tensors that existed before,
    such as weights and optimizer states, are not counted). The CPU analogue of CUDA's max_memory_allocated
    minus what was allocated at the start. It sees what runs through PyTorch's dispatcher: not the buffers
    inside a torch.compile'd graph."""

    def __init__(self) -> None:
        super().__init__()
        self.live: Dict[int, int] = {}  # storage id -> bytes, for storages created inside and still alive
        self.bytes = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.live or key in inputs:  # a view or an in-place result: nothing new
                continue
            self.live[key] = storage.nbytes()
            self.bytes += self.live[key]
            self.peak = max(self.peak, self.bytes)
            weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        self.bytes -= self.live.pop(key, 0)


def step_peak_memory(step: Callable[[], Any], device: torch.device) -> float:
    """GB: the peak memory of `step()` above what was allocated when it started (GPU: the CUDA allocator's
    statistics; CPU: PeakTensorMemory)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - before) / 1e9
    with PeakTensorMemory() as tracker:
        step()
    return tracker.peak / 1e9


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
