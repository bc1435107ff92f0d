"""Datasets as people have them (lit_llama/chat_data.py, scripts/prepare_chat.py, load_records' field detection):
OpenAI and ShareGPT chats with the loss on the assistant's turns only, in each prompt style; Alpaca-shaped
files whatever the answer field is called; one error line for a record that fits none of them."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, load_script, run_script, tiny_corpus

from lit_llama.chat_data import load_chats, prepare_chat_sample, single_turn_chats, style_of_checkpoint
from lit_llama.cli import UserError
from lit_llama.data import IGNORE_INDEX, load_records, prepare_sample
from lit_llama.model import Config, LLaMA
from lit_llama.prompts import chat_turns, get_prompt_style
from lit_llama.tokenizer import Tokenizer, train_bpe_tokenizer_json

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "what is the sky"},
    {"role": "assistant", "content": "the sky is blue"},
    {"role": "user", "content": "and water"},
    {"role": "assistant", "content": "water is blue too"},
]
ANSWERS = [m["content"] for m in CHAT if m["role"] == "assistant"]
SPECIALS = {"chatml": ["<|im_start|>", "<|im_end|>"],
            "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}


def bpe_tokenizer(folder: Path, style: str) -> Tokenizer:
    """A tiny byte-level BPE tokenizer with the style's special tokens, eos its end of turn (as SmolLM2's
    <|im_end|> and Llama 3 Instruct's <|eot_id|>)."""
    eos = get_prompt_style(style).stop_strings[0]
    bos = "<|begin_of_text|>" if style == "llama3" else None
    return Tokenizer(train_bpe_tokenizer_json(tiny_corpus(200), folder, vocab_size=320, special_tokens=SPECIALS[style],
                                              bos_token=bos, eos_token=eos, add_bos=bos is not None))


def learned_runs(sample):
    """The labelled stretches of a sample, as (start, token ids)."""
    labels, runs, start = sample["labels"], [], None
    for i, label in enumerate(labels.tolist() + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, labels[start:i]))
            start = None
    return runs


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_one_sequence_styles_learn_exactly_the_answers(style, tmp_path):
    """ChatML and Llama 3 on a tokenizer with their special tokens: the labels are exactly each answer and its end
    of turn (eos is that token, so nothing else), and the tokens before each answer are exactly what serve.py
    prompts with for the conversation up to there (chat_turns, encoded whole)."""
    tokenizer, prompt_style = bpe_tokenizer(tmp_path, style), get_prompt_style(style)
    assert style_of_checkpoint(tokenizer) == style
    sample = prepare_chat_sample({"messages": CHAT}, tokenizer, 1000, prompt_style=style)
    runs = learned_runs(sample)
    assert len(runs) == 2
    for (start, ids), answer, end in zip(runs, ANSWERS, (3, 5)):
        assert ids.tolist() == tokenizer.encode(prompt_style.answer(answer), bos=False).tolist()
        served = tokenizer.encode(chat_turns(prompt_style, CHAT[: end - 1])[0])  # serve.py's prompt, encoded whole
        assert sample["input_ids"][:start].tolist() == served.tolist()
    assert runs[-1][0] + len(runs[-1][1]) == len(sample["input_ids"])  # nothing after the last end of turn
    assert sample["input_ids_no_response"].tolist() == sample["input_ids"][: runs[-1][0]].tolist()
    assert sample["instruction"] == "and water" and sample["output"] == "water is blue too"
    unmasked = prepare_chat_sample({"messages": CHAT}, tokenizer, 1000, mask_inputs=False, prompt_style=style)
    assert torch.equal(unmasked["labels"], unmasked["input_ids"])
    cut = prepare_chat_sample({"messages": CHAT}, tokenizer, 10, prompt_style=style)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 10 and cut["truncated"]


def test_llama2_chat_and_alpaca_layouts(tiny_checkpoint_dir):
    """Llama-2-chat: every exchange bos + [INST] user [/INST], the answer and eos learned. Alpaca, single-turn:
    every answer an example of its own, token for token the sample prepare_alpaca.py makes of the same exchange
    (the system message as the input)."""
    tokenizer = Tokenizer(tiny_checkpoint_dir / "tokenizer.model")
    sample = prepare_chat_sample({"messages": CHAT}, tokenizer, 1000, prompt_style="llama2-chat")
    runs = learned_runs(sample)
    assert [ids.tolist() for _, ids in runs] == [tokenizer.encode(a, bos=False, eos=True).tolist() for a in ANSWERS]
    ids = sample["input_ids"]
    assert ids[0] == ids[runs[0][0] + len(runs[0][1])] == tokenizer.bos_id  # each exchange begins with bos
    first = tokenizer.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nwhat is the sky [/INST]", bos=True)
    assert ids[: runs[0][0]].tolist() == first.tolist()
    second = tokenizer.encode("[INST] and water [/INST]")
    assert ids[runs[0][0] + len(runs[0][1]) : runs[1][0]].tolist() == second.tolist()

    chats = single_turn_chats([CHAT])
    assert [chat[-1]["content"] for chat in chats] == ANSWERS
    for chat, (user, answer) in zip(chats, [("what is the sky", ANSWERS[0]), ("and water", ANSWERS[1])]):
        ours = prepare_chat_sample({"messages": chat}, tokenizer, 1000, prompt_style="alpaca")
        theirs = prepare_sample({"instruction": user, "input": "Be brief.", "output": answer}, tokenizer, 1000)
        assert torch.equal(ours["input_ids"], theirs["input_ids"]) and torch.equal(ours["labels"], theirs["labels"])


def test_openai_and_sharegpt_files_read_alike(tmp_path):
    openai = tmp_path / "openai.jsonl"
    openai.write_text(json.dumps({"messages": CHAT[:2] + [{"role": "assistant", "content": [
        {"type": "text", "text": "the sky "}, {"type": "text", "text": "is blue"}]}] + CHAT[3:] + [
        {"role": "user", "content": "thanks"}]}) + "\n")  # content parts; a last user message is left out
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": speakers[m["role"]], "value": m["content"]}
                                                       for m in CHAT]}]))
    assert load_chats(openai) == load_chats(sharegpt) == [CHAT]


BAD_CHATS = {
    "an instruction record": ({"instruction": "a", "output": "b"}, "record 1 (line 2) is an object with no "
                              "'messages' (OpenAI) or 'conversations' (ShareGPT) list: not a chat (an instruction"),
    "a list": ([1, 2], "record 1 (line 2) is an array with no 'messages'"),
    "a tool's message": ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]: role \"tool\" is not one of"),
    "two users": ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
                  "record 1 (line 2): message 1 is the user's where the assistant's was expected"),
    "no answer": ({"messages": [{"role": "user", "content": "a"}]}, "record 1 (line 2) has no assistant message"),
    "a number": ({"messages": [{"role": "user", "content": 3}]}, "messages[0]: 'content' is a number, expected"),
    "an empty answer": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
                        "message 1 (the assistant's) is empty"),
}


def test_a_record_that_fits_no_format_is_named(tiny_checkpoint_dir, tmp_path):
    good = json.dumps({"messages": CHAT})
    for name, (record, fragment) in BAD_CHATS.items():
        path = tmp_path / "chats.jsonl"
        path.write_text(good + "\n" + json.dumps(record) + "\n")
        with pytest.raises(UserError, match=None) as error:
            load_chats(path)
        assert f"{path}: " in str(error.value) and fragment in str(error.value), (name, str(error.value))
    # through the scripts: one error line, and each script points to the other for the other kind of record
    out = tmp_path / "out"
    proc = run_script("scripts/prepare_chat.py", "--data_file", path, "--checkpoint_dir", tiny_checkpoint_dir,
                      "--out_dir", out, check=False)
    assert_clean_error(proc, str(path), "record 1 (line 2): message 1 (the assistant's) is empty")
    path.write_text(good + "\n")
    proc = run_script("scripts/prepare_alpaca.py", "--data_file", path, "--checkpoint_dir", tiny_checkpoint_dir,
                      "--out_dir", out, check=False)
    assert_clean_error(proc, f"{path}: record 0 (line 1) is a chat ('messages')", "scripts/prepare_chat.py")
    assert not out.exists()


def test_instruction_files_whatever_the_answer_field_is_called(tiny_checkpoint_dir, tmp_path, capsys):
    path = tmp_path / "codegen.json"  # GPTeacher's fields
    path.write_text(json.dumps([{"instruction": f"write {i}", "input": "", "response": f"print({i})"}
                                for i in range(12)]))
    assert load_records(path)[3] == {"instruction": "write 3", "input": "", "output": "print(3)"}
    assert "the output is the field 'response' (detected)" in capsys.readouterr().err
    path.write_text(json.dumps([{"question": "q", "context": "c", "answer": "a"}]))
    with pytest.raises(UserError, match=r"record 0 has no answer field 'output' or 'response' \(its fields: "
                                        r"'question', 'context', 'answer'\): name it with --response_key"):
        load_records(path)
    out = tmp_path / "data"
    path.write_text(json.dumps([{"question": "q", "context": "c", "answer": "a"}] * 2))
    run_script("scripts/prepare_alpaca.py", "--data_file", path, "--checkpoint_dir", tiny_checkpoint_dir, "--out_dir",
               out, "--instruction_key", "question", "--response_key", "answer", "--test_split_size", 1)
    sample = torch.load(out / "train.pt")[0]
    assert (sample["instruction"], sample["input"], sample["output"]) == ("q", "c", "a")


def test_lora_trains_on_prepared_chat_data(tmp_path):
    """prepare_chat.py finds the checkpoint's style (ChatML tokens) and writes what finetune/lora.py trains on."""
    checkpoint_dir = tmp_path / "checkpoint"
    tokenizer = bpe_tokenizer(checkpoint_dir, "chatml")
    config = Config.from_name("tiny")
    assert tokenizer.vocab_size <= config.vocab_size
    torch.manual_seed(0)
    torch.save(LLaMA(config).state_dict(), checkpoint_dir / "lit-llama.pth")
    config.to_json(checkpoint_dir / "lit_config.json")
    chats = [[{"role": "user", "content": f"what is {i} and {i % 3}"}, {"role": "assistant", "content": f"{i}"},
              {"role": "user", "content": "and the sum"}, {"role": "assistant", "content": f"{i + i % 3}"}]
             for i in range(20)]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps({"messages": chat}) for chat in chats))
    proc = run_script("scripts/prepare_chat.py", "--data_file", tmp_path / "chats.jsonl", "--checkpoint_dir",
                      checkpoint_dir, "--out_dir", tmp_path / "data", "--test_split_size", 4)
    assert "prompt style: chatml (the checkpoint's" in proc.stderr
    assert json.loads((tmp_path / "data" / "prepare_config.json").read_text())["prompt_style"] == "chatml"
    load_script("finetune/lora.py").setup(
        checkpoint_dir=checkpoint_dir, data_dir=tmp_path / "data", out_dir=tmp_path / "out", precision="32-true",
        batch_size=4, micro_batch_size=4, max_iters=3, eval_interval=3, eval_iters=1, save_interval=0, warmup_iters=1)
    lora = torch.load(tmp_path / "out" / "lit-llama-lora-finetuned.pth")
    assert lora["prompt_style"] == "chatml"
    with open(tmp_path / "out" / "metrics.csv") as f:
        val_losses = [float(row["val_loss"]) for row in csv.DictReader(f) if row.get("val_loss")]
    assert val_losses and all(math.isfinite(loss) for loss in val_losses)  # the loss has answer tokens to count
