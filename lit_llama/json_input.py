"""JSON that users and clients send (serve.py's request bodies, generate/multi_lora.py's requests file), read in one
place: text that is not UTF-8 or not JSON, values nested deeper than any request needs (Python's parser recurses
and fails at about a thousand levels), and strings that are not valid Unicode text (a lone UTF-16 surrogate such
as "\\ud800": JSON's \\u escapes allow it, but UTF-8, SentencePiece and every file written here cannot hold it)
are each one UserError naming where."""

import json
from typing import Any, Union

from lit_llama.cli import UserError

MAX_DEPTH = 32  # an OpenAI request nests 4 levels deep (messages, a message, its content parts, a part)


def parse_json(text: Union[str, bytes], where: str, max_depth: int = MAX_DEPTH) -> Any:
    """`text` parsed, after the checks above; `where` names it in errors ("the request body", "FILE line 3")."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where} is not UTF-8 text (byte {e.start})")
    try:
        value = json.loads(text)
    except RecursionError:
        raise UserError(f"{where} nests deeper than {max_depth} levels")
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise UserError(f"{where} is not valid JSON: {e}")
    check_json_value(value, where, max_depth)
    return value


def check_json_value(value: Any, where: str, max_depth: int = MAX_DEPTH) -> None:
    """No nesting deeper than `max_depth`, no string (value or key) that is not valid Unicode text."""
    stack = [(value, "", 0)]  # (value, its place as `.key[index]`, depth): no recursion, whatever the depth
    while stack:
        item, place, depth = stack.pop()
        if depth > max_depth:
            raise UserError(f"{where} nests deeper than {max_depth} levels")
        if isinstance(item, dict):
            for key, child in item.items():
                check_text(key, where, f"a key of {place}" if place else "a key")
                stack.append((child, f"{place}.{key}" if place else key, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{place}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            check_text(item, where, place)


def check_text(text: str, where: str, place: str = "") -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        at = f" {place}" if place else ""
        raise UserError(f"{where}{at} holds a lone surrogate ({text[e.start]!r}), which is not valid Unicode text")
