"""Prompt styles (lit_llama/prompts.py): the templates, prepared samples in each style, generation stopping at
each style's end of answer, and the style travelling from the prepared data through the LoRA file to generate."""

import json
import math

import pytest
import torch
from conftest import assert_clean_error, load_script, run_script

from lit_llama.data import IGNORE_INDEX, prepare_sample
from lit_llama.generation import SYNC_EVERY, generate_response
from lit_llama.model import Config
from lit_llama.prompts import PROMPT_STYLES, chat_turns, get_prompt_style
from lit_llama.tokenizer import Tokenizer
from lit_llama.cli import UserError


def test_templates():
    assert PROMPT_STYLES["llama2-chat"].prompt("Name a color.") == "[INST] Name a color. [/INST]"
    assert PROMPT_STYLES["llama2-chat"].prompt("Add them.", "3 and 4") == "[INST] Add them.\n\n3 and 4 [/INST]"
    chatml = PROMPT_STYLES["chatml"]
    assert chatml.prompt("Name a color.") == "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"
    assert chatml.answer("Blue.") == "Blue.<|im_end|>"
    llama3 = PROMPT_STYLES["llama3"]  # Llama 3 Instruct's headers (Meta's model card format)
    assert llama3.prompt("Name a color.") == ("<|start_header_id|>user<|end_header_id|>\n\nName a color.<|eot_id|>"
                                              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3.answer("Blue.") == "Blue.<|eot_id|>"
    assert PROMPT_STYLES["alpaca"].answer("Blue.") == "Blue."  # EOS alone ends Alpaca and Llama-2 answers
    assert PROMPT_STYLES["alpaca"].prompt("Name a color.").endswith("### Instruction:\nName a color.\n\n### Response:")
    with pytest.raises(UserError, match="'vicuna' is not one of alpaca, llama2-chat, chatml"):
        get_prompt_style("vicuna")


@pytest.mark.parametrize("style", list(PROMPT_STYLES))
def test_prepared_sample_in_each_style(style, tiny_checkpoint_dir):
    tokenizer = Tokenizer(tiny_checkpoint_dir / "tokenizer.model")
    record = {"instruction": "explain weight decay", "input": "", "output": "the model weight is"}
    sample = prepare_sample(record, tokenizer, max_example_tokens=256, prompt_style=style)
    prompt = tokenizer.encode(PROMPT_STYLES[style].prompt(record["instruction"]), bos=True)
    answer = tokenizer.encode(PROMPT_STYLES[style].answer(record["output"]), bos=False, eos=True)
    assert torch.equal(sample["input_ids"], torch.cat([prompt, answer]))
    assert torch.equal(sample["input_ids_no_response"], prompt)
    assert (sample["labels"][: len(prompt)] == IGNORE_INDEX).all()
    assert torch.equal(sample["labels"][len(prompt):], answer) and answer[-1] == tokenizer.eos_id
    assert sample["prompt_style"] == style
    if style == "chatml":  # the stop text is learned right before EOS
        assert tokenizer.decode(answer[:-1]).endswith("<|im_end|>")


class ScriptedModel(torch.nn.Module):
    """Stands in for a model: whatever it is given, it predicts the next token of a fixed script."""

    def __init__(self, script: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.script, self.vocab_size, self.calls = script, vocab_size, 0
        self.config = Config.from_name("tiny")

    def set_kv_cache(self, **kwargs) -> None:
        pass

    def clear_kv_cache(self) -> None:
        pass

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = torch.zeros(1, idx.size(1), self.vocab_size)
        logits[0, -1, self.script[input_pos[-1] + 1]] = 1.0
        return logits


@pytest.mark.parametrize("style", list(PROMPT_STYLES))
def test_generation_stops_at_each_styles_end_of_answer(style, tiny_checkpoint_dir):
    """The model answers "the answer" then the style's end (ChatML: "<|im_end|>" as text, no EOS), then more text:
    generation stops right after the end and the response is "the answer"."""
    tokenizer = Tokenizer(tiny_checkpoint_dir / "tokenizer.model")
    prompt = tokenizer.encode(PROMPT_STYLES[style].prompt("explain"), bos=True)
    if style == "chatml":
        answer = tokenizer.encode("the answer<|im_end|>", bos=False)
    else:
        answer = tokenizer.encode("the answer", bos=False, eos=True)
    more = tokenizer.encode(" and more text after it", bos=False)
    model = ScriptedModel(torch.cat([prompt, answer, more, more]), tokenizer.vocab_size)
    response = generate_response(model, tokenizer, "explain", max_new_tokens=50, prompt_style=style)
    assert response == "the answer"
    # the prompt in one call, then one call per token until the host looks, every SYNC_EVERY tokens
    assert model.calls == SYNC_EVERY * math.ceil(len(answer) / SYNC_EVERY)


def test_style_goes_from_data_to_lora_file_to_generate(tiny_checkpoint_dir, tmp_path, capsys):
    records = [{"instruction": f"Add {i % 11} and {i // 11}.", "input": "", "output": f"{i % 11 + i // 11}"}
               for i in range(40)]
    (tmp_path / "records.json").write_text(json.dumps(records))
    load_script("scripts/prepare_alpaca.py").prepare(
        data_file=tmp_path / "records.json", destination_path=tmp_path / "data", checkpoint_dir=tiny_checkpoint_dir,
        test_split_size=4, max_seq_length=128, prompt_style="chatml")
    assert json.loads((tmp_path / "data" / "prepare_config.json").read_text())["prompt_style"] == "chatml"

    load_script("finetune/lora.py").setup(
        checkpoint_dir=tiny_checkpoint_dir, data_dir=tmp_path / "data", out_dir=tmp_path / "out", precision="32-true",
        batch_size=4, micro_batch_size=4, max_iters=2, eval_interval=0, eval_iters=1, save_interval=0, warmup_iters=1)
    lora_path = tmp_path / "out" / "lit-llama-lora-finetuned.pth"
    assert torch.load(lora_path)["prompt_style"] == "chatml"

    generate = load_script("generate/lora.py")
    args = dict(prompt="Add 3 and 4.", lora_path=lora_path, checkpoint_dir=tiny_checkpoint_dir, temperature=0,
                max_new_tokens=4, precision="32-true")
    capsys.readouterr()
    generate.main(**args)
    assert "prompt style: chatml (from the LoRA file)" in capsys.readouterr().err
    generate.main(prompt_style="alpaca", **args)
    assert "prompt style: alpaca (the LoRA was trained with chatml)" in capsys.readouterr().err


def test_unknown_style_is_refused(tiny_checkpoint_dir, tmp_path):
    proc = run_script("scripts/prepare_alpaca.py", "--checkpoint_dir", tiny_checkpoint_dir, "--data_file",
                      tmp_path / "none.json", "--prompt_style", "vicuna", check=False)
    assert_clean_error(proc, "--prompt_style 'vicuna'", "chatml")


def test_adapter_file_records_the_style(tiny_checkpoint_dir, tmp_path, capsys):
    records = [{"instruction": f"Add {i % 11} and {i // 11}.", "input": "", "output": f"{i % 11 + i // 11}"}
               for i in range(40)]
    (tmp_path / "records.json").write_text(json.dumps(records))
    load_script("scripts/prepare_alpaca.py").prepare(
        data_file=tmp_path / "records.json", destination_path=tmp_path / "data", checkpoint_dir=tiny_checkpoint_dir,
        test_split_size=4, max_seq_length=128, prompt_style="llama2-chat")
    load_script("finetune/adapter.py").setup(
        checkpoint_dir=tiny_checkpoint_dir, data_dir=tmp_path / "data", out_dir=tmp_path / "out", precision="32-true",
        batch_size=4, micro_batch_size=4, max_iters=2, eval_interval=0, eval_iters=1, save_interval=0, warmup_iters=1,
        adapter_start_layer=1)
    adapter_path = tmp_path / "out" / "lit-llama-adapter-finetuned.pth"
    assert torch.load(adapter_path)["adapter_config"]["prompt_style"] == "llama2-chat"
    capsys.readouterr()
    load_script("generate/adapter.py").main(prompt="Add 3 and 4.", adapter_path=adapter_path,
                                            checkpoint_dir=tiny_checkpoint_dir, temperature=0, max_new_tokens=4,
                                            precision="32-true")
    assert "prompt style: llama2-chat (from the adapter file)" in capsys.readouterr().err


def test_chat_turns_in_each_styles_multi_turn_format():
    """serve.py's chat messages as prompts: one user message is exactly the single-turn prompt the style was
    trained with; more turns follow each style's real multi-turn format."""
    one = [{"role": "user", "content": "Name a color."}]
    for style in PROMPT_STYLES.values():
        assert chat_turns(style, one) == [style.prompt("Name a color.")]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."}]
    alpaca, llama2, chatml = (get_prompt_style(n) for n in ("alpaca", "llama2-chat", "chatml"))
    assert chat_turns(alpaca, chat) == [alpaca.prompt("Name a color.", "Be brief.")]  # the system as the input
    # Meta's format: each finished turn its own <s>...</s> (BOS and EOS tokens, added when encoded)
    assert chat_turns(llama2, chat) == ["[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! ",
                                        "[INST] Name a color. [/INST]"]
    assert chat_turns(chatml, chat) == [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!"
        "<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"]
    assert chat_turns(get_prompt_style("llama3"), chat) == [
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nName a color.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"]
    for style, bad, fragment in [(alpaca, [{"role": "system", "content": "x"}], "no user message"),
                                 (llama2, chat[1:3], "alternates"), (chatml, [{"role": "bot", "content": "x"}], "role")]:
        with pytest.raises(UserError, match=fragment):
            chat_turns(style, bad)
