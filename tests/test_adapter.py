import math
from dataclasses import asdict

import pytest
import torch
from conftest import make_checkpoint_dir

from lit_llama.adapter import (
    AdapterAttention,
    AdapterConfig,
    AdapterLLaMA,
    adapter_config_from_checkpoint,
    adapter_state_dict,
    load_adapter_model,
    load_adapter_state_dict,
    mark_only_adapter_as_trainable,
)
from lit_llama.generation import generate
from lit_llama.model import CausalSelfAttention, Config, LLaMA, RMSNorm, apply_rope, build_rope_cache
from lit_llama.checkpoint import is_extra_parameter, load_model, load_state_dict, resolve_checkpoint
from lit_llama.cli import UserError

VERSIONS_AND_SIZES = [(v, name) for v in (1, 2) for name in ("tiny", "tiny-gqa")]


def adapter_config(name: str = "tiny", version: int = 1, **overrides) -> AdapterConfig:
    fields = {**dict(adapter_start_layer=1, adapter_version=version, adapter_prompt_length=4), **overrides}
    return AdapterConfig(**{**asdict(Config.from_name(name)), **fields})


def base_and_adapter(name: str, version: int, seed: int = 0):
    """A random base model and an adapter model with the same base weights and fresh adapter parameters."""
    torch.manual_seed(seed)
    base = LLaMA.from_name(name).eval()
    model = AdapterLLaMA(adapter_config(name, version)).eval()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(is_extra_parameter(n) for n in missing)
    return base, model


def randomize_adapter(model: AdapterLLaMA, seed: int = 1) -> None:
    """Non-trivial adapter values (a trained adapter), so it actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_" in name:
                param.add_(0.5 * torch.randn(param.shape, generator=g))


@pytest.mark.parametrize("version, name", VERSIONS_AND_SIZES)
def test_fresh_adapter_equals_base_model(version, name):
    base, model = base_and_adapter(name, version)
    assert model.transformer.h[0].attn.adapter_wte is None  # below adapter_start_layer
    assert model.transformer.h[1].attn.adapter_wte.weight.shape == (4, 64)
    assert model.transformer.h[1].attn.adapter_gating_factor.shape == (1, 4, 1, 1)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("version", [1, 2])
def test_adapter_changes_output_once_trained(version):
    base, model = base_and_adapter("tiny", version)
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        expected = base(x)
        model.transformer.h[1].attn.adapter_wte.weight.normal_()  # the prompt alone: the zero gate hides it
        assert torch.equal(model(x), expected)
        model.transformer.h[1].attn.adapter_gating_factor.fill_(0.5)
        assert not torch.allclose(model(x), expected, atol=1e-3)
    if version == 2:
        _, model = base_and_adapter("tiny", version)
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc1.adapter_bias.fill_(0.1)
            assert not torch.allclose(model(x), expected, atol=1e-3)


def reference_attention(attn: AdapterAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The original LLaMA-Adapter's attention (ZrrSkywalker/LLaMA-Adapter llama/model.py), written out: the
    rotated queries score the unrotated prompt keys in a softmax of their own; the gated result is added
    to the token attention before the output projection."""
    cfg = attn.config
    B, T, _ = x.shape
    hs, q_size, kv_size = cfg.head_size, cfg.n_head * cfg.head_size, cfg.n_query_groups * cfg.head_size

    def heads(t, n):  # (b, t, n*hs) -> (b, n_head, t, hs), key/value heads repeated for grouped-query
        t = t.view(t.size(0), t.size(1), n, hs).transpose(1, 2)
        return t.repeat_interleave(cfg.n_head // n, dim=1)

    q, k, v = attn.c_attn(x).split((q_size, kv_size, kv_size), dim=-1)
    q, k, v = heads(q, cfg.n_head), heads(k, cfg.n_query_groups), heads(v, cfg.n_query_groups)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    _, pk, pv = attn.c_attn(attn.adapter_wte.weight[None]).split((q_size, kv_size, kv_size), dim=-1)
    pk, pv = heads(pk, cfg.n_query_groups), heads(pv, cfg.n_query_groups)  # no rotation: no position
    prompt_scores = (q @ pk.transpose(-1, -2) / math.sqrt(hs)).softmax(-1)
    out = out + attn.adapter_gating_factor * (prompt_scores @ pv)
    return attn.c_proj(out.transpose(1, 2).reshape(B, T, q_size))


@pytest.mark.parametrize("version, name", VERSIONS_AND_SIZES)
def test_attention_matches_reference_formula(version, name):
    _, model = base_and_adapter(name, version)
    randomize_adapter(model)
    attn = model.transformer.h[1].attn
    assert AdapterAttention.forward is CausalSelfAttention.forward  # only the attention step is extended
    x = torch.randn(2, 7, model.config.n_embd)
    cos, sin = build_rope_cache(7, model.config.head_size)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, cos, sin), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_only_adapter_parameters_train(version):
    _, model = base_and_adapter("tiny-gqa", version)
    model.transformer.h[1].attn.adapter_gating_factor.data.fill_(0.1)  # else the prompt gets zero gradient
    mark_only_adapter_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_names = {n for n, _ in model.named_parameters() if "adapter_" in n}
    norm_names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    assert trainable == (adapter_names | norm_names if version == 2 else adapter_names)
    if version == 2:  # scale and bias on the 5 linear layers of both blocks
        assert sum("adapter_scale" in n or "adapter_bias" in n for n in adapter_names) == 2 * 5 * 2

    model(torch.randint(0, 512, (2, 8))).logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_v2_trains_with_float32_adapter_in_bf16_model():
    """Fine-tune scripts keep trainable parameters in float32 while the frozen model is bf16."""
    _, model = base_and_adapter("tiny", 2)
    model = model.to(torch.bfloat16)
    mark_only_adapter_as_trainable(model)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    logits = model(torch.randint(0, 512, (1, 8)))
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert model.transformer.h[1].attn.adapter_gating_factor.grad.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("version, name", VERSIONS_AND_SIZES)
def test_kv_cache_matches_full_forward(version, name):
    _, model = base_and_adapter(name, version)
    randomize_adapter(model)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        full = model(x)
        model.set_kv_cache(batch_size=2, max_seq_length=16)
        chunks = [model(x[:, a:b], torch.arange(a, b)) for a, b in ((0, 5), (5, 6), (6, 12))]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)

    prompt = torch.randint(0, 512, (5,))
    with_cache = generate(model, prompt, max_new_tokens=10, temperature=0)
    without_cache = generate(model, prompt, max_new_tokens=10, temperature=0, use_kv_cache=False)
    assert with_cache.shape == (15,)
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("version", [1, 2])
def test_state_dict_round_trip(tmp_path, version):
    base, model = base_and_adapter("tiny-gqa", version)
    randomize_adapter(model)
    if version == 2:
        with torch.no_grad():
            model.transformer.ln_f.weight.mul_(1.5)  # a trained norm must be saved too
    state = adapter_state_dict(model)
    assert state["adapter_config"] == dict(
        adapter_version=version, adapter_prompt_length=4, adapter_start_layer=1, adapter_head=False,
        n_layer=2, n_embd=64, n_head=4, n_query_groups=2, vocab_size=512, prompt_style="alpaca",
    )
    tensor_names = set(state) - {"adapter_config"}
    assert tensor_names == {n for n, p in model.named_parameters() if "adapter_" in n or (
        version == 2 and ("rms_" in n or "ln_f" in n))}
    path = tmp_path / "adapter.pth"
    torch.save(state, path)

    checkpoint = load_state_dict(path)  # how the generate script reads it
    config = adapter_config_from_checkpoint(checkpoint, base.config, path)
    assert (config.adapter_version, config.adapter_prompt_length, config.adapter_start_layer) == (version, 4, 1)
    fresh = AdapterLLaMA(config).eval()
    fresh.load_state_dict(base.state_dict(), strict=False)
    load_adapter_state_dict(fresh, checkpoint, path)
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_mismatched_checkpoints_are_user_errors(tmp_path):
    base, model = base_and_adapter("tiny", 1)
    state = adapter_state_dict(model)
    path = tmp_path / "adapter.pth"

    v2_model = AdapterLLaMA(adapter_config("tiny", 2))
    with pytest.raises(UserError, match=r"adapter\.pth does not match this model: adapter_version=1 \(model: 2\)"):
        load_adapter_state_dict(v2_model, state, path)

    bigger = Config.from_name("tiny", n_embd=128)
    with pytest.raises(UserError, match=r"adapter\.pth does not match this model: n_embd=64 \(model: 128\)"):
        load_adapter_state_dict(AdapterLLaMA(bigger, adapter_start_layer=1, adapter_prompt_length=4), state, path)
    with pytest.raises(UserError, match=r"adapter\.pth was trained on another base model: n_embd=64"):
        adapter_config_from_checkpoint(state, bigger, path)

    with pytest.raises(UserError, match="adapter_prompt_length=4 \\(model: 10\\)"):
        load_adapter_state_dict(AdapterLLaMA(Config.from_name("tiny"), adapter_start_layer=1), state, path)
    with pytest.raises(UserError, match="not an adapter checkpoint"):
        load_adapter_state_dict(model, base.state_dict(), path)  # e.g. a base checkpoint
    legacy = {k: v for k, v in state.items() if k != "adapter_config"}  # an adapter file without settings
    with pytest.raises(UserError, match="holds adapter weights but no adapter_config"):
        adapter_config_from_checkpoint(legacy, model.config, path)
    damaged = {k: v for k, v in state.items() if not k.startswith("transformer.h.1.attn.adapter_wte")}
    with pytest.raises(UserError, match="does not fit this model: missing"):
        load_adapter_state_dict(model, damaged, path)


def test_config_validation():
    config = AdapterConfig.from_config(Config.from_name("7B"))
    assert (config.adapter_version, config.adapter_prompt_length, config.adapter_start_layer) == (1, 10, 2)
    assert AdapterConfig.from_config(config, adapter_version=2).adapter_prompt_length == 10  # keeps its settings
    with pytest.raises(ValueError, match="adapter_version"):
        adapter_config(version=3)
    with pytest.raises(ValueError, match="adapter_start_layer"):
        adapter_config(adapter_start_layer=2)  # tiny has 2 layers: no layer would be adapted
    with pytest.raises(TypeError):
        AdapterLLaMA(Config.from_name("tiny"), adapter_lenght=3)


def test_builds_on_meta_device():
    with torch.device("meta"):
        model = AdapterLLaMA(AdapterConfig.from_config(Config.from_name("7B"), adapter_version=2))
    assert model.transformer.h[31].attn.adapter_wte.weight.is_meta
    assert model.config.adapter_prompt_length == 10 and model.config.adapter_start_layer == 2


@pytest.mark.parametrize("version, name", [(1, "tiny"), (2, "tiny-gqa")])
def test_load_model_from_base_checkpoint(tmp_path, version, name):
    paths = resolve_checkpoint(make_checkpoint_dir(tmp_path / name, name=name))
    base = load_model(paths, torch.device("cpu"), torch.float32).eval()
    # finetune script: base checkpoint + adapter settings as keyword arguments
    model = load_model(
        paths, torch.device("cpu"), torch.float32, model_class=AdapterLLaMA,
        adapter_version=version, adapter_start_layer=1, adapter_prompt_length=4,
    ).eval()
    # parameters the base checkpoint lacks got their initial values, not to_empty()'s garbage
    attn = model.transformer.h[1].attn
    assert torch.equal(attn.adapter_gating_factor, torch.zeros(1, 4, 1, 1))
    assert attn.adapter_wte.weight.isfinite().all() and attn.adapter_wte.weight.std() > 0.5
    if version == 2:
        assert torch.equal(attn.c_attn.adapter_scale, torch.ones(attn.c_attn.out_features))
        assert torch.equal(model.transformer.h[0].mlp.c_proj.adapter_bias, torch.zeros(64))
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(x), base(x))

    # generate script: the adapter file says which model to build on the base checkpoint
    randomize_adapter(model)
    adapter_path = tmp_path / "adapter.pth"
    torch.save(adapter_state_dict(model), adapter_path)
    loaded = load_adapter_model(paths, adapter_path, torch.device("cpu"), torch.float32).eval()
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations inside peft
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_matches_peft_adaption_prompt(name):
    """Hugging Face PEFT's LLaMA-Adapter ("adaption prompt", one gate per layer) on the same weights."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    _, model = base_and_adapter(name, 1)
    cfg = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_query_groups,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.block_size, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
    ))
    q_size, kv_size = cfg.n_head * cfg.head_size, cfg.n_query_groups * cfg.head_size
    hf_weights = {"model.embed_tokens.weight": model.transformer.wte.weight,
                  "model.norm.weight": model.transformer.ln_f.weight, "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.transformer.h):
        q, k, v = block.attn.c_attn.weight.split((q_size, kv_size, kv_size))
        attn_weights = dict(q_proj=q, k_proj=k, v_proj=v, o_proj=block.attn.c_proj.weight)
        hf_weights.update({f"model.layers.{i}.self_attn.{n}.weight": w for n, w in attn_weights.items()})
        mlp = block.mlp
        mlp_weights = dict(gate_proj=mlp.c_fc1.weight, up_proj=mlp.c_fc2.weight, down_proj=mlp.c_proj.weight)
        hf_weights.update({f"model.layers.{i}.mlp.{n}.weight": w for n, w in mlp_weights.items()})
        hf_weights[f"model.layers.{i}.input_layernorm.weight"] = block.rms_1.weight
        hf_weights[f"model.layers.{i}.post_attention_layernorm.weight"] = block.rms_2.weight
    hf.load_state_dict({n: w.detach().clone() for n, w in hf_weights.items()})
    peft_config = peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM")
    reference = peft.get_peft_model(hf, peft_config)
    (adapted,) = [m for m in reference.modules() if hasattr(m, "adaption_prompt")]
    attn = model.transformer.h[1].attn
    with torch.no_grad():
        adapted.adaption_prompt.copy_(attn.adapter_wte.weight[None])
        adapted.adaption_gate.fill_(0.7)
        attn.adapter_gating_factor.fill_(0.7)
        x = torch.randint(0, 512, (2, 10))
        torch.testing.assert_close(model(x), reference.eval()(input_ids=x).logits, atol=1e-5, rtol=0)
