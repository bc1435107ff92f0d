"""Chat datasets: OpenAI `messages` and ShareGPT `conversations` records, read and checked, then tokenized into
training samples that learn the assistant's turns only, in the model's prompt style (lit_llama/prompts.py).

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}                       OpenAI (JSON Lines, usually)
    {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}     ShareGPT

A conversation is optional system messages, then user and assistant turns in alternation, from the user, with at
least one answer; a user message after the last answer is left out (there is nothing to learn from it).

In every style the text before an answer is what `prompts.chat_turns` gives serve.py for the conversation up to
there (it is built with chat_turns), so the model is trained on the prompts it will be asked with:
* chatml, llama3: the conversation is one sequence. The labels are the answers, each with the style's end of turn
  (`<|im_end|>`, `<|eot_id|>`); eos follows the last answer where that end of turn is not eos itself.
* llama2-chat: Meta's format, every exchange `<s>[INST] user [/INST] answer </s>`; the answers and their eos are
  learned. (The answer is encoded apart from its prompt, as in every prepared sample: SentencePiece's word
  boundary stands for the space chat_turns writes after "[/INST]".)
* alpaca has no multi-turn format: chat_turns prompts with the last user message alone (the system message as the
  input). So every answer becomes an example of its own, in exactly that prompt: `single_turn_chats`.

scripts/prepare_chat.py: load_chats -> (single_turn_chats) -> data.prepare_dataset(make_sample=prepare_chat_sample).
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from lit_llama.cli import UserError
from lit_llama.data import CHAT_KEYS, IGNORE_INDEX, _json_type, read_json_records
from lit_llama.prompts import DEFAULT_PROMPT_STYLE, PromptStyle, chat_turns, get_prompt_style
from lit_llama.tokenizer import Tokenizer, check_text

Message = Dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}

# a record's format: its list's key -> (the key of a message's role, of its text)
FORMATS = {"messages": ("role", "content"), "conversations": ("from", "value")}
# ShareGPT's speakers (and OpenAI's roles) -> OpenAI's roles
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant"}


def load_chats(path: Path) -> List[List[Message]]:
    """The conversations of a JSON list or JSON Lines file of OpenAI or ShareGPT records (both may be mixed), as
    OpenAI messages. A record that is neither, or not a conversation, is one UserError naming it."""
    path = Path(path)
    return [read_chat(record, f"{path}: {where}") for record, where in read_json_records(path)]


def read_chat(record: Any, where: str) -> List[Message]:
    key = next((k for k in FORMATS if isinstance(record, dict) and k in record), None)
    if key is None:
        hint = ""
        if isinstance(record, dict) and "instruction" in record:
            hint = " (an instruction record: prepare it with scripts/prepare_alpaca.py)"
        raise UserError(f"{where} is {_json_type(record)} with no 'messages' (OpenAI) or 'conversations' (ShareGPT) "
                        f"list: not a chat{hint}")
    role_key, text_key = FORMATS[key]
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: {key!r} is {_json_type(turns)}, expected a non-empty list of messages")
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise UserError(f"{at} is {_json_type(turn)}, expected an object with {role_key!r} and {text_key!r}")
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in ROLES:
            raise UserError(f"{at}: {role_key} {json.dumps(role)[:40]} is not one of {', '.join(ROLES)}")
        messages.append({"role": ROLES[role], "content": message_text(turn.get(text_key), f"{at}: {text_key!r}")})
    return check_conversation(messages, where)


def message_text(content: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's list of content parts, of which only text parts can be learned."""
    if isinstance(content, list) and all(isinstance(part, dict) and isinstance(part.get("text"), str)
                                         and part.get("type") == "text" for part in content):
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise UserError(f"{where} is {_json_type(content)}, expected a text (or a list of text parts)")
    check_text(content, where)
    return content


def check_conversation(messages: List[Message], where: str) -> List[Message]:
    """Optional system messages first, then user, assistant, user, ... with at least one answer; the messages
    up to the last answer."""
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    for i, message in enumerate(messages[start:], start=start):
        expected = ("user", "assistant")[(i - start) % 2]
        if message["role"] != expected:
            raise UserError(f"{where}: message {i} is the {message['role']}'s where the {expected}'s was expected: "
                            "after the system message(s), user and assistant alternate, from the user")
        if not message["content"].strip():
            raise UserError(f"{where}: message {i} (the {expected}'s) is empty")
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        raise UserError(f"{where} has no assistant message: nothing to learn")
    return messages[: answers[-1] + 1]


def single_turn_chats(chats: List[List[Message]]) -> List[List[Message]]:
    """For a single-turn style (alpaca): every answer as a conversation of its own, the messages before it kept,
    so that `prepare_chat_sample` puts it in the prompt chat_turns makes of them (the user message it answers,
    the system message as the input)."""
    return [chat[: i + 1] for chat in chats for i, m in enumerate(chat) if m["role"] == "assistant"]


Piece = Tuple[str, bool, bool, bool]  # (text, learned, bos before it, eos after it)


def chat_pieces(style: PromptStyle, messages: List[Message], tokenizer: Tokenizer) -> List[Piece]:
    """The conversation as (text, learned, bos, eos) pieces in order: the text before every answer (from
    `chat_turns`, so exactly what the model is prompted with) and the answers. A single-turn style (alpaca) gives
    its prompt and the last answer alone."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if style.name not in ("chatml", "llama3", "llama2-chat"):
        answers = answers[-1:]
    # eos after an answer, unless the style's end of turn is that token already (Llama 3 Instruct's <|eot_id|>,
    # SmolLM2's <|im_end|>); in one sequence (chatml, llama3) only after the last one: the prompts have none
    stop_is_eos = bool(style.stop_strings) and tokenizer.token_id(style.stop_strings[0]) == tokenizer.eos_id
    one_sequence = style.name in ("chatml", "llama3")
    pieces, text = [], ""
    for k, i in enumerate(answers):
        turns = chat_turns(style, messages[:i])
        if one_sequence:
            prompt, bos = turns[0][len(text):], k == 0
            assert turns[0].startswith(text), "chat_turns extends the conversation before an answer"
        else:
            prompt, bos = turns[-1], True
        last = k == len(answers) - 1
        eos = not stop_is_eos and (last or not one_sequence)
        answer = style.answer(messages[i]["content"])
        pieces += [(prompt, False, bos, False), (answer, True, False, eos)]
        text = turns[0] + answer
    return pieces


def prepare_chat_sample(
    record: Dict[str, Any],
    tokenizer: Tokenizer,
    max_example_tokens: int,
    mask_inputs: bool = True,
    prompt_style: str = DEFAULT_PROMPT_STYLE,
) -> Dict[str, Any]:
    """One conversation ({"messages": [...]}, checked by `read_chat`) as a training sample of the fields
    `data.prepare_sample` gives: labels are IGNORE_INDEX everywhere but on the answers (all tokens with
    `mask_inputs` False); `input_ids_no_response` is the conversation up to its last answer, and "instruction"
    and "output" the last exchange (what a finetune run prints as its sample), "messages" the whole chat."""
    style = get_prompt_style(prompt_style)
    messages = record["messages"]
    ids, labels, prompt_length = [], [], 0
    for text, learned, bos, eos in chat_pieces(style, messages, tokenizer):
        piece = tokenizer.encode(text, bos=bos, eos=eos)
        if learned:
            prompt_length = sum(len(p) for p in ids)  # up to the last answer
        ids.append(piece)
        labels.append(piece if learned or not mask_inputs else torch.full_like(piece, IGNORE_INDEX))
    full_ids, full_labels = torch.cat(ids), torch.cat(labels)
    last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    return {
        "instruction": last_user,
        "input": "",
        "output": messages[-1]["content"],
        "messages": messages,
        "input_ids": full_ids[:max_example_tokens].clone(),
        "input_ids_no_response": full_ids[: min(prompt_length, max_example_tokens)].clone(),
        "labels": full_labels[:max_example_tokens].clone(),
        "truncated": len(full_ids) > max_example_tokens,
        "num_tokens": len(full_ids),
        "prompt_style": style.name,
    }


def style_of_checkpoint(tokenizer: Tokenizer) -> Optional[str]:
    """The chat format a checkpoint's tokenizer was made for, from its special tokens (ChatML's `<|im_start|>`,
    Llama 3's `<|start_header_id|>`) or its chat template (Llama 2's `[INST]`); None for a base model's."""
    if tokenizer.token_id("<|im_start|>") is not None:
        return "chatml"
    if tokenizer.token_id("<|start_header_id|>") is not None:
        return "llama3"
    config_file = Path(tokenizer.path).parent / "tokenizer_config.json"
    try:
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return "llama2-chat" if isinstance(template, str) and "[INST]" in template else None
