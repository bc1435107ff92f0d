"""GGUF in and out, checked against transformers' own GGUF loader (a reader written apart from ours) in float32.

In: tiny random LLaMAs are written as GGUF files here, the way llama.cpp's converter writes them (q/k rows
permuted, every tensor type the converter reads), and scripts/convert_gguf_checkpoint.py must give the logits
transformers gives for the same file. Out: scripts/export_gguf.py's files, read back by transformers, must give
our greedy tokens (f32) and our logits with the weights rounded as the format rounds them (f16, bf16, q8_0).
"""

import dataclasses
import json
import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run_script, tiny_corpus

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from lit_llama.gguf import HF_TO_GGUF, dequantize_like_export, field, gguf_to_hf  # noqa: E402
from lit_llama.gguf_tokenizer import (  # noqa: E402
    CONTROL,
    TokenizerMetadata,
    add_tokenizer,
    bpe_pre_tokenizer,
    tokenizer_from_sentencepiece,
)
from lit_llama.lora import LoRAConfig, LoRALLaMA, lora_state_dict  # noqa: E402
from lit_llama.model import Config, LLaMA  # noqa: E402
from lit_llama.prompts import get_prompt_style  # noqa: E402
from lit_llama.tokenizer import Tokenizer  # noqa: E402
from lit_llama.checkpoint import load_model, resolve_checkpoint
from lit_llama.convert import config_from_hf

T = gguf.GGMLQuantizationType
# every type the converter reads; the matrices of the test model take them in turn
READ_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
# byte offsets of the float16 scales (d, dmin) in a K-quant block of 256 weights (ggml-common.h); the other
# bytes (the packed 2-6 bit weights and 6-8 bit sub-block scales) take any value
K_QUANT_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
HIDDEN, N_HEAD, N_KV_HEAD, FFN, THETA = 256, 4, 2, 512, 50000.0  # rows of 256: whole K-quant blocks
PROMPTS = ["the sky is blue and the water is", "please write three tips  about healthy sleep\n\n1234"]


# --- writing GGUF files as llama.cpp's converter does -----------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rows of q/k from rotate-half to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_blocks(qtype, rows: int, cols: int, g: np.random.Generator) -> np.ndarray:
    """Random K-quant data: random packed weights and sub-block scales, small float16 block scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    data = g.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[qtype]:
        scales = (g.uniform(0.2, 1.0, size=(rows, cols // block_size)) * 2e-3).astype(np.float16)
        data[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(rows, cols // block_size, 2)
    return data.reshape(rows, -1)


def encode_tensor(w: np.ndarray, qtype, g: np.random.Generator) -> np.ndarray:
    if w.ndim == 1 or qtype == T.F32:
        return w.astype(np.float32)
    if qtype in K_QUANT_SCALES:
        return k_quant_blocks(qtype, *w.shape, g)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def write_model_gguf(path: Path, hf_model, tokenizer: TokenizerMetadata, arch: str = "llama",
                     types: Optional[List] = None, name: str = "tiny") -> None:
    """An HF model as a GGUF file: llama.cpp's metadata keys and tensor names, q/k rows permuted for the llama
    architecture, the 2-D weights in `types` in turn (K-quants as random blocks), no output.weight when tied."""
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(THETA)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    add_tokenizer(writer, tokenizer, cfg.vocab_size)
    g = np.random.default_rng(0)
    matrices = 0
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            w = llama_cpp_permute(w, cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads)
        qtype = T.F32
        if w.ndim == 2 and types:
            qtype, matrices = types[matrices % len(types)], matrices + 1
        data = encode_tensor(w, qtype, g)
        layer = re.match(r"model\.layers\.(\d+)\.(.*)", hf_name)
        gguf_name = HF_TO_GGUF[f"model.layers.{{}}.{layer.group(2)}"].format(layer.group(1)) if layer \
            else HF_TO_GGUF[hf_name]
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hf_llama(vocab_size: int, tied: bool = False, seed: int = 0, cls: str = "Llama"):
    """A tiny random model with weights large enough for attention to be sharp (a wrong q/k order shows)."""
    config = getattr(transformers, f"{cls}Config")(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
        num_attention_heads=N_HEAD, num_key_value_heads=N_KV_HEAD, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=THETA, tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return model


def sentencepiece_tokenizer(folder: Path) -> Path:
    """A tiny LLaMA-style SentencePiece tokenizer, with LLaMA's own normalization (none: the identity)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(tiny_corpus()))
    return Tokenizer.train(folder / "corpus.txt", folder, vocab_size=512, normalization_rule_name="identity",
                           remove_extra_whitespaces=False)


def bpe_tokenizer(pre: str) -> TokenizerMetadata:
    """A tiny byte-level BPE vocabulary (as SmolLM2, Llama 3 and Qwen2 have), trained here, in GGUF's form."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = bpe_pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(tiny_corpus() + ["Hello, World! 3.14159 naïve café\n\n  x"], trainer)
    data = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return TokenizerMetadata(model="gpt2", tokens=tokens, types=[CONTROL if t in specials else 1 for t in tokens],
                             merges=merges, pre=pre, bos_id=0, eos_id=2, add_bos=False)


def logits_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| relative to the logits' scale."""
    assert theirs.abs().max() > 1, "logits too small for the comparison to mean anything"
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def transformers_from_gguf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def our_model(checkpoint_dir: Path) -> LLaMA:
    return load_model(resolve_checkpoint(checkpoint_dir), torch.device("cpu"), torch.float32).eval()


# --- in -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory) -> Dict[str, Path]:
    """GGUF files of one tiny LLaMA (GQA, SentencePiece vocabulary): all float32, and every read type in turn."""
    root = tmp_path_factory.mktemp("gguf-in")
    tokenizer = tokenizer_from_sentencepiece(sentencepiece_tokenizer(root / "sp"))
    model = hf_llama(512)
    files = {"sp": root / "sp" / "tokenizer.model", "f32": root / "f32.gguf", "mixed": root / "mixed.gguf"}
    write_model_gguf(files["f32"], model, tokenizer)
    write_model_gguf(files["mixed"], model, tokenizer, types=READ_TYPES)
    files["model"] = model
    return files


@pytest.mark.parametrize("kind", ["f32", "mixed"])
def test_gguf_import_matches_transformers(kind, llama_files, tmp_path):
    path = llama_files[kind]
    run_script("scripts/convert_gguf_checkpoint.py", "--gguf_file", path, "--out_dir", tmp_path / "lit",
               "--dtype", "float32")
    assert not [p for p in tmp_path.iterdir() if p.name != "lit"], "the temporary HF folder is left behind"
    ours, reference = our_model(tmp_path / "lit"), transformers_from_gguf(path)
    assert ours.config.n_query_groups == N_KV_HEAD and ours.config.rope_theta == THETA
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x).logits
        diff = logits_diff(ours(x), expected)
        original = logits_diff(ours(x), llama_files["model"](x).logits)
    print(f"GGUF in ({kind}): max logit diff from transformers' GGUF loader {diff:.2g} of the logits' scale, "
          f"from the model before GGUF {original:.2g}")
    assert diff < 1e-5
    if kind == "f32":  # nothing rounded: the model that was written, q/k rows back in place
        assert original < 1e-5
    # the tokenizer is the one the file was made from, and encodes as transformers' reading of the file does
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    original_tokenizer, converted = Tokenizer(llama_files["sp"]), Tokenizer(tmp_path / "lit" / "tokenizer.model")
    for text in PROMPTS:
        ids = converted.encode(text).tolist()
        assert ids == original_tokenizer.encode(text).tolist() == theirs(text)["input_ids"], text
    settings = json.loads((tmp_path / "lit" / "tokenizer_config.json").read_text())
    assert settings["bos_token"] == "<s>" and settings["add_bos_token"] is True


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_gguf_bpe_tokenizer_and_tied_model_match_transformers(pre, tmp_path):
    """A byte-level BPE vocabulary becomes a tokenizer.json that encodes as transformers' reading of the GGUF
    (special tokens whole), and a tied model's Hugging Face form gives transformers' logits."""
    tokenizer = bpe_tokenizer(pre)
    model = hf_llama(len(tokenizer.tokens), tied=True)
    path = tmp_path / "bpe.gguf"
    write_model_gguf(path, model, tokenizer, types=[T.Q8_0, T.Q4_1])
    config = gguf_to_hf(path, tmp_path / "hf")
    assert config["tie_word_embeddings"] is True
    ours = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in PROMPTS + ["<|im_start|>user\nHello, World! 3.14159<|im_end|>\n", "naïve café\n\n  x  "]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    assert ours("<|im_end|>")["input_ids"] == [2]
    x = torch.randint(0, len(tokenizer.tokens), (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        assert logits_diff(ours_hf(x).logits, transformers_from_gguf(path)(x).logits) < 1e-5

    # and the whole way to a checkpoint: tied embeddings, our Tokenizer reading the tokenizer.json
    run_script("scripts/convert_gguf_checkpoint.py", "--gguf_file", path, "--out_dir", tmp_path / "lit",
               "--dtype", "float32")
    ours_lit = our_model(tmp_path / "lit")
    assert ours_lit.config.tie_embeddings
    with torch.no_grad():
        assert logits_diff(ours_lit(x), transformers_from_gguf(path)(x).logits) < 1e-5
    converted = Tokenizer(tmp_path / "lit" / "tokenizer.json")
    for text in PROMPTS + ["<|im_start|>user\nHello, World! 3.14159<|im_end|>\n"]:
        assert converted.encode(text).tolist() == theirs(text)["input_ids"], text


def test_gguf_qwen2_to_hf_matches_transformers(tmp_path):
    """qwen2 files: q/k/v biases, rows not permuted."""
    tokenizer = bpe_tokenizer("qwen2")
    model = hf_llama(len(tokenizer.tokens), cls="Qwen2")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    path = tmp_path / "qwen2.gguf"
    write_model_gguf(path, model, tokenizer, arch="qwen2")
    config = gguf_to_hf(path, tmp_path / "hf")
    assert config["model_type"] == "qwen2"
    x = torch.randint(0, len(tokenizer.tokens), (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        assert logits_diff(ours(x).logits, model(x).logits) < 1e-5
        assert logits_diff(ours(x).logits, transformers_from_gguf(path)(x).logits) < 1e-5
    run_script("scripts/convert_gguf_checkpoint.py", "--gguf_file", path, "--out_dir", tmp_path / "lit",
               "--dtype", "float32")
    ours_lit = our_model(tmp_path / "lit")
    assert ours_lit.config.qkv_bias
    with torch.no_grad():
        assert logits_diff(ours_lit(x), model(x).logits) < 1e-5


def rewrite(source: Path, target: Path, arch: Optional[str] = None, tensor_type=None) -> None:
    """A copy of a GGUF file with another architecture name, or its first matrix declared as another type."""
    reader = gguf.GGUFReader(source)
    old_arch = field(reader, "general.architecture")
    writer = gguf.GGUFWriter(str(target), arch or old_arch)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value, new_key = field(reader, key), key.replace(old_arch, arch) if arch else key
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(new_key, value)
        else:
            writer.add_key_value(new_key, value, f.types[0])
    changed = False
    for t in reader.tensors:
        data, qtype = np.asarray(t.data), t.tensor_type
        if tensor_type is not None and not changed and t.name.endswith("attn_q.weight"):
            rows = int(t.shape[1])
            block, size = gguf.GGML_QUANT_SIZES[tensor_type]
            data, qtype, changed = np.zeros((rows, int(t.shape[0]) // block * size), np.uint8), tensor_type, True
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_import_bad_input(llama_files, tmp_path):
    f32 = llama_files["f32"]
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(f32.read_bytes()[: int(f32.stat().st_size * 0.7)])
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(f32.read_bytes()[:200])
    text = tmp_path / "text.gguf"
    text.write_text("not a model\n")
    falcon, iq4 = tmp_path / "falcon.gguf", tmp_path / "iq4.gguf"
    rewrite(f32, falcon, arch="falcon")
    rewrite(f32, iq4, tensor_type=T.IQ4_NL)
    small_vocab = tmp_path / "small-vocab.gguf"  # a 512-token vocabulary on a model of 256 embedding rows
    write_model_gguf(small_vocab, hf_llama(256), tokenizer_from_sentencepiece(llama_files["sp"]))
    cases = [
        (tmp_path / "missing.gguf", "does not exist"),
        (small_vocab, "512 tokens but the embedding only 256 rows"),
        (truncated, "truncated"),
        (header_only, "not a readable GGUF file"),
        (text, "not a readable GGUF file"),
        (falcon, "architecture 'falcon'"),
        (iq4, "type IQ4_NL"),
    ]
    for path, fragment in cases:
        out = tmp_path / "out" / path.stem
        proc = run_script("scripts/convert_gguf_checkpoint.py", "--gguf_file", path, "--out_dir", out, check=False)
        assert_clean_error(proc, fragment, str(path))
        assert not out.exists(), path
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir()), "a half-written folder"


@pytest.mark.slow
def test_smollm2_through_our_exporter_is_exact(smollm2_gguf, tmp_path):
    """The real SmolLM2 (tied, byte-level BPE, ChatML template): its Hugging Face form written back by our
    GGUF writer in f32 gives transformers the logits of the original file, and the same chat answer."""
    from safetensors.torch import load_file

    from lit_llama.gguf import open_gguf, read_tokenizer, write_gguf
    from lit_llama.gguf_tokenizer import tokenizer_from_json

    path = smollm2_gguf
    hf = gguf_to_hf(path, tmp_path / "hf")
    tokenizer = tokenizer_from_json(tmp_path / "hf")
    original = read_tokenizer(open_gguf(path), path)
    assert (tokenizer.tokens, tokenizer.types, tokenizer.merges, tokenizer.pre, tokenizer.chat_template) == (
        original.tokens, original.types, original.merges, original.pre, original.chat_template)
    config = config_from_hf(hf)
    weight_map = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = ((name, load_file(tmp_path / "hf" / shard)[name]) for name, shard in weight_map.items())
    (tmp_path / "out").mkdir()
    write_gguf(tmp_path / "out" / "smollm2.gguf", tensors, config, tokenizer, "f32", "SmolLM2", tied=True)
    ours, reference = transformers_from_gguf(tmp_path / "out" / "smollm2.gguf"), transformers_from_gguf(path)
    chat = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"), gguf_file="smollm2.gguf")
    text = chat.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                    add_generation_prompt=True)
    x = torch.tensor([chat(text)["input_ids"]])
    with torch.no_grad():
        assert logits_diff(ours(x).logits, reference(x).logits) == 0.0
        answer = ours.generate(x, max_new_tokens=12, do_sample=False)[0, x.shape[1]:]
    assert "Paris" in chat.decode(answer)


# --- out ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint_dir) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-out")
    files = {}
    for dtype in ("f32", "f16", "bf16", "q8_0"):
        files[dtype] = root / dtype / "tiny.gguf"
        run_script("scripts/export_gguf.py", "--checkpoint_dir", tiny_checkpoint_dir, "--out_file", files[dtype],
                   "--dtype", dtype)
    return files


def test_gguf_export_f32_gives_our_greedy_tokens(exported, tiny_checkpoint_dir):
    from lit_llama.generation import generate

    path = exported["f32"]
    ours, reference = our_model(tiny_checkpoint_dir), transformers_from_gguf(path)
    tokenizer = Tokenizer(tiny_checkpoint_dir / "tokenizer.model")
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in PROMPTS[:1]:
        ids = tokenizer.encode(text)
        assert ids.tolist() == theirs(text)["input_ids"]
        with torch.no_grad():
            expected = reference.generate(ids[None], max_new_tokens=20, do_sample=False, min_new_tokens=20)[0]
            tokens = generate(ours, ids, max_new_tokens=20, temperature=0.0)
        assert tokens[: len(expected)].tolist() == expected.tolist()
        with torch.no_grad():
            assert logits_diff(ours(ids[None]), reference(ids[None]).logits) < 1e-5


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_gguf_export_logits_within_the_formats_rounding(dtype, exported, tiny_checkpoint_dir):
    """transformers' logits from the file are ours with each weight rounded as the format stores it, to float32
    precision; the figure printed is how far the rounding itself moves the logits."""
    ours = our_model(tiny_checkpoint_dir)
    rounded = our_model(tiny_checkpoint_dir)
    with torch.no_grad():
        for name, p in rounded.state_dict().items():
            p.copy_(dequantize_like_export(p, dtype))
    reference = transformers_from_gguf(exported[dtype])
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x).logits
        diff, rounding = logits_diff(rounded(x), expected), logits_diff(ours(x), expected)
    print(f"GGUF out {dtype}: logits {rounding:.2g} of their scale from the unrounded model, "
          f"{diff:.2g} from ours with the format's rounding")
    assert diff < 1e-5
    assert rounding > 10 * diff  # the rounding was really applied


def test_gguf_export_merges_lora_and_writes_its_prompt_style(tmp_path, tiny_checkpoint_dir):
    paths = resolve_checkpoint(tiny_checkpoint_dir)
    torch.manual_seed(1)
    lora_model = LoRALLaMA(paths.config, lora=LoRAConfig(r=4, alpha=8, query=True, value=True, mlp=True))
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    torch.save(lora_state_dict(lora_model, prompt_style="chatml"), tmp_path / "lora.pth")
    out = tmp_path / "gguf" / "tuned.gguf"
    run_script("scripts/export_gguf.py", "--checkpoint_dir", tiny_checkpoint_dir, "--lora_path", tmp_path / "lora.pth",
               "--out_file", out, "--dtype", "f32")

    from lit_llama.lora import load_lora_model

    merged = load_lora_model(paths, tmp_path / "lora.pth", torch.device("cpu"), torch.float32).eval()
    x = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert logits_diff(merged(x), transformers_from_gguf(out)(x).logits) < 1e-5
        assert logits_diff(our_model(tiny_checkpoint_dir)(x), merged(x)) > 1e-3  # the LoRA changes the model

    # the chat template and the Modelfile are the style the LoRA was trained in
    style = get_prompt_style("chatml")
    theirs = transformers.AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    text = theirs.apply_chat_template([{"role": "user", "content": "Name three colors."}], tokenize=False)
    assert text == style.prompt("Name three colors.")
    modelfile = (out.parent / "Modelfile").read_text()
    assert "FROM ./tuned.gguf" in modelfile
    assert 'TEMPLATE """<|im_start|>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<|im_end|>\n' \
           '<|im_start|>assistant\n"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_gguf_round_trip_is_exact_in_f32(exported, tiny_checkpoint_dir, tmp_path):
    run_script("scripts/convert_gguf_checkpoint.py", "--gguf_file", exported["f32"], "--out_dir", tmp_path / "back",
               "--dtype", "float32")
    before = torch.load(tiny_checkpoint_dir / "lit-llama.pth")["state_dict"]
    after = torch.load(tmp_path / "back" / "lit-llama.pth")["state_dict"]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_gguf_export_runs_in_llama_cpp(exported, tiny_checkpoint_dir):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp)")
    llm = llama_cpp.Llama(model_path=str(exported["f32"]), n_ctx=64, logits_all=True, verbose=False)
    tokenizer = Tokenizer(tiny_checkpoint_dir / "tokenizer.model")
    ids = tokenizer.encode(PROMPTS[0]).tolist()
    assert llm.tokenize(PROMPTS[0].encode(), add_bos=True) == ids
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        ours = our_model(tiny_checkpoint_dir)(torch.tensor([ids]))[0]
    assert logits_diff(ours, theirs) < 1e-3  # llama.cpp's CPU kernels sum in their own order


@pytest.mark.parametrize("overrides", [
    dict(qkv_bias=True, tie_embeddings=True),
    dict(head_dim=32, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    dict(n_query_groups=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
], ids=["qkv_bias-tied", "head_dim-llama3", "gqa-linear"])
def test_gguf_export_round_trip_of_each_model_feature(overrides, tiny_checkpoint_dir, tmp_path):
    """q/k/v biases (written as llama.cpp's qwen2), a head size apart from n_embd / n_head, and both RoPE
    scalings are written and read back to the same config and the same weights (f32: exactly)."""
    config = Config.from_name("tiny", **overrides)
    torch.manual_seed(0)
    model = LLaMA(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # zeros would not show a bias that is lost or misplaced
                p.copy_(torch.randn_like(p))
    source = tmp_path / "source"
    source.mkdir()
    torch.save(model.state_dict(), source / "lit-llama.pth")
    config.to_json(source / "lit_config.json")
    (source / "tokenizer.model").write_bytes((tiny_checkpoint_dir / "tokenizer.model").read_bytes())
    out = tmp_path / "gguf" / "m.gguf"
    run_script("scripts/export_gguf.py", "--checkpoint_dir", source, "--out_file", out, "--dtype", "f32")
    if config.qkv_bias:
        assert field(gguf.GGUFReader(out), "general.architecture") == "qwen2"
    run_script("scripts/convert_gguf_checkpoint.py", "--gguf_file", out, "--out_dir", tmp_path / "back",
               "--dtype", "float32")
    back = our_model(tmp_path / "back")
    # GGUF stores the norm's epsilon as a float32
    assert back.config.norm_eps == pytest.approx(config.norm_eps, rel=1e-7)
    assert dataclasses.replace(back.config, norm_eps=config.norm_eps) == config
    expected = model.state_dict()
    assert all(torch.equal(expected[name], p) for name, p in back.state_dict().items())
    if config.qkv_bias:  # transformers' reader of the file, written apart from ours, agrees
        x = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert logits_diff(model.eval()(x), transformers_from_gguf(out)(x).logits) < 1e-5


def test_gguf_export_bad_input(exported, tiny_checkpoint_dir, tmp_path):
    cases = [
        (["--dtype", "q4_0"], "--dtype 'q4_0'"),
        (["--out_file", exported["f32"]], "already exists"),
        (["--out_file", tmp_path], "is a directory"),
        (["--lora_path", tmp_path / "missing.pth"], "missing.pth"),
        (["--prompt_style", "vicuna"], "--prompt_style 'vicuna'"),
    ]
    for args, fragment in cases:
        argv = ["--checkpoint_dir", tiny_checkpoint_dir, "--out_file", tmp_path / "new" / "m.gguf", *args]
        proc = run_script("scripts/export_gguf.py", *argv, check=False)
        assert_clean_error(proc, fragment)
        assert not (tmp_path / "new").exists()


def test_llama3_rope_scaling_is_recognised_from_rope_freqs(llama_files, tmp_path):
    """llama.cpp stores Llama 3.x's RoPE scaling as the factors it divides each frequency by; they are
    recognised as transformers' llama3 scaling (its own frequencies, computed by transformers, agree)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lit_llama.gguf import LLAMA3_ROPE_SETTINGS, hf_config, llama3_rope_factors, open_gguf

    scaling = LLAMA3_ROPE_SETTINGS[0]
    config = transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=N_HEAD, rope_theta=500000.0,
                                      max_position_embeddings=131072, rope_scaling=dict(scaling))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = HIDDEN // N_HEAD
    default = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = llama3_rope_factors(scaling, head_dim, 500000.0)
    assert np.allclose(default.numpy() / factors, scaled.double().numpy(), rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == scaling["factor"]  # both ends of the spectrum are covered

    def with_rope_freqs(values: np.ndarray, name: str) -> Path:
        source = gguf.GGUFReader(llama_files["f32"])
        writer = gguf.GGUFWriter(str(tmp_path / name), "llama")
        for key, f in source.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            if key == "llama.rope.freq_base":
                writer.add_rope_freq_base(500000.0)
            elif f.types[0] == gguf.GGUFValueType.ARRAY:
                writer.add_array(key, field(source, key))
            else:
                writer.add_key_value(key, field(source, key), f.types[0])
        writer.add_tensor("rope_freqs.weight", values.astype(np.float32))
        for t in source.tensors:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tmp_path / name

    path = with_rope_freqs(factors, "llama3.gguf")
    assert hf_config(open_gguf(path), path)["rope_scaling"] == scaling
    odd = with_rope_freqs(factors * 1.5, "odd.gguf")
    proc = run_script("scripts/convert_gguf_checkpoint.py", "--gguf_file", odd, "--out_dir", tmp_path / "out",
                      check=False)
    assert_clean_error(proc, "rope_freqs.weight", str(odd))
    # a file with llama3 scaling converts to a checkpoint with that scaling
    run_script("scripts/convert_gguf_checkpoint.py", "--gguf_file", path, "--out_dir", tmp_path / "out")
    assert resolve_checkpoint(tmp_path / "out").config.rope_scaling == scaling
