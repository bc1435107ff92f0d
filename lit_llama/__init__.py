from lit_llama.model import Config, LLaMA
from lit_llama.tokenizer import Tokenizer

__all__ = ["Config", "LLaMA", "Tokenizer"]
