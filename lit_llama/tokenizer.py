"""SentencePiece tokenizer of LLaMA (32,000 pieces, bos 1, eos 2), plus a `train()` for tiny test tokenizers."""

import hashlib
from pathlib import Path
from typing import Iterable, Optional

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


class Tokenizer:
    def __init__(self, model_path: Path) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise UserError(f"tokenizer {model_path} not found")
        data = model_path.read_bytes()
        try:
            if not data:
                raise RuntimeError("empty")
            self.processor = SentencePieceProcessor(model_proto=data)
        except RuntimeError:  # SentencePiece's message is a C++ parse failure: say what the file is not
            raise UserError(f"{model_path} is not a SentencePiece tokenizer model") from None
        # what prepared data records, so that it is never used with another tokenizer (see lit_llama.data)
        self.path = model_path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        self.pad_id = self.processor.pad_id()

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    def encode(
        self,
        string: str,
        bos: bool = True,
        eos: bool = False,
        max_length: int = -1,
        device: Optional[torch.device] = None,
    ) -> torch.Tensor:
        tokens = self.processor.encode(string)
        if bos:
            tokens = [self.bos_id] + tokens
        if eos:
            tokens = tokens + [self.eos_id]
        if max_length > 0:
            tokens = tokens[:max_length]
        return torch.tensor(tokens, dtype=torch.long, device=device)

    def decode(self, tokens: torch.Tensor) -> str:
        return self.processor.decode(tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens))

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
