"""Checkpoint conversion, checked against transformers' own LLaMA: HF -> lit gives the same logits, lit -> HF
gives back the same tensors, Meta's original format -> lit gives the same logits as its HF conversion."""

import json
import shutil
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from conftest import assert_clean_error, logits_and_transformers, run_script

from lit_llama.convert import meta_intermediate_size, permute_meta, unpermute_meta
from lit_llama.model import apply_rope, build_rope_cache
from lit_llama.checkpoint import load_model, resolve_checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

N_HEAD, N_EMBD, ROPE_THETA = 4, 64, 50000.0  # theta != 10000: a dropped rope_theta changes the logits


def make_hf_model(n_kv_heads: int, seed: int = 0) -> "transformers.LlamaForCausalLM":
    """A tiny random LlamaForCausalLM whose weights are large enough for attention to be sharp: with the
    default 0.02 init every attention is nearly uniform, and a wrong q/k layout would go unnoticed."""
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=N_EMBD, intermediate_size=176, num_hidden_layers=2, num_attention_heads=N_HEAD,
        num_key_value_heads=n_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=ROPE_THETA,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # random norm weights too, so that swapping the two norms of a block is noticed
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tokenizer_file(tiny_checkpoint_dir) -> Path:
    return tiny_checkpoint_dir / "tokenizer.model"  # 512 pieces, trained once per session


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer_file) -> Dict[str, Dict[str, Any]]:
    """Hugging Face folders in the three layouts found on the hub ("dirs"), and the model each holds ("models")."""
    root = tmp_path_factory.mktemp("hf")
    mha, gqa = make_hf_model(n_kv_heads=N_HEAD), make_hf_model(n_kv_heads=2, seed=1)
    dirs = {"mha-safetensors": root / "mha", "gqa-sharded": root / "gqa", "mha-bin": root / "mha-bin"}
    mha.save_pretrained(dirs["mha-safetensors"])
    gqa.save_pretrained(dirs["gqa-sharded"], max_shard_size="100KB")
    assert (dirs["gqa-sharded"] / "model.safetensors.index.json").is_file()
    save_sharded_bin(mha, dirs["mha-bin"])
    for folder in dirs.values():
        shutil.copy(tokenizer_file, folder / "tokenizer.model")
    return {"dirs": dirs, "models": {"mha-safetensors": mha, "gqa-sharded": gqa, "mha-bin": mha}}


def save_sharded_bin(model, folder: Path) -> None:
    """The older layout (transformers 5 no longer writes it): pytorch_model-0000N-of-00002.bin + index, with
    the rotary inv_freq buffers that checkpoints saved by transformers < 4.31 carry (OpenLLaMA, Llama-2-7b-hf)."""
    folder.mkdir()
    model.config.to_json_file(folder / "config.json")
    state_dict = dict(model.state_dict())
    for i in range(model.config.num_hidden_layers):
        state_dict[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(N_EMBD // N_HEAD // 2)
    names = list(state_dict)
    weight_map = {}
    for i, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        filename = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: state_dict[n].clone() for n in chunk}, folder / filename)
        weight_map.update({n: filename for n in chunk})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory) -> Dict[str, Path]:
    """Runs scripts/convert_hf_checkpoint.py on each layout (once per test module)."""
    out = tmp_path_factory.mktemp("lit")
    result = {}
    for kind, folder in hf_dirs["dirs"].items():
        proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", folder, "--out_dir", out / kind,
                          "--dtype", "float32")
        assert f"to {out / kind}" in proc.stdout
        result[kind] = out / kind
    return result


def lit_model(checkpoint_dir: Path):
    return load_model(resolve_checkpoint(checkpoint_dir), torch.device("cpu"), torch.float32).eval()


def max_logit_diff(model, hf_model, kv_cache: bool = False) -> float:
    """Max |our logits - transformers' logits| over a 2x16 batch, in one forward or through the KV cache."""
    ours, expected = logits_and_transformers(model, hf_model, kv_cache)
    return (ours - expected).abs().max().item()


@pytest.mark.parametrize("kind", ["mha-safetensors", "gqa-sharded", "mha-bin"])
def test_hf_conversion_matches_transformers(kind, hf_dirs, converted):
    hf_model = hf_dirs["models"][kind]
    model = lit_model(converted[kind])
    assert model.config.rope_theta == ROPE_THETA
    assert model.config.n_query_groups == hf_model.config.num_key_value_heads
    diff, diff_cached = max_logit_diff(model, hf_model), max_logit_diff(model, hf_model, kv_cache=True)
    print(f"parity {kind}: max abs logit diff {diff:.3g}, through the KV cache {diff_cached:.3g}")
    assert diff < 1e-5, f"{kind}: max abs logit diff {diff}"
    assert diff_cached < 1e-5, f"{kind}: max abs logit diff through the KV cache {diff_cached}"


def test_round_trip_to_hf(hf_dirs, converted, tmp_path):
    kind = "gqa-sharded"  # q/k/v of different sizes: the harder case of splitting c_attn
    run_script("scripts/export_hf.py", "--checkpoint_dir", converted[kind], "--out_dir", tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    original = hf_dirs["models"][kind].state_dict()
    round_trip = loaded.state_dict()
    assert original.keys() == round_trip.keys()
    for name, tensor in original.items():
        assert torch.equal(round_trip[name], tensor), name
    assert loaded.config.num_key_value_heads == hf_dirs["models"][kind].config.num_key_value_heads
    rope = getattr(loaded.config, "rope_parameters", None) or {"rope_theta": loaded.config.rope_theta}  # transformers 4
    assert rope["rope_theta"] == ROPE_THETA


# --- Meta's original format ---------------------------------------------------------------------

# written independently of lit_llama.convert: Meta's names, and the dimension each weight is split on
META_NAMES = [
    ("model.embed_tokens.", "tok_embeddings."), ("model.norm.", "norm."), ("lm_head.", "output."),
    ("model.layers.", "layers."), ("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
    ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"),
    ("mlp.up_proj", "feed_forward.w3"), ("mlp.down_proj", "feed_forward.w2"),
    ("post_attention_layernorm", "ffn_norm"), ("input_layernorm", "attention_norm"),
]
META_SPLIT_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def save_meta_checkpoint(hf_model, folder: Path, n_shards: int) -> None:
    """What Meta ships for this model: params.json + consolidated.0N.pth, q/k in Meta's rotary layout."""
    cfg = hf_model.config
    shards = [{} for _ in range(n_shards)]
    for name, tensor in hf_model.state_dict().items():
        for hf, meta in META_NAMES:
            name = name.replace(hf, meta)
        if name.endswith("wq.weight"):
            tensor = unpermute_meta(tensor, cfg.num_attention_heads)
        elif name.endswith("wk.weight"):
            tensor = unpermute_meta(tensor, cfg.num_key_value_heads)
        dim = META_SPLIT_DIM.get(name.split(".")[-2])
        pieces = tensor.chunk(n_shards, dim) if dim is not None else [tensor] * n_shards
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    folder.mkdir(parents=True)
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.ones(N_EMBD // N_HEAD // 2)  # LLaMA 1 files carry this buffer
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    params = dict(dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                  n_kv_heads=cfg.num_key_value_heads, multiple_of=16, norm_eps=cfg.rms_norm_eps, vocab_size=-1,
                  rope_theta=ROPE_THETA)
    (folder / "params.json").write_text(json.dumps(params))


def test_meta_conversion_matches_transformers(tmp_path, tokenizer_file):
    hf_model = make_hf_model(n_kv_heads=2, seed=2)
    save_meta_checkpoint(hf_model, tmp_path / "llama" / "tiny", n_shards=2)
    shutil.copy(tokenizer_file, tmp_path / "llama" / "tokenizer.model")  # beside the model folder, as Meta ships it
    out = tmp_path / "lit"
    proc = run_script("scripts/convert_meta_checkpoint.py", "--checkpoint_dir", tmp_path / "llama" / "tiny",
                      "--out_dir", out, "--dtype", "float32")
    assert "from 2 shard(s)" in proc.stdout
    model = lit_model(out)
    assert model.config.intermediate_size == 176 and model.config.vocab_size == 512
    diff = max_logit_diff(model, hf_model)
    print(f"parity meta (GQA, 2 shards): max abs logit diff {diff:.3g}")
    assert diff < 1e-5, f"Meta format: max abs logit diff {diff}"


def test_meta_permutation_matches_meta_rope():
    """Meta rotates neighbouring pairs of dimensions (complex multiplication, as in Meta's model.py); with the
    permuted weights our rotate-half RoPE must give the same attention scores."""
    torch.manual_seed(0)
    T, hs, n_head = 6, N_EMBD // N_HEAD, N_HEAD
    x, wq, wk = torch.randn(T, N_EMBD), torch.randn(N_EMBD, N_EMBD), torch.randn(N_EMBD, N_EMBD)

    freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, hs, 2).float() / hs))
    freqs_cis = torch.polar(torch.ones(T, hs // 2), torch.outer(torch.arange(T).float(), freqs))

    def meta_rope(w):  # (T, n_head, hs), Meta's apply_rotary_emb
        h = (x @ w.T).view(T, n_head, hs // 2, 2)
        return torch.view_as_real(torch.view_as_complex(h) * freqs_cis[:, None]).flatten(2)

    def lit_rope(w):
        cos, sin = build_rope_cache(T, hs, ROPE_THETA)
        return apply_rope((x @ permute_meta(w, n_head).T).view(1, T, n_head, hs).transpose(1, 2), cos, sin)[0]

    meta_scores = torch.einsum("thd,shd->hts", meta_rope(wq), meta_rope(wk))
    lit_scores = lit_rope(wq) @ lit_rope(wk).transpose(-1, -2)
    torch.testing.assert_close(lit_scores, meta_scores, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(unpermute_meta(permute_meta(wq, n_head), n_head), wq, atol=0, rtol=0)


def test_meta_intermediate_size():
    # params.json values of Meta's releases -> the hidden sizes of their weights
    assert meta_intermediate_size(4096, 256) == 11008  # LLaMA 7B
    assert meta_intermediate_size(6656, 256) == 17920  # LLaMA 30B
    assert meta_intermediate_size(8192, 256) == 22016  # LLaMA 65B
    assert meta_intermediate_size(8192, 4096, 1.3) == 28672  # Llama 2 70B
    assert meta_intermediate_size(N_EMBD, 16) == 176


# --- bad input ----------------------------------------------------------------------------------


def test_convert_hf_bad_input(tmp_path, hf_dirs, converted):
    script = "scripts/convert_hf_checkpoint.py"
    assert_clean_error(run_script(script, "--checkpoint_dir", tmp_path / "missing", check=False), "--checkpoint_dir")

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert_clean_error(run_script(script, "--checkpoint_dir", gpt2, "--out_dir", tmp_path / "out", check=False),
                       "config.json", "gpt2")

    # a tensor is missing: one shard of a sharded checkpoint, without its index
    partial = tmp_path / "partial"
    shutil.copytree(hf_dirs["dirs"]["gqa-sharded"], partial)
    next(partial.glob("model-00002-*.safetensors")).unlink()
    (partial / "model.safetensors.index.json").unlink()
    assert_clean_error(run_script(script, "--checkpoint_dir", partial, "--out_dir", tmp_path / "out", check=False),
                       "missing")

    # never silently overwrites; --overwrite true does, here in the default dtype
    existing = converted["mha-safetensors"]
    before = (existing / "lit-llama.pth").stat().st_mtime_ns
    args = ("--checkpoint_dir", hf_dirs["dirs"]["mha-safetensors"], "--out_dir", existing)
    assert_clean_error(run_script(script, *args, check=False), "already exists", "--overwrite")
    assert (existing / "lit-llama.pth").stat().st_mtime_ns == before
    copy = tmp_path / "overwritten"
    shutil.copytree(existing, copy)
    run_script(script, *args[:-1], copy, "--overwrite", "true")
    state_dict = torch.load(copy / "lit-llama.pth", weights_only=True)["state_dict"]
    assert {t.dtype for t in state_dict.values()} == {torch.bfloat16}


def test_convert_other_scripts_bad_input(tmp_path, hf_dirs, converted):
    # a Hugging Face folder given to the Meta converter
    proc = run_script("scripts/convert_meta_checkpoint.py", "--checkpoint_dir", hf_dirs["dirs"]["mha-safetensors"],
                      "--out_dir", tmp_path / "out", check=False)
    assert_clean_error(proc, "params.json")
    # lit -> HF never silently overwrites either
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    proc = run_script("scripts/export_hf.py", "--checkpoint_dir", converted["gqa-sharded"],
                      "--out_dir", tmp_path / "hf", check=False)
    assert_clean_error(proc, "already exists", "--overwrite")


@pytest.mark.slow
def test_download_offline(tmp_path, monkeypatch):
    # never touch the real network: offline mode, and an endpoint where nothing listens should it be ignored
    # (a subprocess: huggingface_hub reads both when it is imported)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    proc = run_script("scripts/download.py", "--repo_id", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "--out_dir",
                      tmp_path, check=False, timeout=120, isolated=True)
    assert_clean_error(proc, "could not reach the Hugging Face hub", "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                       "network access")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_download_gives_up_on_a_hub_that_never_answers(tmp_path):
    """An endpoint that accepts connections and never answers: one line after the timeout, not a hang."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))  # localhost only, any free port
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept_and_say_nothing():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "HF_HUB_ETAG_TIMEOUT": "2",
           "HF_HUB_DOWNLOAD_TIMEOUT": "2", "HF_HUB_OFFLINE": "0"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            proc = run_script("scripts/download.py", "--repo_id", "owner/model", "--out_dir", tmp_path, check=False,
                              timeout=120, isolated=True)
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()
    assert held, "the script never connected"
    assert_clean_error(proc, "127.0.0.1", "did not answer within 2 s", "owner/model")
    assert not any(tmp_path.iterdir())


def test_convert_from_a_hugging_face_cache_snapshot(tmp_path, hf_dirs):
    """In huggingface_hub's cache the files of a snapshot are links into the repository's blobs/ folder: they
    are read, although links out of the folder an index names are refused elsewhere."""
    repo = tmp_path / "models--owner--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(hf_dirs["dirs"]["gqa-sharded"].iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", snapshot, "--out_dir", tmp_path / "out")
    assert (tmp_path / "out" / "lit-llama.pth").is_file()
