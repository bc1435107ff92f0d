"""Compiled decoding (`--compile true`, lit_llama.generation.compile_steps): greedy output identical to eager for
every model kind the generate scripts build, no host sync per token, and the scripts' compile flag.

Each test that compiles costs 5-15 s on a CPU (inductor builds C++ kernels), so there are few of them."""

from typing import Dict

import pytest
import torch
from conftest import run_script
from test_multi_lora import lora_files, multi_model  # noqa: F401 (lora_files is a fixture)
from torch.overrides import TorchFunctionMode

from lit_llama.adapter import AdapterLLaMA, adapter_state_dict
from lit_llama.generation import SYNC_EVERY, generate_batch, stream_batch
from lit_llama.model import Config, LLaMA
from lit_llama.checkpoint import load_model, resolve_checkpoint

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out

CPU, FP32 = torch.device("cpu"), torch.float32


class CountHostReads(TorchFunctionMode):
    """Counts the tensor calls that make the host wait for the device's values."""

    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.counts: Dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def prompts_of_different_lengths(vocab_size: int):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (n,), generator=generator) for n in (7, 2, 12)]


def test_host_reads_decoded_tokens_once_every_sync_every_tokens():
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny")).eval()
    new_tokens = 4 * SYNC_EVERY
    with CountHostReads() as reads:
        output = generate_batch(model, prompts_of_different_lengths(512), new_tokens, temperature=0)
    assert all(o.numel() - p.numel() == new_tokens for o, p in zip(output, prompts_of_different_lengths(512)))
    assert reads.counts == {"tolist": new_tokens // SYNC_EVERY}  # not one per token


def test_compiled_greedy_equals_eager_with_eos_and_gqa():
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny-gqa")).eval()
    prompts = prompts_of_different_lengths(512)
    eager = generate_batch(model, prompts, 20, temperature=0)
    eos_id = int(eager[0][prompts[0].numel() + 5])  # row 0 (and maybe others) stops early at this token
    eager = generate_batch(model, prompts, 20, temperature=0, eos_id=eos_id)
    compiled = generate_batch(model, prompts, 20, temperature=0, eos_id=eos_id, compiled=True)
    assert eager[0].numel() <= prompts[0].numel() + 6 and eager[0][-1] == eos_id
    assert [o.tolist() for o in compiled] == [o.tolist() for o in eager]
    # another batch size and length: the same compiled steps, a new shape, the same answers as eager
    assert generate_batch(model, prompts[1:], 9, temperature=0, compiled=True)[1].tolist() == \
        generate_batch(model, prompts[1:], 9, temperature=0)[1].tolist()


def test_compiled_mixed_adapter_batch_equals_eager(tiny_checkpoint_dir, lora_files):  # noqa: F811
    model = multi_model(tiny_checkpoint_dir, lora_files)
    model.select(["wide", "base", "chat"])
    prompts = prompts_of_different_lengths(512)
    eager = generate_batch(model, prompts, 12, temperature=0)
    compiled = generate_batch(model, prompts, 12, temperature=0, compiled=True)
    assert [o.tolist() for o in compiled] == [o.tolist() for o in eager]


@pytest.fixture(scope="module")
def adapter_file(tiny_checkpoint_dir, tmp_path_factory):
    """An adapter v2 file with random (trained-looking) adapter weights."""
    torch.manual_seed(3)
    model = load_model(resolve_checkpoint(tiny_checkpoint_dir), CPU, FP32, AdapterLLaMA, adapter_version=2,
                       adapter_start_layer=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter" in name or "gating" in name:
                param.normal_(std=0.5)
    path = tmp_path_factory.mktemp("adapter") / "adapter.pth"
    torch.save(adapter_state_dict(model), path)
    return path


@pytest.mark.parametrize("script", ["generate.py", "generate/adapter.py"])
def test_generate_scripts_compile_flag(script, tiny_checkpoint_dir, adapter_file):
    args = ["--checkpoint_dir", tiny_checkpoint_dir, "--prompt", "Add 3 and 4.", "--temperature", 0,
            "--max_new_tokens", 24, "--num_samples", 2]
    if script == "generate/adapter.py":
        args += ["--adapter_path", adapter_file]
    eager = run_script(script, *args)
    compiled = run_script(script, *args, "--compile", "true")
    assert compiled.stdout == eager.stdout and compiled.stdout.strip()
    assert "Compiled in" in compiled.stderr and "not counted" in compiled.stderr
    assert compiled.stderr.count("tokens/s") == 2  # one speed line per sample, after compilation


def test_per_row_limits_including_zero():
    """`stream_batch` with one limit per row (serve.py's max_tokens): each row stops at its own, a row with
    none gets no token."""
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny")).eval()
    prompts = prompts_of_different_lengths(512)
    rows = [[], [], []]
    for chunk in stream_batch(model, prompts, [0, 3, 11], temperature=0):
        for row, tokens in zip(rows, chunk):
            row.extend(tokens)
    assert [len(row) for row in rows] == [0, 3, 11]
    assert rows[2] == generate_batch(model, prompts[2:], 11, temperature=0)[0][prompts[2].numel():].tolist()
