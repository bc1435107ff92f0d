"""Prepare a chat dataset for finetuning: OpenAI `messages` or ShareGPT `conversations`, multi-turn, learning the
assistant's answers only, in the prompt style of the model.

    python scripts/prepare_chat.py --checkpoint_dir checkpoints/lit-llama/SmolLM2-135M-Instruct \
        --data_file chats.jsonl --out_dir data/chats

writes data/chats/train.pt, test.pt and prepare_config.json, which finetune/*.py read as any prepared data. A
file holds one record per line (JSON Lines) or a JSON list of them, either

    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, ...]}
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}, ...]}

The prompt style is the checkpoint's (chatml where its tokenizer has ChatML's tokens, as SmolLM2 and Qwen2.5;
llama3; llama2-chat where its chat template says [INST]), else alpaca, where every answer becomes a single-turn
example (lit_llama/chat_data.py says how each style lays out a conversation). Instruction datasets
(instruction/input/output): scripts/prepare_alpaca.py.
"""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.chat_data import load_chats, prepare_chat_sample, single_turn_chats, style_of_checkpoint
from lit_llama.cli import UserError, run_cli
from lit_llama.data import check_prepare_flags, load_tokenizer, prepare_dataset, resolve_test_split_size
from lit_llama.prompts import DEFAULT_PROMPT_STYLE, get_prompt_style

DESTINATION_PATH = Path("data/chat")
TEST_SPLIT_SIZE = 1000


def prepare(
    data_file: Optional[Path] = None,
    out_dir: Path = DESTINATION_PATH,
    checkpoint_dir: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
    prompt_style: Optional[str] = None,
    test_split_size: Optional[int] = None,
    max_example_tokens: int = 512,
    mask_inputs: bool = True,
    seed: int = 42,
) -> None:
    """Tokenizes a chat dataset into a train and a test split.

    Args:
        data_file: The chats: a JSON Lines file (or a JSON list) of OpenAI `messages` or ShareGPT `conversations`
            records.
        out_dir: Where to write train.pt, test.pt and prepare_config.json.
        checkpoint_dir: A converted checkpoint folder; its tokenizer is used, and says the prompt style.
        tokenizer_path: The tokenizer file itself (instead of --checkpoint_dir).
        prompt_style: alpaca, llama2-chat, chatml or llama3. Default: the checkpoint's (see above), else alpaca.
        test_split_size: Examples held out for validation. Default: 1000, or 10% (at least 1) of a file with fewer
            than 2000.
        max_example_tokens: Longer conversations are cut to this many tokens (the summary prints the lengths).
        mask_inputs: Learn the assistant's answers only; false: every token (system and user messages too).
        seed: Random seed of the train/test split.
    """
    if data_file is None:
        raise UserError("give --data_file (a JSON Lines file of 'messages' or 'conversations' records)")
    if prompt_style is not None:
        get_prompt_style(prompt_style)
    check_prepare_flags(out_dir, data_file, test_split_size, max_example_tokens, seed)
    tokenizer, tokenizer_path = load_tokenizer(checkpoint_dir, tokenizer_path)
    if prompt_style is None:
        prompt_style = style_of_checkpoint(tokenizer) or DEFAULT_PROMPT_STYLE
        print(f"prompt style: {prompt_style} (the checkpoint's; --prompt_style chooses another)", file=sys.stderr)
    chats = load_chats(data_file)
    if prompt_style == "alpaca":  # single-turn: every answer an example of its own
        chats = single_turn_chats(chats)
    records = [{"messages": chat} for chat in chats]
    test_split_size = resolve_test_split_size(test_split_size, len(records), TEST_SPLIT_SIZE)
    sources = {"data_file": data_file, "tokenizer_path": tokenizer_path, "format": "chat"}
    prepare_dataset(records, tokenizer, out_dir, test_split_size, seed, max_example_tokens, mask_inputs, sources,
                    prompt_style, make_sample=prepare_chat_sample)


if __name__ == "__main__":
    run_cli(prepare)
