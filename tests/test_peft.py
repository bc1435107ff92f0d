"""PEFT interop: a LoRA exported with scripts/export_peft.py, loaded by transformers + peft on the base converted
back with scripts/convert_lit_checkpoint.py, gives our logits; scripts/import_peft.py brings it back exactly."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, load_script, run_script

from lit_llama.lora import LoRAConfig, LoRALLaMA, lora_state_dict
from lit_llama.model import Config, LLaMA

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ("query", "key", "value", "projection", "mlp", "head")
NO_TARGETS = {t: False for t in TARGETS}
COMBINATIONS = {t: LoRAConfig(r=4, alpha=8, dropout=0.0, **{**NO_TARGETS, t: True}) for t in TARGETS}
COMBINATIONS["all"] = LoRAConfig(r=4, alpha=8, dropout=0.0, **{t: True for t in TARGETS})


def sharp_state_dict(model: torch.nn.Module, seed: int) -> dict:
    """Weights large enough for attention to be sharp (with tiny default inits attention is nearly uniform,
    and a wrong q/k layout would go unnoticed); random norm weights too."""
    g = torch.Generator().manual_seed(seed)
    return {name: (1 + 0.2 * torch.randn(t.shape, generator=g)) if "rms" in name or "ln_f" in name
            else 0.15 * torch.randn(t.shape, generator=g) for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_checkpoint_dir):
    """name -> (our checkpoint folder, its Hugging Face conversion) for an MHA and a GQA tiny model."""
    root = tmp_path_factory.mktemp("peft-bases")
    convert_lit = load_script("scripts/convert_lit_checkpoint.py")
    result = {}
    for seed, name in enumerate(("tiny", "tiny-gqa")):
        config = Config.from_name(name)
        folder = root / name
        folder.mkdir()
        torch.save(sharp_state_dict(LLaMA(config), seed), folder / "lit-llama.pth")
        config.to_json(folder / "lit_config.json")
        shutil.copy(tiny_checkpoint_dir / "tokenizer.model", folder / "tokenizer.model")
        convert_lit.convert(checkpoint_dir=folder, output_dir=root / f"{name}-hf")
        result[name] = (folder, root / f"{name}-hf")
    return result


def trained_lora(checkpoint_dir: Path, lora: LoRAConfig, seed: int = 0) -> LoRALLaMA:
    """Our model on the base with random nonzero A and B (as after training): the update is far from zero."""
    config = Config.from_json(checkpoint_dir / "lit_config.json")
    model = LoRALLaMA(config, lora)
    model.load_state_dict(torch.load(checkpoint_dir / "lit-llama.pth"), strict=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers():
            layer.reset_extra_parameters()  # DoRA's magnitudes: the norms of the loaded base weights
            layer.lora_A.copy_(0.3 * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
            if layer.dora:  # trained magnitudes: no longer the norms of W + s BA
                layer.lora_magnitude.mul_(1 + 0.3 * torch.randn(layer.lora_magnitude.shape, generator=g))
    return model.eval()


def peft_model(hf_dir: Path, adapter_dir: Path, trainable: bool = False):
    base = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable).eval()


def tokens(vocab_size: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))


def export(checkpoint_dir: Path, model: LoRALLaMA, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(lora_state_dict(model), out / "lora.pth")
    load_script("scripts/export_peft.py").main(checkpoint_dir=checkpoint_dir, lora_path=out / "lora.pth",
                                              output_dir=out / "peft")
    return out / "peft"


def max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize(
    "name, combination",
    [("tiny-gqa", c) for c in COMBINATIONS] + [("tiny", "all"), ("tiny", "query")],
)
def test_export_matches_peft_logits(name, combination, bases, tmp_path):
    checkpoint_dir, hf_dir = bases[name]
    lora = COMBINATIONS[combination]
    model = trained_lora(checkpoint_dir, lora)
    adapter_dir = export(checkpoint_dir, model, tmp_path)

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    theirs_model = peft_model(hf_dir, adapter_dir)
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), theirs_model(x).logits
        base = theirs_model.get_base_model()
        with theirs_model.disable_adapter():
            base_logits = base(x).logits
    assert max_diff(ours, base_logits) > 0.1, "the LoRA update is too small for the comparison to mean anything"
    diff = max_diff(ours, theirs)
    print(f"export {name} {combination}: max abs logit diff {diff:.3g} (|logits| up to {ours.abs().max():.3g})")
    assert diff < 1e-5


def test_export_bad_input(bases, tmp_path):
    checkpoint_dir, _ = bases["tiny-gqa"]
    adapter_dir = export(checkpoint_dir, trained_lora(checkpoint_dir, COMBINATIONS["query"]), tmp_path)
    args = ["--checkpoint_dir", checkpoint_dir, "--lora_path", tmp_path / "lora.pth", "--output_dir", adapter_dir]
    proc = run_script("scripts/export_peft.py", *args, check=False)
    assert_clean_error(proc, "adapter_model.safetensors", "--overwrite")
    proc = run_script("scripts/export_peft.py", *args[:2], "--lora_path", checkpoint_dir / "lit-llama.pth",
                      "--output_dir", tmp_path / "x", check=False)
    assert_clean_error(proc, "not a LoRA checkpoint")
    # a LoRA trained on the other base (MHA, 4 key/value heads) does not fit the GQA base
    proc = run_script("scripts/export_peft.py", "--checkpoint_dir", bases["tiny"][0], *args[2:4],
                      "--output_dir", tmp_path / "y", check=False)
    assert_clean_error(proc, "n_query_groups=2")
    assert not (tmp_path / "y").exists()


# --- import: PEFT -> ours ------------------------------------------------------------------------------


def import_peft(adapter_dir: Path, checkpoint_dir: Path, output_path: Path) -> dict:
    load_script("scripts/import_peft.py").main(adapter_dir=adapter_dir, checkpoint_dir=checkpoint_dir,
                                              output_path=output_path)
    return torch.load(output_path)


@pytest.mark.parametrize("combination", list(COMBINATIONS))
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_export_then_import_is_exact(combination, variant, bases, tmp_path):
    checkpoint_dir, _ = bases["tiny-gqa"]
    lora = replace(COMBINATIONS[combination], rslora=variant == "rslora", dora=variant == "dora", alpha=5,
                   dropout=0.1)
    model = trained_lora(checkpoint_dir, lora)
    adapter_dir = export(checkpoint_dir, model, tmp_path)
    imported = import_peft(adapter_dir, checkpoint_dir, tmp_path / "imported.pth")
    original = torch.load(tmp_path / "lora.pth")
    assert imported["lora_config"] == original["lora_config"]
    assert imported["base_config"] == original["base_config"]
    assert set(imported["state_dict"]) == set(original["state_dict"])
    for name, tensor in original["state_dict"].items():
        assert torch.equal(imported["state_dict"][name], tensor), name


def peft_made_adapter(hf_dir: Path, out: Path, **lora_kwargs) -> Path:
    """An adapter written by peft itself, with random nonzero weights (as after training)."""
    base = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("kwargs", [
    dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=3, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], use_rslora=True),
    dict(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "lm_head"], use_rslora=True, use_dora=True),
], ids=["qv", "rslora-k-o-mlp", "dora-all-linear", "rslora-dora-qkv-head"])
def test_import_of_peft_adapter_matches_peft_logits(kwargs, bases, tmp_path):
    checkpoint_dir, hf_dir = bases["tiny-gqa"]
    adapter_dir = peft_made_adapter(hf_dir, tmp_path / "adapter", **kwargs)
    imported = import_peft(adapter_dir, checkpoint_dir, tmp_path / "imported.pth")
    lora = LoRAConfig(**imported["lora_config"])
    assert (lora.r, lora.alpha, lora.rslora, lora.dora) == (
        kwargs["r"], kwargs["lora_alpha"], kwargs.get("use_rslora", False), kwargs.get("use_dora", False))
    model = LoRALLaMA(Config.from_json(checkpoint_dir / "lit_config.json"), lora)
    model.load_state_dict({**torch.load(checkpoint_dir / "lit-llama.pth"), **imported["state_dict"]})
    model.eval()
    theirs_model = peft_model(hf_dir, adapter_dir)
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), theirs_model(x).logits
        with theirs_model.disable_adapter():
            base_logits = theirs_model(x).logits
    assert max_diff(ours, base_logits) > 0.1
    diff = max_diff(ours, theirs)
    print(f"import {kwargs}: max abs logit diff {diff:.3g}")
    assert diff < 1e-5


def test_import_refuses_what_our_lora_cannot_represent(bases, tmp_path):
    checkpoint_dir, hf_dir = bases["tiny-gqa"]
    adapter_dir = peft_made_adapter(hf_dir, tmp_path / "adapter", r=4, target_modules=["q_proj", "gate_proj"])
    weights = adapter_dir / "adapter_model.safetensors"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())

    def run(**changes):
        (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return run_script("scripts/import_peft.py", "--adapter_dir", adapter_dir, "--checkpoint_dir", checkpoint_dir,
                          "--output_path", tmp_path / "out.pth", check=False)

    assert_clean_error(run(), "gate_proj", "together")  # the MLP's three projections go together
    assert_clean_error(run(modules_to_save=["lm_head"]), "modules_to_save")
    assert_clean_error(run(rank_pattern={"model.layers.0.self_attn.q_proj": 8}), "per-layer ranks")
    assert_clean_error(run(layers_to_transform=[0]), "layers_to_transform")
    assert_clean_error(run(peft_type="IA3"), "only LORA")
    assert not (tmp_path / "out.pth").exists()

    # another architecture (GPT-2's names) and a LLaMA adapter for a deeper model
    from safetensors.torch import save_file
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 64)}, weights)
    assert_clean_error(run(), "LLaMA-architecture")
    save_file({"base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}, weights)
    assert_clean_error(run(), "layer 5", "2 layers")
    # the right names, another width
    save_file({f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": torch.zeros(4, 4)
               for i in range(2) for ab in "AB"}, weights)
    assert_clean_error(run(target_modules=["q_proj"]), "q_proj.lora_B.weight", "shape")


def test_import_refuses_a_changed_copy_of_a_base_weight(bases, tmp_path):
    """peft saves lm_head's base weight beside a LoRA on lm_head: an unchanged copy is dropped, a changed one
    (a trained lm_head) is refused."""
    from safetensors.torch import load_file, save_file

    checkpoint_dir, hf_dir = bases["tiny-gqa"]
    adapter_dir = peft_made_adapter(hf_dir, tmp_path / "adapter", r=4, target_modules=["lm_head"])
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    assert "base_model.model.lm_head.base_layer.weight" in tensors
    tensors["base_model.model.lm_head.base_layer.weight"][0, 0] += 1
    save_file(tensors, weights)
    proc = run_script("scripts/import_peft.py", "--adapter_dir", adapter_dir, "--checkpoint_dir", checkpoint_dir,
                      "--output_path", tmp_path / "out.pth", check=False)
    assert_clean_error(proc, "lm_head.base_layer.weight", "changed copy")
