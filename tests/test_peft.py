"""PEFT interop: a LoRA exported with scripts/export_peft.py, loaded by transformers + peft on the base converted
back with scripts/export_hf.py, gives our logits; scripts/convert_peft_checkpoint.py brings it back exactly."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, load_script, run_script

from lit_llama.checkpoint import load_weights
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
    convert_lit = load_script("scripts/export_hf.py")
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


def trained_lora(checkpoint_dir: Path, lora: LoRAConfig, seed: int = 0, std: float = 0.3) -> LoRALLaMA:
    """Our model on the base with random nonzero A and B (as after training): the update is far from zero."""
    config = Config.from_json(checkpoint_dir / "lit_config.json")
    model = LoRALLaMA(config, lora)
    model.load_state_dict(load_weights(checkpoint_dir / "lit-llama.pth"), strict=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers():
            layer.reset_extra_parameters()  # DoRA's magnitudes: the norms of the loaded base weights
            layer.lora_A.copy_(std * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(std * torch.randn(layer.lora_B.shape, generator=g))
            if layer.dora:  # trained magnitudes: no longer the norms of W + s BA
                layer.lora_magnitude.mul_(1 + 0.3 * torch.randn(layer.lora_magnitude.shape, generator=g))
    return model.eval()


def peft_model(hf_dir: Path, adapter_dir: Path, trainable: bool = False):
    base = transformers.LlamaForCausalLM.from_pretrained(hf_dir).float()  # float32 on transformers 4 and 5
    return peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable).eval()


def tokens(vocab_size: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))


def export(checkpoint_dir: Path, model: LoRALLaMA, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(lora_state_dict(model), out / "lora.pth")
    load_script("scripts/export_peft.py").main(checkpoint_dir=checkpoint_dir, lora_path=out / "lora.pth",
                                              out_dir=out / "peft")
    return out / "peft"


def max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return (ours - theirs).abs().max().item()


# How close two implementations of the same math come. In float64 rounding is negligible: the logits and
# gradients must agree to 1e-10 of their scale (they agree exactly on the releases tested). In float32 each
# implementation rounds on its own, and sharp attention over two layers amplifies it: with peft 0.21.2 and
# transformers 5.24-5.25 (torch 2.13 and 2.14) the largest difference is 2.7e-4 on logits of size 12, 2.3e-5 of
# the scale, where our own float32 result is itself 1.9e-4 from the float64 one (older peft and transformers:
# below 1e-5 in absolute terms). peft and transformers reordered their float32 operations, not the math, so
# float32 is held to 5e-5 of the scale: about 800 float32 unit roundoffs (6e-8).
F64_RTOL = 1e-10
F32_RTOL = 5e-5


def assert_same_math(what: str, ours32, theirs32, ours64, theirs64) -> None:
    """ours vs theirs in float32 and float64 (tensors, or dicts of tensors such as gradients)."""
    if isinstance(ours32, dict):
        assert set(ours32) == set(theirs32) and set(ours64) == set(theirs64)
        pairs = [(ours32[n], theirs32[n], ours64[n], theirs64[n]) for n in ours32]
    else:
        pairs = [(ours32, theirs32, ours64, theirs64)]
    scale = max(o64.abs().max().item() for _, _, o64, _ in pairs)
    diff32 = max(max_diff(o32, t32) for o32, t32, _, _ in pairs)
    diff64 = max(max_diff(o64, t64) for _, _, o64, t64 in pairs)
    print(f"{what}: max abs diff float32 {diff32:.3g} ({diff32 / scale:.2g} of the scale {scale:.3g}), "
          f"float64 {diff64:.3g}")
    assert diff64 <= F64_RTOL * scale, what
    assert diff32 <= F32_RTOL * scale, what


@pytest.mark.slow
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
        ours64, theirs64 = model.double()(x), theirs_model.double()(x).logits
    assert max_diff(ours, base_logits) > 0.1, "the LoRA update is too small for the comparison to mean anything"
    assert_same_math(f"export {name} {combination} logits", ours, theirs, ours64, theirs64)


def test_export_bad_input(bases, tmp_path):
    checkpoint_dir, _ = bases["tiny-gqa"]
    adapter_dir = export(checkpoint_dir, trained_lora(checkpoint_dir, COMBINATIONS["query"]), tmp_path)
    args = ["--checkpoint_dir", checkpoint_dir, "--lora_path", tmp_path / "lora.pth", "--out_dir", adapter_dir]
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


def test_export_writes_files_with_the_users_permissions(bases, tmp_path):
    """safetensors creates its files readable by their owner only: the exported adapter gets the mode any new file
    of the user's gets (0666 less the umask), so that the accounts that serve it can read it."""
    import os
    import stat

    checkpoint_dir, _ = bases["tiny"]
    model = trained_lora(checkpoint_dir, COMBINATIONS["query"])
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        previous = os.umask(umask)
        try:
            adapter_dir = export(checkpoint_dir, model, tmp_path / oct(umask))
        finally:
            os.umask(previous)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert stat.S_IMODE((adapter_dir / name).stat().st_mode) == mode, (name, oct(umask))


# --- import: PEFT -> ours ------------------------------------------------------------------------------


def convert_peft_checkpoint(adapter_dir: Path, checkpoint_dir: Path, output_path: Path) -> dict:
    load_script("scripts/convert_peft_checkpoint.py").main(adapter_dir=adapter_dir, checkpoint_dir=checkpoint_dir,
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
    imported = convert_peft_checkpoint(adapter_dir, checkpoint_dir, tmp_path / "imported.pth")
    original = torch.load(tmp_path / "lora.pth")
    assert imported["lora_config"] == original["lora_config"]
    assert imported["base_config"] == original["base_config"]
    assert set(imported["state_dict"]) == set(original["state_dict"])
    for name, tensor in original["state_dict"].items():
        assert torch.equal(imported["state_dict"][name], tensor), name


def peft_made_adapter(hf_dir: Path, out: Path, **lora_kwargs) -> Path:
    """An adapter written by peft itself, with random nonzero weights (as after training)."""
    base = transformers.LlamaForCausalLM.from_pretrained(hf_dir).float()  # float32 on transformers 4 and 5
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


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [
    dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=3, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], use_rslora=True),
    dict(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "lm_head"], use_rslora=True, use_dora=True),
], ids=["qv", "rslora-k-o-mlp", "dora-all-linear", "rslora-dora-qkv-head"])
def test_import_of_peft_adapter_matches_peft_logits(kwargs, bases, tmp_path):
    checkpoint_dir, hf_dir = bases["tiny-gqa"]
    adapter_dir = peft_made_adapter(hf_dir, tmp_path / "adapter", **kwargs)
    imported = convert_peft_checkpoint(adapter_dir, checkpoint_dir, tmp_path / "imported.pth")
    lora = LoRAConfig(**imported["lora_config"])
    assert (lora.r, lora.alpha, lora.rslora, lora.dora) == (
        kwargs["r"], kwargs["lora_alpha"], kwargs.get("use_rslora", False), kwargs.get("use_dora", False))
    model = LoRALLaMA(Config.from_json(checkpoint_dir / "lit_config.json"), lora)
    model.load_state_dict({**load_weights(checkpoint_dir / "lit-llama.pth"), **imported["state_dict"]})
    model.eval()
    theirs_model = peft_model(hf_dir, adapter_dir)
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), theirs_model(x).logits
        with theirs_model.disable_adapter():
            base_logits = theirs_model(x).logits
        ours64, theirs64 = model.double()(x), theirs_model.double()(x).logits
    assert max_diff(ours, base_logits) > 0.1
    assert_same_math(f"import {kwargs} logits", ours, theirs, ours64, theirs64)


def test_import_refuses_what_our_lora_cannot_represent(bases, tmp_path):
    checkpoint_dir, hf_dir = bases["tiny-gqa"]
    adapter_dir = peft_made_adapter(hf_dir, tmp_path / "adapter", r=4, target_modules=["q_proj", "gate_proj"])
    weights = adapter_dir / "adapter_model.safetensors"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())

    def run(**changes):
        (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return run_script("scripts/convert_peft_checkpoint.py", "--adapter_dir", adapter_dir, "--checkpoint_dir", checkpoint_dir,
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
    assert_clean_error(run(target_modules=["q_proj"]), "q_proj.lora_A.weight", "(4, 4)", "expected (4, 64)")


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
    proc = run_script("scripts/convert_peft_checkpoint.py", "--adapter_dir", adapter_dir, "--checkpoint_dir", checkpoint_dir,
                      "--output_path", tmp_path / "out.pth", check=False)
    assert_clean_error(proc, "lm_head.base_layer.weight", "changed copy")


# --- rsLoRA and DoRA: parity with peft's use_rslora / use_dora, merge ---------------------------------------

VARIANTS = {"rslora": dict(rslora=True), "dora": dict(dora=True), "rslora+dora": dict(rslora=True, dora=True)}


def peft_grads(model) -> dict:
    """peft's parameter names -> gradients, in the names of its saved files (no adapter name)."""
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            name = name.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector")
            grads[name.replace(".default", "")] = p.grad
    return grads


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
@pytest.mark.parametrize("combination", ["all", "query", "value"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_logits_and_gradients_match_peft(variant, combination, name, bases, tmp_path):
    from lit_llama.peft import lora_to_peft

    checkpoint_dir, hf_dir = bases[name]
    lora = replace(COMBINATIONS[combination], r=8, alpha=3, **VARIANTS[variant])  # alpha/sqrt(r) != alpha/r
    model = trained_lora(checkpoint_dir, lora)
    adapter_dir = export(checkpoint_dir, model, tmp_path)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["use_rslora"] == lora.rslora and config["use_dora"] == lora.dora
    theirs_model = peft_model(hf_dir, adapter_dir, trainable=True)

    x = tokens()
    targets = torch.randint(0, 512, x.shape, generator=torch.Generator().manual_seed(2))

    def logits_and_gradients(dtype: torch.dtype):
        """Both models' logits and LoRA gradients (in peft's names) in `dtype`."""
        for m in (model, theirs_model):
            m.to(dtype).zero_grad(set_to_none=True)
        ours, theirs = model(x), theirs_model(x).logits
        for logits in (ours, theirs):
            torch.nn.functional.cross_entropy(logits.reshape(-1, 512), targets.reshape(-1)).backward()
        our_grads = lora_to_peft({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, lora,
                                 model.config)
        return ours.detach(), theirs.detach(), our_grads, peft_grads(theirs_model)

    ours32, theirs32, our_grads32, their_grads32 = logits_and_gradients(torch.float32)
    ours64, theirs64, our_grads64, their_grads64 = logits_and_gradients(torch.float64)
    assert set(our_grads32) == set(their_grads32)
    largest = max(g.abs().max().item() for g in our_grads32.values())
    assert largest > 1e-3, "gradients too small for the comparison to mean anything"
    what = f"{variant} {name} {combination}"
    assert_same_math(f"{what} logits", ours32, theirs32, ours64, theirs64)
    assert_same_math(f"{what} gradients", our_grads32, their_grads32, our_grads64, their_grads64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_starts_at_base_and_merged_equals_unmerged(variant, name, bases):
    from lit_llama.checkpoint import load_model, resolve_checkpoint

    checkpoint_dir, _ = bases[name]
    paths = resolve_checkpoint(checkpoint_dir)
    lora = replace(COMBINATIONS["all"], **VARIANTS[variant])
    base = load_model(paths, torch.device("cpu"), torch.float32).eval()
    fresh = load_model(paths, torch.device("cpu"), torch.float32, LoRALLaMA, lora=lora).eval()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(fresh(x), base(x))  # B = 0 and DoRA's magnitudes = ||W||: exactly the base model

    # merging rounds W + s BA once more than the unmerged forward does; through sharp attention such roundings
    # reach 1-1.5e-5 in float32 logits of size ~8 (rsLoRA without DoRA as well), so the merge's math is checked
    # in float64, float32 with room for that rounding
    model = trained_lora(checkpoint_dir, lora, std=0.1)
    for dtype, atol, rtol in ((torch.float64, 1e-10, 0), (torch.float32, 5e-5, 0)):
        model = model.to(dtype)
        with torch.no_grad():
            unmerged = model(x)
            model.merge_lora()
            merged = model(x)
            model.unmerge_lora()
            again = model(x)
        print(f"{variant} {name} {dtype}: merged vs unmerged max abs logit diff {max_diff(merged, unmerged):.3g}, "
              f"after unmerge {max_diff(again, unmerged):.3g}, vs base {max_diff(unmerged, base(x)):.3g}")
        assert max_diff(unmerged.float(), base(x)) > 0.1
        torch.testing.assert_close(merged, unmerged, atol=atol, rtol=rtol)
        torch.testing.assert_close(again, unmerged, atol=atol, rtol=rtol)
    for key, tensor in base.state_dict().items():  # the base weights are back, up to rounding
        torch.testing.assert_close(model.state_dict()[key], tensor, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory, tiny_checkpoint_dir) -> Path:
    root = tmp_path_factory.mktemp("variant-data")
    records = [{"instruction": f"Add {i % 11} and {i // 11}.", "input": "", "output": f"{i % 11 + i // 11}"}
               for i in range(60)]
    (root / "records.json").write_text(json.dumps(records))
    load_script("scripts/prepare_alpaca.py").prepare(data_file=root / "records.json", destination_path=root / "data",
                                                     checkpoint_dir=tiny_checkpoint_dir, test_split_size=8,
                                                     max_seq_length=128)
    return root / "data"


@pytest.mark.slow
def test_finetune_with_rslora_dora_then_generate_merge_export(tiny_checkpoint_dir, prepared_data, bases, tmp_path,
                                                            capsys):
    """--lora_rslora --lora_dora are stored in the LoRA file; generate (merged or not), merge_lora.py and
    export_peft.py read them from there."""
    from lit_llama.lora import load_lora_model
    from lit_llama.checkpoint import load_model, resolve_checkpoint

    load_script("finetune/lora.py").setup(
        checkpoint_dir=tiny_checkpoint_dir, data_dir=prepared_data, out_dir=tmp_path / "out", precision="32-true",
        batch_size=4, micro_batch_size=4, max_iters=4, eval_interval=0, eval_iters=1, save_interval=0,
        learning_rate=1e-2, warmup_iters=1, lora_rslora=True, lora_dora=True, lora_mlp=True)
    lora_path = tmp_path / "out" / "lit-llama-lora-finetuned.pth"
    checkpoint = torch.load(lora_path)
    assert checkpoint["lora_config"]["rslora"] and checkpoint["lora_config"]["dora"]
    magnitudes = {n: t for n, t in checkpoint["state_dict"].items() if n.endswith("lora_magnitude")}
    assert len(magnitudes) == 2 * 4  # c_attn and the three MLP projections of both layers

    paths = resolve_checkpoint(tiny_checkpoint_dir)
    base = load_model(paths, torch.device("cpu"), torch.float32).eval()
    unmerged = load_lora_model(paths, lora_path, torch.device("cpu"), torch.float32, merge=False).eval()
    norms = {n: t.norm(dim=1) for n, t in base.state_dict().items() if t.dim() == 2}
    trained = [n for n, m in magnitudes.items()
               if not torch.allclose(m, unmerged.get_submodule(n.rsplit(".", 1)[0])._adapted_rows(
                   norms[n.replace("lora_magnitude", "weight")]), atol=1e-6)]
    assert trained, "the magnitudes did not train"

    load_script("scripts/merge_lora.py").main(lora_path=lora_path, checkpoint_dir=tiny_checkpoint_dir,
                                              output_dir=tmp_path / "merged")
    merged = load_model(resolve_checkpoint(tmp_path / "merged"), torch.device("cpu"), torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        assert max_diff(unmerged(x), base(x)) > 1e-3
        assert max_diff(merged(x), unmerged(x)) < 1e-5

    generate = load_script("generate/lora.py")
    args = dict(prompt="Add 3 and 4.", lora_path=lora_path, checkpoint_dir=tiny_checkpoint_dir, temperature=0,
                max_new_tokens=8, precision="32-true")
    capsys.readouterr()
    generate.main(merge=True, **args)
    merged_text = capsys.readouterr().out
    generate.main(merge=False, **args)
    assert capsys.readouterr().out == merged_text

    # and export: peft's logits equal ours (the tiny checkpoint has no Hugging Face form yet: make one)
    convert_lit = load_script("scripts/export_hf.py")
    convert_lit.convert(checkpoint_dir=tiny_checkpoint_dir, output_dir=tmp_path / "hf")
    load_script("scripts/export_peft.py").main(checkpoint_dir=tiny_checkpoint_dir, lora_path=lora_path,
                                              output_dir=tmp_path / "peft")
    theirs_model = peft_model(tmp_path / "hf", tmp_path / "peft")
    with torch.no_grad():
        assert max_diff(unmerged(x), theirs_model(x).logits) < 1e-5


@pytest.mark.slow
def test_dora_under_fsdp_equals_one_process(tiny_checkpoint_dir, prepared_data, tmp_path):
    """DoRA's magnitudes are sharded like the other LoRA weights: two CPU processes with FSDP train exactly what
    one process trains (as tests/test_fsdp.py checks for plain LoRA)."""
    common = dict(checkpoint_dir=tiny_checkpoint_dir, data_dir=prepared_data, precision="32-true", batch_size=4,
                  micro_batch_size=2, eval_interval=0, eval_iters=1, save_interval=0, warmup_iters=1, lora_dropout=0,
                  lora_mlp=True, lora_dora=True, lora_rslora=True)
    load_script("finetune/lora.py").setup(out_dir=tmp_path / "one", max_iters=6, **common)
    two = {**common, "max_iters": 3, "devices": 2, "strategy": "fsdp", "out_dir": tmp_path / "two"}
    run_script("finetune/lora.py", *[item for key, value in two.items() for item in (f"--{key}", value)])
    one, sharded = (torch.load(tmp_path / run / "lit-llama-lora-finetuned.pth") for run in ("one", "two"))
    assert one["lora_config"] == sharded["lora_config"] and set(one["state_dict"]) == set(sharded["state_dict"])
    assert any(name.endswith("lora_magnitude") for name in one["state_dict"])
    for name, tensor in one["state_dict"].items():
        torch.testing.assert_close(sharded["state_dict"][name], tensor, atol=1e-5, rtol=0)
