"""Convert a llama.cpp GGUF file of a LLaMA-family model (weights and tokenizer) to a lit-llama checkpoint folder.

    python scripts/convert_gguf_checkpoint.py --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf \
        --out_dir checkpoints/lit-llama/SmolLM2-135M-Instruct

Quantized weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K to Q6_K) are dequantized with the `gguf`
package: the checkpoint holds what llama.cpp computes with, in --dtype, not the weights before quantization.
The GGUF is first written as a Hugging Face model folder (config.json, safetensors, tokenizer files) in a
temporary folder beside --out_dir, which scripts/convert_hf_checkpoint.py then converts: both converters check
and write checkpoints the same way. That folder takes the model's size in --dtype on disk while it runs.
"""

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.checkpoint import WEIGHTS_NAME
from lit_llama.cli import UserError, check_out_dir, run_cli
from lit_llama.convert import parse_dtype
from lit_llama.disk import disk_errors, save_atomic
from lit_llama.gguf import gguf_to_hf, open_gguf
from scripts.convert_hf_checkpoint import convert as convert_hf

# tokenizer files the HF folder may hold besides the tokenizer itself: bos/eos, chat template
TOKENIZER_SETTINGS = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def convert(
    gguf_file: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
) -> None:
    """Converts a GGUF file (llama, mistral or qwen2 architecture) to lit-llama.pth + lit_config.json + tokenizer.

    Args:
        gguf_file: The GGUF file, as llama.cpp, Ollama and LM Studio use them.
        out_dir: Where to write the checkpoint folder (default: checkpoints/lit-llama/<file name without .gguf>).
        dtype: The precision to store the (dequantized) weights in: bfloat16, float16 or float32.
        overwrite: Replace an existing converted checkpoint in out_dir.
    """
    if gguf_file is None:
        raise UserError("give --gguf_file (a llama.cpp .gguf file)")
    parse_dtype(dtype)
    gguf_file = Path(gguf_file)
    open_gguf(gguf_file)  # a missing or cut file is refused before anything is written
    out_dir = Path(out_dir) if out_dir is not None else Path("checkpoints/lit-llama") / gguf_file.stem
    check_out_dir(out_dir, replaces=WEIGHTS_NAME, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    hf_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-gguf-", dir=out_dir.parent))
    try:
        with disk_errors(hf_dir):
            gguf_to_hf(gguf_file, hf_dir, parse_dtype(dtype))
        try:
            convert_hf(checkpoint_dir=hf_dir, out_dir=out_dir, dtype=dtype, overwrite=overwrite)
        except UserError as e:  # about the temporary folder: name the file the user gave
            message = str(e).replace(str(hf_dir / "config.json"), str(gguf_file)).replace(str(hf_dir), str(gguf_file))
            raise UserError(message) from None
        for name in TOKENIZER_SETTINGS:  # what the HF converter did not copy itself
            if (hf_dir / name).is_file() and not (out_dir / name).is_file():
                save_atomic(hf_dir / name, out_dir / name, shutil.copyfile)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    print(f"Converted {gguf_file} to {out_dir}")


if __name__ == "__main__":
    run_cli(convert)
