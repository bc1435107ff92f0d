"""Today's LLaMA-family models (Llama 3.x with RoPE scaling and tied embeddings, Qwen2.5, Mistral), each a tiny
random model built with transformers' own class and a byte-level BPE tokenizer.json trained here: converted with
our script, our logits equal transformers' in float32, and the round trip back loads in transformers with tied
weights still tied."""

import json
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from conftest import assert_clean_error, logits_and_transformers, run_script, tiny_corpus

from lit_llama.model import Config
from lit_llama.tokenizer import Tokenizer, train_bpe_tokenizer_json
from lit_llama.checkpoint import load_model, resolve_checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

N_EMBD, N_HEAD = 64, 4
# each family: its transformers class and config fields, and its tokenizer's special tokens as its files say them
FAMILIES: Dict[str, Dict[str, Any]] = {
    "llama3": dict(  # Llama 3.1: llama3 RoPE scaling; the window of original_max_position_embeddings=16 puts
        # head dimensions in all three bands (kept, interpolated, divided by factor) at head size 16
        cls="LlamaForCausalLM", config_cls="LlamaConfig",
        config=dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=16)),
        bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True,
        specials=["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        stops=["<|eot_id|>", "<|end_of_text|>"],
    ),
    "llama-tied": dict(  # Llama 3.2 / SmolLM2: tied embeddings; linear RoPE scaling
        cls="LlamaForCausalLM", config_cls="LlamaConfig",
        config=dict(num_key_value_heads=2, rope_theta=100000.0, tie_word_embeddings=True,
                    rope_scaling=dict(rope_type="linear", factor=2.0)),
        bos="<|im_start|>", eos="<|im_end|>", add_bos=False, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        stops=["<|im_end|>"],
    ),
    "qwen2": dict(  # Qwen2.5 0.5B-3B: biases on q/k/v, tied embeddings, no bos
        cls="Qwen2ForCausalLM", config_cls="Qwen2Config",
        config=dict(num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False),
        bos=None, eos="<|im_end|>", add_bos=False, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        stops=["<|im_end|>", "<|endoftext|>"],
    ),
    "mistral": dict(  # Mistral: head_dim apart from n_embd / n_head, a sliding window longer than the tests' texts
        cls="MistralForCausalLM", config_cls="MistralConfig",
        config=dict(num_key_value_heads=2, rope_theta=1000000.0, head_dim=32, sliding_window=128,
                    tie_word_embeddings=False),
        bos="<s>", eos="</s>", add_bos=True, specials=["[INST]", "[/INST]"], stops=["</s>"],
    ),
}


def make_family_dir(folder: Path, family: str, seed: int = 0) -> "transformers.PreTrainedModel":
    """A Hugging Face model folder of `family`: a random model, its tokenizer.json and the settings files."""
    spec = FAMILIES[family]
    tokenizer_path = train_bpe_tokenizer_json(
        tiny_corpus(200), folder, vocab_size=320, special_tokens=spec["specials"], bos_token=spec["bos"],
        eos_token=spec["eos"], add_bos=spec["add_bos"])
    hf_tokenizer = Tokenizer(tokenizer_path)
    stop_ids = [hf_tokenizer.token_id(t) for t in spec["stops"]]
    config = getattr(transformers, spec["config_cls"])(
        vocab_size=hf_tokenizer.vocab_size, hidden_size=N_EMBD, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=N_HEAD, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=hf_tokenizer.bos_id,
        eos_token_id=stop_ids, pad_token_id=None, **spec["config"])
    torch.manual_seed(seed)
    model = getattr(transformers, spec["cls"])(config).eval()
    with torch.no_grad():  # weights large enough for sharp attention (a wrong rotary layout shows)
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(folder)  # writes generation_config.json from the config: eos_token_id = the stop ids
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == stop_ids
    return model


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> Dict[str, Dict[str, Any]]:
    """Per family: the HF folder ("hf"), its model ("model"), and our conversion of it in float32 ("lit")."""
    root = tmp_path_factory.mktemp("families")
    result = {}
    for family in FAMILIES:
        hf_dir, lit_dir = root / "hf" / family, root / "lit" / family
        model = make_family_dir(hf_dir, family)
        run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", hf_dir, "--out_dir", lit_dir,
                   "--dtype", "float32")
        result[family] = {"hf": hf_dir, "model": model, "lit": lit_dir}
    return result


def logit_diff(model, hf_model, kv_cache: bool = False) -> float:
    """Max |ours - transformers'| over a 2x16 batch, relative to the logits' largest magnitude."""
    ours, expected = logits_and_transformers(model, hf_model, kv_cache)
    return (ours - expected).abs().max().item() / expected.abs().max().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits_match_transformers(family, family_dirs):
    d = family_dirs[family]
    model = load_model(resolve_checkpoint(d["lit"]), torch.device("cpu"), torch.float32).eval()
    config, hf_config = model.config, FAMILIES[family]["config"]  # each family's fields came through
    assert config.tie_embeddings == hf_config["tie_word_embeddings"] and config.qkv_bias == (family == "qwen2")
    assert (config.rope_scaling or {}).get("rope_type") == hf_config.get("rope_scaling", {}).get("rope_type")
    assert config.head_size == hf_config.get("head_dim", N_EMBD // N_HEAD)
    assert config.sliding_window == hf_config.get("sliding_window")
    diff, diff_cached = logit_diff(model, d["model"]), logit_diff(model, d["model"], kv_cache=True)
    print(f"parity {family}: max logit diff / logit scale {diff:.3g}, through the KV cache {diff_cached:.3g}")
    assert diff < 1e-5 and diff_cached < 1e-5, (diff, diff_cached)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_round_trip_to_transformers(family, family_dirs, tmp_path):
    d = family_dirs[family]
    run_script("scripts/export_hf.py", "--checkpoint_dir", d["lit"], "--out_dir", tmp_path)
    cls = getattr(transformers, FAMILIES[family]["cls"])
    loaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    original = d["model"].state_dict()
    assert original.keys() == loaded.state_dict().keys()
    for name, tensor in original.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tied = FAMILIES[family]["config"]["tie_word_embeddings"]
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "generation_config.json").is_file()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer(tmp_path / "tokenizer.json")
    text = "the model <|im_start|> explain [INST] why"
    assert hf_tokenizer(text)["input_ids"] == ours.encode(text, bos=True).tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_tokenizer_from_checkpoint_files(family, family_dirs):
    spec, lit_dir = FAMILIES[family], family_dirs[family]["lit"]
    assert (lit_dir / "tokenizer.json").is_file() and not (lit_dir / "tokenizer.model").exists()
    assert (lit_dir / "tokenizer_config.json").is_file() and (lit_dir / "generation_config.json").is_file()
    tokenizer = Tokenizer(resolve_checkpoint(lit_dir).tokenizer)
    ids = {t: tokenizer.token_id(t) for t in spec["specials"] + [spec["eos"]] + ([spec["bos"]] if spec["bos"] else [])}
    assert tokenizer.eos_id == ids[spec["eos"]]
    assert tokenizer.bos_id == (ids[spec["bos"]] if spec["bos"] else None)
    assert set(tokenizer.stop_ids) == {ids[t] for t in spec["stops"] + [spec["eos"]]}
    # a special token written in the text is that token; bos only where the model's texts begin with it
    special = spec["specials"][-1]
    encoded = tokenizer.encode(f"the{special}model", bos=True).tolist()
    assert ids[special] in encoded and encoded[0] == (ids[spec["bos"]] if spec["add_bos"] else encoded[0])
    assert (encoded[0] == tokenizer.bos_id) == spec["add_bos"]
    assert tokenizer.decode(encoded) == "themodel"  # special tokens are left out of text, as SentencePiece does


def test_family_conversion_bad_input(family_dirs, tmp_path):
    """An unsupported architecture or RoPE type, or a tokenizer.json of another vocabulary: one error line,
    nothing written."""
    import shutil

    def broken(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(family_dirs["llama3"]["hf"], folder)
        change(folder)
        return folder

    def edit_config(**fields):
        def change(folder: Path) -> None:
            config = json.loads((folder / "config.json").read_text())
            config.update(fields)
            (folder / "config.json").write_text(json.dumps(config))
        return change

    def other_tokenizer(folder: Path) -> None:  # a tokenizer with ids past the model's embedding
        from tokenizers import Tokenizer as HFTokenizer

        tokenizer = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(40)])
        tokenizer.save(str(folder / "tokenizer.json"))

    cases = [
        (edit_config(model_type="gemma2", architectures=["Gemma2ForCausalLM"]), ["unsupported architecture", "gemma2"]),
        (edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0},
                     rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
         ["RoPE scaling type 'yarn' is not supported"]),
        (edit_config(rope_scaling={"rope_type": "llama3", "factor": 8.0},
                     rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}),
         ["low_freq_factor"]),
        (edit_config(attention_bias=True), ["attention_bias"]),
        (other_tokenizer, ["tokenizer", "do not belong together"]),
    ]
    for i, (change, fragments) in enumerate(cases):
        out = tmp_path / f"out{i}"
        proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", broken(f"case{i}", change),
                          "--out_dir", out, check=False)
        assert_clean_error(proc, *fragments)
        assert not (out / "lit-llama.pth").exists() and not (out / "lit_config.json").exists()


def test_config_family_fields_are_checked():
    base = dict(n_layer=1, n_head=2, n_embd=8, vocab_size=16)
    for fields, fragment in [(dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "'dynamic' is not supported"),
                             (dict(rope_scaling={"rope_type": "linear", "factor": -1}), "'factor' is -1"),
                             (dict(tie_embeddings=1), "'tie_embeddings' is 1"),
                             (dict(head_dim=0), "'head_dim' is 0")]:
        with pytest.raises(ValueError, match=fragment):
            Config(**base, **fields)
    config = Config(**base, sliding_window=4)
    from lit_llama.model import LLaMA

    model = LLaMA(config)
    model(torch.zeros(1, 4, dtype=torch.long))  # up to the window: plain causal attention
    with pytest.raises(ValueError, match="sliding window of 4"):
        model(torch.zeros(1, 5, dtype=torch.long))


# parameter counts the hub reports for each model's safetensors (a tied embedding counted once)
PUBLISHED_PARAMETERS = {
    "SmolLM2-135M": 134_515_008, "SmolLM2-360M": 361_821_120, "SmolLM2-1.7B": 1_711_376_384,
    "Qwen2.5-0.5B": 494_032_768, "Qwen2.5-1.5B": 1_543_714_304, "Qwen2.5-3B": 3_085_938_688,
    "Qwen2.5-7B": 7_615_616_512, "Llama-3.2-1B": 1_235_814_400, "Llama-3.2-3B": 3_212_749_824,
    "Llama-3.1-8B": 8_030_261_248, "Llama-3.1-70B": 70_553_706_496, "Llama-3.3-70B": 70_553_706_496,
    "Mistral-7B-v0.3": 7_248_023_552,
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_named_sizes_have_the_published_parameter_counts(name):
    from lit_llama.model import LLaMA

    with torch.device("meta"):
        model = LLaMA(Config.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


def test_tokenizer_files_that_are_not_what_they_claim(tmp_path):
    from lit_llama.cli import UserError

    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="is not a Hugging Face tokenizer.json file"):
        Tokenizer(tmp_path / "tokenizer.json")
    path = train_bpe_tokenizer_json(tiny_corpus(50), tmp_path / "ok", vocab_size=280)
    (tmp_path / "ok" / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(UserError, match="eos_token_id is 'two'"):
        Tokenizer(path)
    (tmp_path / "ok" / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object"):
        Tokenizer(path)
