"""Lit-LLaMA's own files (base lit-llama.pth, MergedLinear LoRA, adapter v1/v2) converted by
scripts/convert_lit_llama_checkpoint.py give the logits of Lit-LLaMA's math, re-stated here in a few lines."""

import shutil
from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_clean_error, load_script, run_script

from lit_llama.adapter import load_adapter_model
from lit_llama.lora import load_lora_model
from lit_llama.checkpoint import load_model, resolve_checkpoint

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out

N_LAYER, N_HEAD, N_EMBD, VOCAB = 2, 4, 64, 512
N_HIDDEN = 256  # Lit-LLaMA's MLP size rule: find_multiple(int(2 * 4 * 64 / 3), 256)


# --- Lit-LLaMA's math, re-stated (interleaved RoPE, RMSNorm `.scale` with eps 1e-5, MergedLinear LoRA,
# --- adapter prompts with a gate, adapter v2's scale * (W x + bias) on every linear layer) -------------------


def rope_interleaved(x: torch.Tensor) -> torch.Tensor:
    """x: (B, T, n_head, hs); dimensions (2i, 2i+1) rotate together, as in Meta's and Lit-LLaMA's code."""
    T, hs = x.size(1), x.size(-1)
    theta = 1.0 / (10000 ** (torch.arange(0, hs, 2).float() / hs))
    angles = torch.outer(torch.arange(T).float(), theta)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(3)


def lit_llama_logits(base: Dict[str, torch.Tensor], idx: torch.Tensor, lora: Optional[dict] = None,
                     adapter: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    sd = {**base, **(adapter or {})}  # v2 files carry trained norm scales that replace the base's

    def rms(x, name):
        return sd[name] * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5))

    def linear(x, name):
        y = x @ sd[f"{name}.weight"].T
        if f"{name}.adapter_scale" in sd:  # adapter v2
            y = sd[f"{name}.adapter_scale"] * (y + sd[f"{name}.adapter_bias"])
        return y

    B, T = idx.shape
    hs = N_EMBD // N_HEAD
    x = sd["transformer.wte.weight"][idx]
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        h = rms(x, p + "rms_1.scale")
        qkv = linear(h, p + "attn.c_attn")
        if lora is not None:  # MergedLinear: a grouped 1x1 convolution for B, then zero padding
            A, Bm, enable = sd[p + "attn.c_attn.lora_A"], sd[p + "attn.c_attn.lora_B"], lora["enable"]
            after_B = F.conv1d((h @ A.T).transpose(-2, -1), Bm.unsqueeze(-1), groups=sum(enable)).transpose(-2, -1)
            padded = torch.zeros_like(qkv).view(B, T, 3, N_EMBD)
            padded[:, :, torch.tensor(enable)] = after_B.reshape(B, T, sum(enable), N_EMBD)
            qkv = qkv + padded.view(B, T, 3 * N_EMBD) * lora["alpha"] / lora["r"]
        q, k, v = qkv.split(N_EMBD, dim=-1)
        q = rope_interleaved(q.view(B, T, N_HEAD, hs)).transpose(1, 2)
        k = rope_interleaved(k.view(B, T, N_HEAD, hs)).transpose(1, 2)
        v = v.view(B, T, N_HEAD, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if p + "attn.adapter_wte.weight" in sd:
            prefix = sd[p + "attn.adapter_wte.weight"]
            aT = prefix.size(0)
            _, ak, av = linear(prefix.unsqueeze(0), p + "attn.c_attn").split(N_EMBD, dim=-1)
            ak = ak.view(1, aT, N_HEAD, hs).repeat(B, 1, 1, 1).transpose(1, 2)  # no rotary embedding
            av = av.view(1, aT, N_HEAD, hs).repeat(B, 1, 1, 1).transpose(1, 2)
            gate = sd[p + "attn.gating_factor"]
            gate = gate.reshape(1, 1, 1, 1) if gate.numel() == 1 else gate
            y = y + gate * F.scaled_dot_product_attention(q, ak, av)
        x = x + linear(y.transpose(1, 2).reshape(B, T, N_EMBD), p + "attn.c_proj")
        h = rms(x, p + "rms_2.scale")
        x = x + linear(F.silu(linear(h, p + "mlp.c_fc1")) * linear(h, p + "mlp.c_fc2"), p + "mlp.c_proj")
    return linear(rms(x, "transformer.ln_f.scale"), "lm_head")


# --- files in Lit-LLaMA's exact layouts ------------------------------------------------------------------------


def randn(*shape, g, std=0.15):
    return std * torch.randn(*shape, generator=g)


def lit_llama_base(seed: int = 0) -> Dict[str, torch.Tensor]:
    """What Lit-LLaMA's converters wrote: our names but `.scale` norms and Meta's q/k row order (random here, and
    large enough for attention to be sharp)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"transformer.wte.weight": randn(VOCAB, N_EMBD, g=g)}
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        sd[p + "rms_1.scale"] = 1 + randn(N_EMBD, g=g, std=0.2)
        sd[p + "attn.c_attn.weight"] = randn(3 * N_EMBD, N_EMBD, g=g)
        sd[p + "attn.c_proj.weight"] = randn(N_EMBD, N_EMBD, g=g)
        sd[p + "rms_2.scale"] = 1 + randn(N_EMBD, g=g, std=0.2)
        sd[p + "mlp.c_fc1.weight"] = randn(N_HIDDEN, N_EMBD, g=g)
        sd[p + "mlp.c_fc2.weight"] = randn(N_HIDDEN, N_EMBD, g=g)
        sd[p + "mlp.c_proj.weight"] = randn(N_EMBD, N_HIDDEN, g=g)
    sd["transformer.ln_f.scale"] = 1 + randn(N_EMBD, g=g, std=0.2)
    sd["lm_head.weight"] = randn(VOCAB, N_EMBD, g=g)
    return sd


def lit_llama_lora(r: int, enable, seed: int = 1) -> Dict[str, torch.Tensor]:
    """lit-llama-lora-finetuned.pth: the flat lora_A / lora_B of each MergedLinear c_attn, nothing else."""
    g = torch.Generator().manual_seed(seed)
    n = sum(enable)
    return {f"transformer.h.{i}.attn.c_attn.lora_{ab}": randn(*shape, g=g, std=0.1)
            for i in range(N_LAYER) for ab, shape in (("A", (r * n, N_EMBD)), ("B", (N_EMBD * n, r)))}


def lit_llama_adapter(version: int, start: int = 1, prompt: int = 3, scalar_gate: bool = False, seed: int = 2):
    """lit-llama-adapter-finetuned.pth (v1) or its v2: adapter_wte and gating_factor from `start` on; v2 also
    adapter_scale/adapter_bias on every nn.Linear (lm_head included) and the norms' `.scale`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(start, N_LAYER):
        sd[f"transformer.h.{i}.attn.adapter_wte.weight"] = torch.randn(prompt, N_EMBD, generator=g)
        sd[f"transformer.h.{i}.attn.gating_factor"] = randn(1, g=g, std=0.5) if scalar_gate else \
            randn(1, N_HEAD, 1, 1, g=g, std=0.5)
    if version == 2:
        linears = {"lm_head": VOCAB}
        for i in range(N_LAYER):
            p = f"transformer.h.{i}."
            linears.update({p + "attn.c_attn": 3 * N_EMBD, p + "attn.c_proj": N_EMBD, p + "mlp.c_fc1": N_HIDDEN,
                            p + "mlp.c_fc2": N_HIDDEN, p + "mlp.c_proj": N_EMBD})
            sd[p + "rms_1.scale"] = 1 + randn(N_EMBD, g=g, std=0.2)
            sd[p + "rms_2.scale"] = 1 + randn(N_EMBD, g=g, std=0.2)
        sd["transformer.ln_f.scale"] = 1 + randn(N_EMBD, g=g, std=0.2)
        for name, size in linears.items():
            sd[f"{name}.adapter_scale"] = 1 + randn(size, g=g, std=0.2)
            sd[f"{name}.adapter_bias"] = randn(size, g=g, std=0.2)
    return sd


@pytest.fixture(scope="module")
def converted_base(tmp_path_factory, tiny_checkpoint_dir):
    """A Lit-LLaMA layout (checkpoints/lit-llama/tiny/lit-llama.pth, tokenizer one folder up), converted."""
    root = tmp_path_factory.mktemp("lit-llama")
    folder = root / "checkpoints" / "lit-llama" / "tiny"
    folder.mkdir(parents=True)
    base = lit_llama_base()
    torch.save(base, folder / "lit-llama.pth")
    shutil.copy(tiny_checkpoint_dir / "tokenizer.model", folder.parent / "tokenizer.model")
    load_script("scripts/convert_lit_llama_checkpoint.py").main(
        checkpoint_path=folder / "lit-llama.pth", out_dir=root / "converted", n_head=N_HEAD)
    return {"root": root, "lit_llama_file": folder / "lit-llama.pth", "base": base, "dir": root / "converted"}


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def compare(ours_model, expected: torch.Tensor, what: str, base_logits: Optional[torch.Tensor] = None) -> float:
    with torch.no_grad():
        ours = ours_model.eval()(tokens())
    assert expected.abs().max() > 1, "logits too small for the comparison to mean anything"
    if base_logits is not None:
        assert (expected - base_logits).abs().max() > 0.1, "the finetuned part changes too little to be checked"
    diff = (ours - expected).abs().max().item()
    print(f"{what}: max abs logit diff {diff:.3g} (|logits| up to {expected.abs().max():.3g})")
    assert diff < 1e-5, f"{what}: {diff}"
    return diff


def test_base_matches_lit_llama_math(converted_base):
    paths = resolve_checkpoint(converted_base["dir"])
    assert (paths.config.n_head, paths.config.n_layer, paths.config.intermediate_size) == (N_HEAD, N_LAYER, N_HIDDEN)
    assert paths.config.norm_eps == 1e-5
    model = load_model(paths, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        expected = lit_llama_logits(converted_base["base"], tokens())
    compare(model, expected, "Lit-LLaMA base")
    # the q/k permutation matters: with Lit-LLaMA's row order left as it is, the logits are far off
    with torch.no_grad():
        bare = model.state_dict()
        for i in range(N_LAYER):
            bare[f"transformer.h.{i}.attn.c_attn.weight"] = converted_base["base"][f"transformer.h.{i}.attn.c_attn.weight"]
        model.load_state_dict(bare)
        assert (model(tokens()) - expected).abs().max() > 0.1


@pytest.mark.parametrize("enable, r", [((True, False, True), 8), ((True, True, True), 4), ((False, True, False), 2)],
                         ids=["q-v-r8", "q-k-v-r4", "k-r2"])
def test_lora_matches_lit_llama_math(enable, r, converted_base, tmp_path):
    lora = lit_llama_lora(r, list(enable))
    torch.save(lora, tmp_path / "lit-llama-lora-finetuned.pth")
    flags = dict(zip(("lora_query", "lora_key", "lora_value"), enable))
    load_script("scripts/convert_lit_llama_checkpoint.py").main(
        checkpoint_path=tmp_path / "lit-llama-lora-finetuned.pth", checkpoint_dir=converted_base["dir"], **flags)
    converted = tmp_path / "lit-llama-lora-finetuned-converted.pth"
    assert torch.load(converted)["lora_config"]["r"] == r
    paths = resolve_checkpoint(converted_base["dir"])
    model = load_lora_model(paths, converted, torch.device("cpu"), torch.float32, merge=False)
    with torch.no_grad():
        base = converted_base["base"]
        expected = lit_llama_logits(base, tokens(), lora={"enable": list(enable), "r": r, "alpha": 16}, adapter=lora)
        compare(model, expected, f"Lit-LLaMA LoRA {enable} r={r}", lit_llama_logits(base, tokens()))


@pytest.mark.parametrize("version, scalar_gate", [(1, False), (1, True), (2, False)], ids=["v1", "v1-one-gate", "v2"])
def test_adapter_matches_lit_llama_math(version, scalar_gate, converted_base, tmp_path):
    adapter = lit_llama_adapter(version, scalar_gate=scalar_gate)
    torch.save(adapter, tmp_path / "lit-llama-adapter-finetuned.pth")
    load_script("scripts/convert_lit_llama_checkpoint.py").main(
        checkpoint_path=tmp_path / "lit-llama-adapter-finetuned.pth", checkpoint_dir=converted_base["dir"],
        output_path=tmp_path / "adapter.pth")
    saved = torch.load(tmp_path / "adapter.pth")["adapter_config"]
    assert (saved["adapter_version"], saved["adapter_start_layer"], saved["adapter_prompt_length"]) == (version, 1, 3)
    model = load_adapter_model(resolve_checkpoint(converted_base["dir"]), tmp_path / "adapter.pth",
                               torch.device("cpu"), torch.float32)
    with torch.no_grad():
        base = converted_base["base"]
        expected = lit_llama_logits(base, tokens(), adapter=adapter)
        compare(model, expected, f"Lit-LLaMA adapter v{version}{' one gate' if scalar_gate else ''}",
                lit_llama_logits(base, tokens()))


def test_lit_llama_files_elsewhere_name_the_converter(converted_base, tmp_path):
    """Each of our loaders refuses Lit-LLaMA's files with one line naming the conversion script."""
    lit_file = converted_base["lit_llama_file"]
    proc = run_script("generate.py", "--checkpoint_path", lit_file, "--tokenizer_path",
                      converted_base["dir"] / "tokenizer.model", "--max_new_tokens", 2, check=False)
    assert_clean_error(proc, "Lit-LLaMA", "convert_lit_llama_checkpoint.py")
    torch.save(lit_llama_lora(8, [True, False, True]), tmp_path / "lora.pth")
    proc = run_script("generate/lora.py", "--checkpoint_dir", converted_base["dir"], "--lora_path", tmp_path / "lora.pth",
                      check=False)
    assert_clean_error(proc, "convert_lit_llama_checkpoint.py")
    torch.save(lit_llama_adapter(1), tmp_path / "adapter.pth")
    proc = run_script("generate/adapter.py", "--checkpoint_dir", converted_base["dir"], "--adapter_path",
                      tmp_path / "adapter.pth", check=False)
    assert_clean_error(proc, "convert_lit_llama_checkpoint.py")


def test_convert_bad_input(converted_base, tmp_path):
    lit_file = converted_base["lit_llama_file"]
    # the head count: the folder "tiny" is not one of Lit-LLaMA's size names
    proc = run_script("scripts/convert_lit_llama_checkpoint.py", "--checkpoint_path", lit_file, "--output_dir",
                      tmp_path / "out", check=False)
    assert_clean_error(proc, "'tiny'", "--model_size", "--n_head")
    proc = run_script("scripts/convert_lit_llama_checkpoint.py", "--checkpoint_path", lit_file, "--output_dir",
                      converted_base["dir"], "--n_head", N_HEAD, check=False)
    assert_clean_error(proc, "already exists", "--overwrite")
    # a LoRA file with other targets than the flags say
    torch.save(lit_llama_lora(8, [True, True, True]), tmp_path / "lora.pth")
    proc = run_script("scripts/convert_lit_llama_checkpoint.py", "--checkpoint_path", tmp_path / "lora.pth",
                      "--checkpoint_dir", converted_base["dir"], "--lora_r", 8, check=False)
    assert_clean_error(proc, "lora_", "shape", "--lora_key")
    proc = run_script("scripts/convert_lit_llama_checkpoint.py", "--checkpoint_path", tmp_path / "lora.pth",
                      check=False)
    assert_clean_error(proc, "--checkpoint_dir")
    # one of our own weights files: its format marker says it needs no conversion
    proc = run_script("scripts/convert_lit_llama_checkpoint.py", "--checkpoint_path",
                      converted_base["dir"] / "lit-llama.pth", "--out_dir", tmp_path / "again", check=False)
    assert_clean_error(proc, "lit-llama.pth is already in this repository's format")
