"""Prompt styles: how an instruction (and its optional input) is put to the model, and what ends the answer.

The style a model is finetuned with is the one it must be prompted with. Prepare scripts take `--prompt_style`
and record it in prepare_config.json and in every sample; finetune/lora.py and finetune/adapter.py copy it into
their files; generate/lora.py and generate/adapter.py read it from there; compare.py uses the data's, and
generate/full.py takes `--prompt_style`.

* alpaca (the default): Stanford Alpaca's template; the answer ends with the tokenizer's EOS.
* llama2-chat: Llama-2-chat's `[INST] ... [/INST]` turn (bos added by the tokenizer); the answer ends with EOS,
  as in Meta's format (`... [/INST] answer </s>`).
* chatml: `<|im_start|>user ... <|im_end|>` turns, as in TinyLlama-Chat v0.x. LLaMA's tokenizer has no
  `<|im_end|>` token, so it is text: training answers end with "<|im_end|>" and then EOS, and generation stops
  when either appears.
* llama3: Llama 3 Instruct's headers, `<|start_header_id|>user<|end_header_id|>\n\n ... <|eot_id|>`, then the
  assistant's header; bos (`<|begin_of_text|>`) is added by the tokenizer. In Llama 3's tokenizer.json these are
  special tokens (written in the text, they encode as those tokens); answers end with `<|eot_id|>`, which
  generation stops on as a token (and as text, with tokenizers that lack it).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from lit_llama.cli import UserError


@dataclass(frozen=True)
class PromptStyle:
    name: str
    template: str  # with {instruction}
    template_with_input: str  # with {instruction} and {input}
    stop_strings: Tuple[str, ...] = ()  # text that ends an answer besides EOS; the first is appended in training

    def prompt(self, instruction: str, input: str = "") -> str:
        """The text the model's answer follows directly."""
        if input:
            return self.template_with_input.format(instruction=instruction, input=input)
        return self.template.format(instruction=instruction)

    def answer(self, output: str) -> str:
        """A training answer as the model should produce it (EOS is added by the tokenizer)."""
        return output + self.stop_strings[0] if self.stop_strings else output

    def cut_at_stop(self, text: str) -> Tuple[str, bool]:
        """`text` up to the first stop string, and whether there was one."""
        positions = [text.find(s) for s in self.stop_strings if s in text]
        return (text[: min(positions)], True) if positions else (text, False)


PROMPT_STYLES: Dict[str, PromptStyle] = {
    style.name: style
    for style in (
        PromptStyle(
            "alpaca",
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:",
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        ),
        PromptStyle("llama2-chat", "[INST] {instruction} [/INST]", "[INST] {instruction}\n\n{input} [/INST]"),
        PromptStyle(
            "chatml",
            "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
            "<|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n<|im_start|>assistant\n",
            stop_strings=("<|im_end|>",),
        ),
        PromptStyle(
            "llama3",
            "<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "<|start_header_id|>user<|end_header_id|>\n\n{instruction}\n\n{input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            stop_strings=("<|eot_id|>",),
        ),
    )
}
DEFAULT_PROMPT_STYLE = "alpaca"


def get_prompt_style(name: str, flag: str = "--prompt_style") -> PromptStyle:
    if name not in PROMPT_STYLES:
        raise UserError(f"{flag} {name!r} is not one of {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]


def prompt_style_of_data(data_dir: Path) -> str:
    """The style the prepared data in `data_dir` was written with (data prepared before styles existed: alpaca)."""
    config_file = Path(data_dir) / "prepare_config.json"
    if not config_file.is_file():
        return DEFAULT_PROMPT_STYLE
    try:
        name = json.loads(config_file.read_text()).get("prompt_style", DEFAULT_PROMPT_STYLE)
    except (json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{config_file} is not a valid prepare config: {e}")
    get_prompt_style(name, f"{config_file}: prompt_style")
    return name


def chat_turns(style: PromptStyle, messages: Sequence[Dict[str, str]]) -> List[str]:
    """An OpenAI-style chat (messages {"role": "system" | "user" | "assistant", "content": text}) as the text the
    model's answer follows, in `style`'s multi-turn format: a list of turns, each to be encoded with BOS in
    front and every turn but the last closed with EOS (Llama-2-chat separates turns with those tokens, not with
    text; the other styles give one turn). One user message gives exactly `style.prompt(content)`.

    * alpaca is single-turn: the last user message is the instruction, the system message(s) the input (its
      context); earlier turns are left out.
    * llama2-chat: Meta's format, `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} ` per turn,
      the last `[INST] {user} [/INST]`; after the system message, user and assistant alternate.
    * chatml: every message as `<|im_start|>{role}\\n{content}<|im_end|>\\n`, then `<|im_start|>assistant\\n`.
    * llama3: every message as `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`, then the
      assistant's header.
    """
    for message in messages:
        if message.get("role") not in ("system", "user", "assistant") or not isinstance(message.get("content"), str):
            raise UserError(f"a chat message needs a role (system, user or assistant) and a text content: {message}")
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if style.name == "chatml":
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return [text + "<|im_start|>assistant\n"]
    if style.name == "llama3":
        header = "<|start_header_id|>{}<|end_header_id|>\n\n"
        text = "".join(header.format(m["role"]) + m["content"] + "<|eot_id|>" for m in messages)
        return [text + header.format("assistant")]
    users = [m["content"] for m in turns if m["role"] == "user"]
    if not users:
        raise UserError("the chat has no user message")
    if style.name != "llama2-chat":  # single-turn styles (alpaca)
        return [style.prompt(users[-1], system)]
    if [m["role"] for m in turns] != ["user", "assistant"] * (len(turns) // 2) + ["user"]:
        raise UserError("a llama2-chat conversation alternates user and assistant messages and ends with a user one")
    first = turns[0]["content"] if not system else f"<<SYS>>\n{system}\n<</SYS>>\n\n{turns[0]['content']}"
    contents = [first] + [m["content"] for m in turns[1:]]
    pairs = zip(contents[0:-1:2], contents[1::2])
    return [f"[INST] {user} [/INST] {answer} " for user, answer in pairs] + [f"[INST] {contents[-1]} [/INST]"]
