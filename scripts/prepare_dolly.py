"""Prepare Databricks' Dolly 15k instruction dataset for finetuning.

    python scripts/prepare_dolly.py --checkpoint_dir checkpoints/lit-llama/7B

writes data/dolly/train.pt, test.pt and prepare_config.json. Dolly's "context" becomes the prompt's input
and its "response" the output ("category" is not used). Without --data_file it downloads
databricks-dolly-15k.jsonl (network needed once); offline, pass a local copy with --data_file.
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

DATA_URL = "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"
DATA_FILE_NAME = "databricks-dolly-15k.jsonl"  # the download's name in --out_dir
FIELD_MAP = {"instruction": "instruction", "input": "context", "output": "response"}  # ours -> Dolly's
DESTINATION_PATH = Path("data/dolly")
TEST_SPLIT_SIZE = 1000


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
) -> None:
    """Tokenizes Dolly into a train and a test split.

    Args:
        data_file: A local Dolly-format JSON Lines file (one {"instruction", "context", "response"} object
            per line; "context" may be empty). Default: download databricks-dolly-15k.jsonl into
            --out_dir.
        out_dir: Where to write train.pt, test.pt and prepare_config.json (and
            databricks-dolly-15k.jsonl when downloading).
        checkpoint_dir: A converted checkpoint folder; only its tokenizer.model is used.
        tokenizer_path: Lit-LLaMA's original flag: the tokenizer.model itself (instead of --checkpoint_dir).
        test_split_size: Records held out for validation. Default: 1000, or 10% (at least 1) of a file with fewer
            than 2000 records.
        max_example_tokens: Examples are cut to this many tokens. Dolly's contexts (Wikipedia passages for
            closed QA and summarization) can be long: raise it if the summary reports many cut examples.
        mask_inputs: Train on the response tokens only; the prompt, with its context, gets no loss.
        seed: Random seed of the train/test split (the same seed and file give the same split).
        destination_path: Deprecated name of --out_dir.
        prompt_style: How instructions are put to the model: alpaca, llama2-chat, chatml or llama3 (for chat
            checkpoints such as Llama-2-chat or TinyLlama-Chat). Recorded with the data; finetune/lora.py
            records it in the LoRA file and generate/lora.py prompts in it.
        max_seq_length: Deprecated name of --max_example_tokens (finetuning's --max_seq_length cuts again, at
            training time).
    """
    out_dir = deprecated_flag("out_dir", out_dir, "destination_path", destination_path)
    max_example_tokens = deprecated_flag("max_example_tokens", max_example_tokens, "max_seq_length", max_seq_length)
    get_prompt_style(prompt_style)  # a wrong name fails before any download
    check_prepare_flags(out_dir, data_file, test_split_size, max_example_tokens, seed)
    tokenizer, tokenizer_path = load_tokenizer(checkpoint_dir, tokenizer_path)
    data_file = data_file or download_if_missing(DATA_URL, out_dir / DATA_FILE_NAME)
    records = load_records(data_file, FIELD_MAP)
    test_split_size = resolve_test_split_size(test_split_size, len(records), TEST_SPLIT_SIZE)
    sources = {"data_file": data_file, "tokenizer_path": tokenizer_path}  # recorded in prepare_config.json
    prepare_dataset(records, tokenizer, out_dir, test_split_size, seed, max_example_tokens, mask_inputs, sources,
                    prompt_style)


if __name__ == "__main__":
    run_cli(prepare)
