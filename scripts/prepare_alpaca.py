"""Prepare the Stanford Alpaca instruction dataset (52k records) for finetuning.

    python scripts/prepare_alpaca.py --checkpoint_dir checkpoints/lit-llama/7B

writes data/alpaca/train.pt, test.pt and prepare_config.json. Without --data_file it downloads
alpaca_data.json (network needed once); offline, pass a local copy: --data_file path/to/alpaca_data.json.
Any instruction dataset in Alpaca's shape reads the same way, JSON or JSON Lines: the answer field `output` or
`response` and the input `input` or `context` are detected; other names are given with --response_key,
--instruction_key and --input_key. Chat datasets (`messages`, `conversations`): scripts/prepare_chat.py.
"""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.cli import deprecated_flag, run_cli
from lit_llama.data import (
    check_prepare_flags,
    download_if_missing,
    load_records,
    load_tokenizer,
    prepare_dataset,
    resolve_test_split_size,
)
from lit_llama.prompts import get_prompt_style

DATA_URL = "https://raw.githubusercontent.com/tloen/alpaca-lora/main/alpaca_data.json"
DATA_FILE_NAME = "alpaca_data.json"  # the download's name in --out_dir
DESTINATION_PATH = Path("data/alpaca")
TEST_SPLIT_SIZE = 2000


def prepare(
    data_file: Optional[Path] = None,
    out_dir: Path = DESTINATION_PATH,
    checkpoint_dir: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
    test_split_size: Optional[int] = None,
    max_example_tokens: int = 256,
    mask_inputs: bool = True,
    seed: int = 42,
    destination_path: Optional[Path] = None,
    prompt_style: str = "alpaca",
    max_seq_length: Optional[int] = None,
    instruction_key: Optional[str] = None,
    input_key: Optional[str] = None,
    response_key: Optional[str] = None,
) -> None:
    """Tokenizes Alpaca into a train and a test split.

    Args:
        data_file: A local Alpaca-format JSON file (a list of {"instruction", "input", "output"}; "input" may
            be absent). Default: download alpaca_data.json into --out_dir.
        out_dir: Where to write train.pt, test.pt and prepare_config.json (and alpaca_data.json when
            downloading).
        checkpoint_dir: A converted checkpoint folder; only its tokenizer.model is used.
        tokenizer_path: Lit-LLaMA's original flag: the tokenizer.model itself (instead of --checkpoint_dir).
        test_split_size: Records held out for validation. Default: 2000, or 10% (at least 1) of a file with fewer
            than 4000 records.
        max_example_tokens: Longer examples are cut to this many tokens. With the LLaMA tokenizer 256 keeps over 90%
            of Alpaca examples whole; the summary prints the lengths and how many were cut.
        mask_inputs: Compute the loss on the response only, not on the instruction and input.
        seed: Random seed of the train/test split (the same seed and file give the same split).
        destination_path: Deprecated name of --out_dir.
        prompt_style: How instructions are put to the model: alpaca, llama2-chat, chatml or llama3 (for chat
            checkpoints such as Llama-2-chat or TinyLlama-Chat). Recorded with the data; finetune/lora.py
            records it in the LoRA file and generate/lora.py prompts in it.
        max_seq_length: Deprecated name of --max_example_tokens (finetuning's --max_seq_length cuts again, at
            training time).
        instruction_key: The records' field holding the instruction (default: "instruction").
        input_key: The records' field holding the optional input (default: "input", else "context").
        response_key: The records' field holding the answer (default: "output", else "response", detected from
            the first record).
    """
    out_dir = deprecated_flag("out_dir", out_dir, "destination_path", destination_path)
    max_example_tokens = deprecated_flag("max_example_tokens", max_example_tokens, "max_seq_length", max_seq_length)
    get_prompt_style(prompt_style)  # a wrong name fails before any download
    check_prepare_flags(out_dir, data_file, test_split_size, max_example_tokens, seed)
    tokenizer, tokenizer_path = load_tokenizer(checkpoint_dir, tokenizer_path)
    data_file = data_file or download_if_missing(DATA_URL, out_dir / DATA_FILE_NAME)
    keys = {"instruction": instruction_key, "input": input_key, "output": response_key}
    records = load_records(data_file, {field: key for field, key in keys.items() if key})
    test_split_size = resolve_test_split_size(test_split_size, len(records), TEST_SPLIT_SIZE)
    sources = {"data_file": data_file, "tokenizer_path": tokenizer_path}  # recorded in prepare_config.json
    prepare_dataset(records, tokenizer, out_dir, test_split_size, seed, max_example_tokens, mask_inputs, sources,
                    prompt_style)


if __name__ == "__main__":
    run_cli(prepare)
