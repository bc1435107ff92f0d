"""Tokenizers: LLaMA's SentencePiece model and Hugging Face `tokenizer.json` files behind one `Tokenizer`, plus
trainers of tiny test tokenizers of both kinds."""

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from sentencepiece import SentencePieceProcessor, SentencePieceTrainer

from lit_llama.cli import UserError


def check_text(text: str, what: str) -> None:
    """`text` can be tokenized: SentencePiece takes UTF-8, and a lone surrogate (a JSON "\\ud800", or an
    invalid byte of a command-line argument, which Python keeps as "\\udcff") has no UTF-8 form: its C++
    binding would fail with a traceback. `what` names the text in the error: a flag, or a record's field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(
            f"{what} is not valid Unicode text: character {e.start} is {text[e.start]!r}, a lone surrogate "
            "(an invalid UTF-8 byte, or a JSON \\ud800-\\udfff escape without its pair)"
        ) from None


# the files a checkpoint folder may hold for its tokenizer, in the order they are looked for: LLaMA's
# SentencePiece model, or a Hugging Face `tokenizers` file (Llama 3, SmolLM2, Qwen2.5, Mistral v0.3), with the
# settings that say which special tokens begin and end a text
SENTENCEPIECE_NAME = "tokenizer.model"
HF_TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_NAMES = (SENTENCEPIECE_NAME, HF_TOKENIZER_NAME)
# embedding rows a model may have beyond its tokenizer's tokens (padding to a round size: Qwen2.5 has 271)
MAX_VOCAB_PADDING = 512
TOKENIZER_SETTINGS = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
TOKENIZER_FILES = TOKENIZER_NAMES + TOKENIZER_SETTINGS  # every file the converters copy, where it exists


def find_tokenizer(folder: Path) -> Path:
    """The tokenizer file in `folder`: `tokenizer.model` where there is one (LLaMA, Llama 2, Mistral; data
    prepared with it keeps working), else `tokenizer.json`. The first name if neither exists."""
    folder = Path(folder)
    return next((folder / name for name in TOKENIZER_NAMES if (folder / name).is_file()), folder / TOKENIZER_NAMES[0])


class Tokenizer:
    """One interface over SentencePiece (`tokenizer.model`) and Hugging Face `tokenizer.json` files.

    The special tokens come from the checkpoint's own files, never from constants: `bos_id` and `eos_id` from
    `tokenizer_config.json` (or SentencePiece's model), whether bos begins a text from its `add_bos_token` or
    else from what the tokenizer's post-processor adds, and `stop_ids` (every token that ends an answer) from
    eos and `generation_config.json`'s `eos_token_id` (Llama 3 Instruct lists both `<|eot_id|>` and
    `<|end_of_text|>`). A special token written in a text (`<|im_start|>`, `<|start_header_id|>`) encodes as
    that one token.
    """

    def __init__(self, model_path: Path) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise UserError(f"tokenizer {model_path} not found")
        data = model_path.read_bytes()
        folder = model_path.parent
        settings = {name: _read_json(folder / name) for name in TOKENIZER_SETTINGS}
        tokenizer_config, generation_config = settings["tokenizer_config.json"], settings["generation_config.json"]
        self.path = model_path
        self.kind = "huggingface" if model_path.suffix == ".json" else "sentencepiece"
        if self.kind == "sentencepiece":
            try:
                if not data:
                    raise RuntimeError("empty")
                self.processor = SentencePieceProcessor(model_proto=data)
            except RuntimeError:  # SentencePiece's message is a C++ parse failure: say what the file is not
                raise UserError(f"{model_path} is not a SentencePiece tokenizer model") from None
            sp = self.processor
            self.bos_id: Optional[int] = sp.bos_id() if sp.bos_id() >= 0 else None
            self.eos_id: Optional[int] = sp.eos_id() if sp.eos_id() >= 0 else None
            self.pad_id = sp.pad_id()
            # control pieces ("<s>", Mistral v0.3's "[INST]") written in a text are those tokens (SentencePiece
            # matches user-defined pieces in text itself)
            self.special_tokens = {sp.id_to_piece(i): i for i in range(sp.vocab_size()) if sp.is_control(i)}
            adds_bos = self.bos_id is not None
        else:
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self.processor = HFTokenizer.from_str(data.decode("utf-8"))
            except Exception:  # noqa: BLE001 - a Rust parse error (or bad UTF-8): say what the file is not
                raise UserError(f"{model_path} is not a Hugging Face tokenizer.json file") from None
            hf = self.processor
            ids = hf.token_to_id
            self.special_tokens = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
            # bos: the config's token, else the one the post-processor puts first (some files name only that)
            bos_token = _token_text(tokenizer_config.get("bos_token"))
            first = hf.encode("a", add_special_tokens=True).ids[:1]
            plain = hf.encode("a", add_special_tokens=False).ids[:1]
            added_first = first[0] if first and first != plain else None
            self.bos_id = ids(bos_token) if bos_token is not None else added_first
            self.eos_id = _first_id(tokenizer_config.get("eos_token"), ids)
            self.pad_id = _first_id(tokenizer_config.get("pad_token"), ids)
            if self.pad_id is None:
                self.pad_id = -1
            adds_bos = self.bos_id is not None and added_first == self.bos_id
        if isinstance(tokenizer_config.get("add_bos_token"), bool):  # the checkpoint says so itself
            adds_bos = tokenizer_config["add_bos_token"] and self.bos_id is not None
        self.add_bos = adds_bos
        if self.eos_id is None and generation_config.get("eos_token_id") is not None:
            self.eos_id = _ids_of(generation_config["eos_token_id"], model_path)[0]
        stop_ids = [self.eos_id] + _ids_of(generation_config.get("eos_token_id"), folder / "generation_config.json")
        self.stop_ids: Tuple[int, ...] = tuple(dict.fromkeys(i for i in stop_ids if i is not None))
        # what prepared data records, so that it is never used with another tokenizer (see lit_llama.data): the
        # settings are part of it (add_bos_token changes every encoded sample)
        digest = hashlib.sha256(data)
        for name in ("tokenizer_config.json", "generation_config.json"):
            if (folder / name).is_file() and self.kind == "huggingface":
                digest.update((folder / name).read_bytes())
        self.sha256 = digest.hexdigest()

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self.processor.vocab_size()
        return self.processor.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> Optional[int]:
        """The id of a special token (`<|eot_id|>`), or None if `text` is not one of this tokenizer's tokens."""
        return self.special_tokens.get(text)

    def encode(
        self,
        string: str,
        bos: bool = True,
        eos: bool = False,
        max_length: int = -1,
        device: Optional[torch.device] = None,
    ) -> torch.Tensor:
        """Token ids of `string`; `bos`: begin with the bos token if this model's texts begin with one (Qwen's
        do not), `eos`: end with eos. Special tokens written in the text are those tokens."""
        if self.kind == "sentencepiece":
            tokens = self._encode_sentencepiece(string)
        else:
            tokens = self.processor.encode(string, add_special_tokens=False).ids
        if bos and self.add_bos:
            tokens = [self.bos_id] + tokens
        if eos and self.eos_id is not None:
            tokens = tokens + [self.eos_id]
        if max_length > 0:
            tokens = tokens[:max_length]
        return torch.tensor(tokens, dtype=torch.long, device=device)

    def _encode_sentencepiece(self, string: str) -> List[int]:
        """SentencePiece never maps text to a control piece: split the text at the special tokens first."""
        specials = [t for t in self.special_tokens if t and t in string]
        if not specials:
            return self.processor.encode(string)
        pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
        tokens: List[int] = []
        for i, part in enumerate(re.split(pattern, string)):
            if i % 2:
                tokens.append(self.special_tokens[part])
            elif part:
                tokens.extend(self.processor.encode(part))
        return tokens

    def decode(self, tokens: torch.Tensor) -> str:
        """The text of `tokens`. Special tokens are left out, as SentencePiece leaves out its control pieces: an
        answer that ends with <|eot_id|> or <|end_of_text|> reads as the answer alone."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if self.kind == "sentencepiece":
            return self.processor.decode(ids)
        return self.processor.decode(ids, skip_special_tokens=True)

    @staticmethod
    def train(input: Path, destination: Path, vocab_size: int = 512, **kwargs) -> Path:
        """Trains a small LLaMA-style tokenizer (BPE, bos 1, eos 2, unk 0) on a text file.
        Writes `destination/tokenizer.model` and returns its path."""
        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=True)
        prefix = destination / "tokenizer"
        SentencePieceTrainer.Train(
            input=str(input),
            model_prefix=str(prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,  # like LLaMA: any text encodes, no unknown pieces
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            minloglevel=2,
            **kwargs,
        )
        prefix.with_suffix(".vocab").unlink(missing_ok=True)
        return prefix.with_suffix(".model")


def check_tokenizer_vocab(tokenizer: Tokenizer, config: Any, source: Any) -> None:
    """The tokenizer belongs to the weights: none of its ids is past the embedding, and the embedding has no more
    rows than a round-up of the tokenizer's size (Qwen2.5 pads 271): else a UserError naming both."""
    if not 0 <= config.vocab_size - tokenizer.vocab_size <= MAX_VOCAB_PADDING:
        raise UserError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but {source} says the model "
                        f"has {config.vocab_size}: they do not belong together")


def _read_json(path: Path) -> Dict[str, Any]:
    """A tokenizer settings file as a dict ({} where there is none); one that is not a JSON object is refused."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid UTF-8 JSON: {e}")
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object of settings")
    return value


def _token_text(value: Any) -> Optional[str]:
    """A token as tokenizer_config.json writes it: a string, or an AddedToken object {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value: Any, ids: Any) -> Optional[int]:
    text = _token_text(value)
    return ids(text) if text is not None else None


def _ids_of(value: Any, source: Path) -> List[int]:
    """generation_config.json's eos_token_id: one id or a list of ids."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(type(v) is int and v >= 0 for v in values):
        raise UserError(f"{source}: eos_token_id is {value!r}, expected a token id or a list of token ids")
    return values


def train_bpe_tokenizer_json(
    texts: Iterable[str], destination: Path, vocab_size: int = 300, special_tokens: Sequence[str] = (),
    bos_token: Optional[str] = None, eos_token: str = "<|endoftext|>", add_bos: bool = False,
) -> Path:
    """Trains a small byte-level BPE `tokenizer.json` (the kind Llama 3, SmolLM2 and Qwen2.5 use) on `texts`,
    with `tokenizer_config.json` beside it naming bos and eos; the post-processor adds bos when `add_bos`.
    For tests: the real files are far larger but read by the same code."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    specials = list(dict.fromkeys([t for t in (bos_token, eos_token) if t] + list(special_tokens)))
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer)
    if add_bos and bos_token:
        bos_id = tokenizer.token_to_id(bos_token)
        tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
                                          special_tokens=[(bos_token, bos_id)]),
        ])
    path = destination / HF_TOKENIZER_NAME
    tokenizer.save(str(path))
    (destination / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos_token, "eos_token": eos_token, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return path


def train_from_texts(texts: Iterable[str], destination: Path, vocab_size: int = 512) -> Path:
    """Writes `texts` to a file beside the tokenizer and trains on it (tests and the demo use this)."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    corpus = destination / "tokenizer_corpus.txt"
    corpus.write_text("\n".join(texts))
    try:
        return Tokenizer.train(corpus, destination, vocab_size=vocab_size)
    finally:
        corpus.unlink(missing_ok=True)
