"""Tokenizers in GGUF files, in and out: llama.cpp keeps a model's tokenizer as metadata (the vocabulary, the
merges or scores, the special token ids, the chat template) instead of a tokenizer file.

In: `tokenizer_from_metadata` reads those values (`lit_llama.gguf.read_tokenizer` takes them from a file) and
`tokenizer_files` writes them as the files a Hugging Face model folder has: a SentencePiece `tokenizer.model`
for llama.cpp's `llama` vocabularies (pieces, scores and types are exactly what a SentencePiece model holds), a
`tokenizer.json` for its `gpt2` (byte-level BPE) vocabularies, and bos/eos, whether bos is added and the chat
template in `tokenizer_config.json` and `generation_config.json`.

Out: `tokenizer_from_sentencepiece` / `tokenizer_from_json` read a checkpoint's tokenizer into the same form,
`add_tokenizer` writes it into a GGUF file, and `jinja_chat_template` / `ollama_modelfile` turn one of our
prompt styles into the chat template and the Ollama Modelfile that go with it.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lit_llama.cli import UserError

# llama.cpp's token types (the same numbers as SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's names of byte-level BPE pre-tokenizers -> the split regex it uses (None: GPT-2's, which the
# `tokenizers` ByteLevel pre-tokenizer applies itself) and whether digits are split one by one first
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE_TOKENIZERS = {
    "default": (None, False),
    "gpt-2": (None, False),
    "smollm": (None, True),
    "llama-bpe": (LLAMA3_SPLIT, False),
    "qwen2": (QWEN2_SPLIT, False),
}


def bpe_pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    split, digits = BPE_PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


@dataclass
class TokenizerMetadata:
    """A tokenizer as GGUF stores it."""
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: List[str]
    types: List[int]
    scores: Optional[List[float]] = None  # llama
    merges: Optional[List[str]] = None  # gpt2: "left right"
    pre: Optional[str] = None  # gpt2: llama.cpp's name of the pre-tokenizer
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    unk_id: Optional[int] = None
    pad_id: Optional[int] = None
    add_bos: bool = False
    add_space_prefix: bool = True  # llama: SentencePiece's dummy prefix ("▁" before the text)
    chat_template: Optional[str] = None

    def token(self, token_id: Optional[int]) -> Optional[str]:
        return self.tokens[token_id] if token_id is not None and 0 <= token_id < len(self.tokens) else None


def tokenizer_from_metadata(values: Dict[str, Any], path: Path) -> TokenizerMetadata:
    """A tokenizer from a GGUF file's `tokenizer.*` metadata values (key -> value), refused in one line when a
    value it needs is missing."""
    model = values.get("tokenizer.ggml.model")
    if model not in ("llama", "gpt2"):
        raise UserError(f"{path}: tokenizer type {model!r} is not read here (llama.cpp's 'llama' SentencePiece and "
                        "'gpt2' byte-level BPE vocabularies are)")
    tokens = values.get("tokenizer.ggml.tokens") or []
    types = values.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    meta = TokenizerMetadata(
        model=model, tokens=tokens, types=[int(t) for t in types],
        scores=values.get("tokenizer.ggml.scores"), merges=values.get("tokenizer.ggml.merges"),
        pre=values.get("tokenizer.ggml.pre", "default"),
        bos_id=values.get("tokenizer.ggml.bos_token_id"), eos_id=values.get("tokenizer.ggml.eos_token_id"),
        unk_id=values.get("tokenizer.ggml.unknown_token_id"), pad_id=values.get("tokenizer.ggml.padding_token_id"),
        # llama.cpp adds bos to a SentencePiece vocabulary that does not say otherwise
        add_bos=bool(values.get("tokenizer.ggml.add_bos_token", model == "llama")),
        add_space_prefix=bool(values.get("tokenizer.ggml.add_space_prefix", True)),
        chat_template=values.get("tokenizer.chat_template"),
    )
    if not tokens or len(types) != len(tokens):
        raise UserError(f"{path}: tokenizer.ggml.tokens and token_type are missing or of different lengths")
    if model == "llama" and (meta.scores is None or len(meta.scores) != len(tokens)):
        raise UserError(f"{path}: a 'llama' vocabulary needs tokenizer.ggml.scores, one per token")
    if model == "gpt2":
        if meta.merges is None:
            raise UserError(f"{path}: a 'gpt2' vocabulary needs tokenizer.ggml.merges")
        if meta.pre not in BPE_PRE_TOKENIZERS:
            raise UserError(f"{path}: pre-tokenizer {meta.pre!r} is not one this converter knows "
                            f"({', '.join(BPE_PRE_TOKENIZERS)})")
    return meta


def sentencepiece_model(meta: TokenizerMetadata) -> bytes:
    """A SentencePiece `tokenizer.model` holding exactly the GGUF's pieces, scores and types. LLaMA's tokenizer
    is a SentencePiece BPE model without text normalization; GGUF keeps all of that but the normalization
    table, and llama.cpp applies none."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(meta.tokens)
    proto.trainer_spec.byte_fallback = BYTE in meta.types
    # SentencePiece wants the four ids distinct; files that pad with eos or unk get no pad id of their own
    pad_id = meta.pad_id if meta.pad_id not in (meta.unk_id, meta.bos_id, meta.eos_id) else None
    for name, token_id in (("unk_id", meta.unk_id), ("bos_id", meta.bos_id), ("eos_id", meta.eos_id),
                           ("pad_id", pad_id)):
        setattr(proto.trainer_spec, name, -1 if token_id is None else int(token_id))
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = meta.add_space_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(meta.tokens, meta.scores, meta.types):
        piece = proto.pieces.add()
        piece.piece, piece.score = token, float(score)
        piece.type = kind if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL
    return proto.SerializeToString()


def bpe_tokenizer_json(meta: TokenizerMetadata) -> str:
    """A Hugging Face `tokenizer.json` of a byte-level BPE vocabulary (GPT-2, Llama 3, Qwen2, SmolLM)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    vocab = {token: i for i, token in enumerate(meta.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.merges]
    # Llama 3's tokenizer takes a whole pre-token from the vocabulary when it is there, before merging
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=meta.pre == "llama-bpe")
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = bpe_pre_tokenizer(meta.pre)
    tokenizer.decoder = decoders.ByteLevel()
    if meta.add_bos and meta.bos_id is not None:
        bos = meta.tokens[meta.bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, meta.bos_id)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # control tokens (<|im_start|>, <|eot_id|>) and user-defined ones are matched whole in the text
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(meta.tokens, meta.types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(meta.tokens, meta.types) if kind == USER_DEFINED])
    return tokenizer.to_str(pretty=True)


def tokenizer_files(meta: TokenizerMetadata) -> Dict[str, str | bytes]:
    """The tokenizer files of a Hugging Face model folder: the tokenizer itself, tokenizer_config.json and
    generation_config.json (bos, eos, whether bos is added, the chat template)."""
    files: Dict[str, str | bytes] = {}
    if meta.model == "llama":
        files["tokenizer.model"] = sentencepiece_model(meta)
    else:
        files["tokenizer.json"] = bpe_tokenizer_json(meta)
    config: Dict[str, Any] = {
        "bos_token": meta.token(meta.bos_id), "eos_token": meta.token(meta.eos_id),
        "unk_token": meta.token(meta.unk_id), "pad_token": meta.token(meta.pad_id),
        "add_bos_token": meta.add_bos, "add_eos_token": False,
        "tokenizer_class": "LlamaTokenizer" if meta.model == "llama" else "PreTrainedTokenizerFast",
    }
    if meta.chat_template:
        config["chat_template"] = meta.chat_template
    files["tokenizer_config.json"] = json.dumps({k: v for k, v in config.items() if v is not None}, indent=2,
                                                ensure_ascii=False) + "\n"
    generation = {k: v for k, v in (("bos_token_id", meta.bos_id), ("eos_token_id", meta.eos_id)) if v is not None}
    files["generation_config.json"] = json.dumps(generation, indent=2) + "\n"
    return files


def add_tokenizer(writer: Any, meta: TokenizerMetadata, vocab_size: int) -> None:
    """The tokenizer as metadata. llama.cpp wants one token per embedding row: a padded vocabulary gets
    unused [PAD{i}] tokens, as llama.cpp's own converter writes them."""
    tokens, types = list(meta.tokens), list(meta.types)
    scores = list(meta.scores) if meta.scores is not None else None
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    writer.add_tokenizer_model(meta.model)
    if meta.model == "gpt2":
        writer.add_tokenizer_pre(meta.pre)
        writer.add_token_merges(meta.merges)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    for add, token_id in ((writer.add_bos_token_id, meta.bos_id), (writer.add_eos_token_id, meta.eos_id),
                          (writer.add_unk_token_id, meta.unk_id), (writer.add_pad_token_id, meta.pad_id)):
        if token_id is not None and token_id >= 0:
            add(int(token_id))
    writer.add_add_bos_token(meta.add_bos)
    writer.add_add_eos_token(False)
    if meta.model == "llama":
        writer.add_add_space_prefix(meta.add_space_prefix)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)


def tokenizer_from_sentencepiece(path: Path) -> TokenizerMetadata:
    """GGUF's form of a SentencePiece `tokenizer.model` (its pieces, scores and types are GGUF's)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(Path(path).read_bytes())
    spec = proto.trainer_spec

    def token_id(value: int) -> Optional[int]:
        return value if value >= 0 else None

    return TokenizerMetadata(
        model="llama", tokens=[p.piece for p in proto.pieces], scores=[p.score for p in proto.pieces],
        types=[int(p.type) for p in proto.pieces], bos_id=token_id(spec.bos_id), eos_id=token_id(spec.eos_id),
        unk_id=token_id(spec.unk_id), pad_id=token_id(spec.pad_id), add_bos=True,
        add_space_prefix=proto.normalizer_spec.add_dummy_prefix,
    )


def tokenizer_from_json(folder: Path) -> TokenizerMetadata:
    """GGUF's form of a Hugging Face byte-level BPE `tokenizer.json` (with the bos/eos of tokenizer_config.json
    or generation_config.json beside it). Its pre-tokenizer must be one llama.cpp knows by name."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{path}: a {model.get('type')!r} tokenizer; GGUF export writes byte-level BPE ones")
    tokenizer = Tokenizer.from_str(json.dumps(data))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [""] * size
    for token, i in vocab.items():
        tokens[i] = token
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    types = [(CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = next((name for name in BPE_PRE_TOKENIZERS
                if json.loads(_with_pre_tokenizer(name))["pre_tokenizer"] == data.get("pre_tokenizer")), None)
    if pre is None:
        raise UserError(f"{path}: its pre-tokenizer is none that llama.cpp knows by name "
                        f"({', '.join(BPE_PRE_TOKENIZERS)})")
    settings = _read_json(Path(folder) / "tokenizer_config.json")
    generation = _read_json(Path(folder) / "generation_config.json")

    def special_id(name: str) -> Optional[int]:
        token = settings.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            return vocab[token]
        value = generation.get(f"{name}_id")
        return value[0] if isinstance(value, list) else value

    post = data.get("post_processor") or {}
    bos_id = special_id("bos_token")
    add_bos = settings.get("add_bos_token", bos_id is not None and bos_id in _post_processor_ids(post))
    return TokenizerMetadata(
        model="gpt2", tokens=tokens, types=types, merges=merges, pre=pre, bos_id=bos_id,
        eos_id=special_id("eos_token"), unk_id=special_id("unk_token"), pad_id=special_id("pad_token"),
        add_bos=bool(add_bos), chat_template=settings.get("chat_template"),
    )


def _with_pre_tokenizer(pre: str) -> str:
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = bpe_pre_tokenizer(pre)
    return tokenizer.to_str()


def _post_processor_ids(post: Dict[str, Any]) -> List[int]:
    """Token ids a post-processor adds (TemplateProcessing's special tokens, also inside a Sequence)."""
    ids = [i for token in (post.get("special_tokens") or {}).values() for i in token.get("ids", [])]
    for step in post.get("processors") or []:
        ids += _post_processor_ids(step)
    return ids


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid UTF-8 JSON: {e}")
    return data if isinstance(data, dict) else {}


# --- chat templates from our prompt styles ---------------------------------------------------------------------


def style_parts(style: Any) -> Tuple[str, str]:
    """The text before and after the instruction in a prompt style's template."""
    before, _, after = style.template.partition("{instruction}")
    return before, after


def jinja_chat_template(style: Any) -> str:
    """A Hugging Face / llama.cpp chat template (Jinja) for one of our prompt styles: each user message in the
    style's template, each assistant message followed by what ends an answer in training (the style's stop
    string, then eos). A system message is put before the first user message's text."""
    before, after = style_parts(style)
    end = style.stop_strings[0] if style.stop_strings else ""
    return (
        "{%- set system = namespace(text='') -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{%- set system.text = message['content'] + '\\n\\n' -%}"
        f"{{%- elif message['role'] == 'user' -%}}{{{{ {json.dumps(before)} + system.text + message['content'] + "
        f"{json.dumps(after)} }}}}{{%- set system.text = '' -%}}"
        f"{{%- elif message['role'] == 'assistant' -%}}{{{{ message['content'] + {json.dumps(end)} + eos_token }}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def ollama_modelfile(gguf_name: str, style: Optional[Any], stop_tokens: Sequence[str]) -> str:
    """An Ollama Modelfile for the exported file: its prompt template in Ollama's (Go) template language, and
    the strings that end an answer."""
    lines = ["# Ollama: ollama create NAME -f Modelfile, then ollama run NAME", f"FROM ./{gguf_name}"]
    if style is not None:
        before, after = style_parts(style)
        template = before + "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}" + after
        lines.append(f'TEMPLATE """{template}"""')
        stops = list(style.stop_strings)
    else:  # Ollama takes the template from the file's chat template
        stops = []
    for stop in dict.fromkeys(stops + list(stop_tokens)):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"
