"""Instruction datasets: prompts in a prompt style (lit_llama/prompts.py, Alpaca by default), loading and checking records, tokenizing them into
training samples and writing the train/test splits that the finetune scripts read.

scripts/prepare_alpaca.py and scripts/prepare_dolly.py are thin wrappers around `prepare_dataset`; chat datasets
(OpenAI `messages`, ShareGPT `conversations`) are read and tokenized by lit_llama/chat_data.py.
"""

import json
import math
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from lit_llama.checkpoint import TOKENIZER_NAME, tokenizer_beside, verify_checksums
from lit_llama.cli import UserError, describe_exception
from lit_llama.disk import disk_errors
from lit_llama.prompts import DEFAULT_PROMPT_STYLE, get_prompt_style
from lit_llama.tokenizer import Tokenizer, check_text

# PyTorch's `cross_entropy(ignore_index=-100)` default: label positions with this value add no loss
IGNORE_INDEX = -100

# lit-llama's default tokenizer location, used when neither --checkpoint_dir nor --tokenizer_path is given
DEFAULT_TOKENIZER_PATH = Path("checkpoints/lit-llama") / TOKENIZER_NAME

FIELDS = ("instruction", "input", "output")
PREPARE_CONFIG_NAME = "prepare_config.json"  # the settings and the tokenizer the data was prepared with


def generate_prompt(instruction: str, input: str = "", prompt_style: str = DEFAULT_PROMPT_STYLE) -> str:
    """The prompt in `prompt_style` (the Stanford Alpaca template by default, see lit_llama/prompts.py). The
    model's answer follows it directly: a training example is the tokens of this prompt followed by the tokens
    of the output (see `prepare_sample`)."""
    return get_prompt_style(prompt_style).prompt(instruction, input)


# the names instruction datasets give each field, in the order they are looked for (Alpaca's first; Dolly and
# GPTeacher call the answer "response", Dolly calls the input "context")
FIELD_NAMES = {"instruction": ("instruction",), "input": ("input", "context"), "output": ("output", "response")}
CHAT_KEYS = ("messages", "conversations")  # a chat record (scripts/prepare_chat.py reads those)


def load_records(path: Path, field_map: Optional[Dict[str, str]] = None) -> List[Dict[str, str]]:
    """Reads an instruction dataset: a JSON list of objects, or JSON Lines (one object per line, like Dolly).

    Args:
        path: The .json or .jsonl file.
        field_map: Our field name -> the file's field name, for files that name them differently
            (Dolly: {"input": "context", "output": "response"}). A field not mapped is found by its usual names
            (`FIELD_NAMES`) in the first record: "output" or else "response", "input" or else "context".

    Returns a list of {"instruction", "input", "output"} dicts; "input" is optional in the file ("" if absent).
    """
    path = Path(path)
    located = read_json_records(path)
    names = field_names(path, located[0], field_map or {})
    records = []
    for record, where in located:
        if not isinstance(record, dict):
            raise UserError(f"{path}: {where} is {_json_type(record)}, expected an object")
        checked = {}
        for field, name in names.items():
            value = record.get(name)
            if field == "input" and value is None:
                value = ""  # the input is optional
            if not isinstance(value, str):
                if name not in record and any(key in record for key in CHAT_KEYS):
                    raise UserError(f"{path}: {where} is a chat ({next(k for k in CHAT_KEYS if k in record)!r}), "
                                    "not an instruction record: prepare it with scripts/prepare_chat.py")
                problem = "is missing" if name not in record else f"is {_json_type(value)}"
                raise UserError(f"{path}: {where}: field {name!r} {problem}, expected a string")
            if field != "input" and not value.strip():
                raise UserError(f"{path}: {where}: field {name!r} is empty, expected a non-empty string")
            check_text(value, f"{path}: {where}: field {name!r}")
            checked[field] = value
        records.append(checked)
    return records


def field_names(path: Path, first: Tuple[Any, str], field_map: Dict[str, str]) -> Dict[str, str]:
    """Our field -> the file's name for it: `field_map`'s, else the first of `FIELD_NAMES` that the first record
    has (else the usual name, for the error). A name other than the usual one is printed, so it is never a
    surprise which field was taken for the answer."""
    record = first[0] if isinstance(first[0], dict) else {}
    names = {}
    for field, candidates in FIELD_NAMES.items():
        names[field] = field_map.get(field) or next((n for n in candidates if n in record), candidates[0])
        if field not in field_map and names[field] != field:
            print(f"note: {path}: the {field} is the field {names[field]!r} (detected)", file=sys.stderr)
    is_chat = any(key in record for key in CHAT_KEYS)  # load_records names it, and the script to use
    if isinstance(first[0], dict) and names["output"] not in record and "output" not in field_map and not is_chat:
        fields = ", ".join(repr(key) for key in record) or "none"
        raise UserError(f"{path}: {first[1]} has no answer field 'output' or 'response' (its fields: {fields}): "
                        "name it with --response_key")
    return names


def read_json_records(path: Path) -> List[Tuple[Any, str]]:
    """The records of a JSON list or JSON Lines file (a .json file of one object per line is JSON Lines too),
    each with where it is ("record 3", "record 3 (line 5)"), for errors that name it. At least one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: also when an editor wrote a byte-order mark
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e})")

    if path.suffix == ".jsonl":
        located = _parse_json_lines(path, text)
    else:
        try:
            data = json.loads(text)
        except RecursionError:  # json's parser recurses once per level of nesting
            raise UserError(f"{path} nests arrays or objects too deeply to be a list of records") from None
        except json.JSONDecodeError as e:
            try:  # several objects, one per line, is JSON Lines in a file named .json
                located = _parse_json_lines(path, text)
            except UserError:
                raise UserError(f"{path} is not valid JSON: {e}") from None
        else:
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON list of records, got {_json_type(data)}")
            located = [(record, f"record {i}") for i, record in enumerate(data)]
    if not located:
        raise UserError(f"{path} holds no records")
    return located


def _json_type(value: Any) -> str:
    """How JSON names the type of a parsed value, for error messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    return names.get(type(value), "a number" if isinstance(value, float) else "null")


def _parse_json_lines(path: Path, text: str) -> List[Tuple[Any, str]]:
    located = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"record {len(located)} (line {line_number})"
        try:
            located.append((json.loads(line), where))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: {where} is not valid JSON: {e}")
        except RecursionError:
            raise UserError(f"{path}: {where} nests arrays or objects too deeply to be a record") from None
    return located


def prepare_sample(
    record: Dict[str, str],
    tokenizer: Tokenizer,
    max_example_tokens: int,
    mask_inputs: bool = True,
    prompt_style: str = DEFAULT_PROMPT_STYLE,
) -> Dict[str, Any]:
    """Tokenizes one record into a training sample.

    input_ids = bos + prompt + output + eos, cut to `max_example_tokens`, the prompt in `prompt_style` (whose answers
    may end with a stop text before eos, as ChatML's "<|im_end|>"). The prompt and the output are encoded
    separately and concatenated, not encoded as one string: SentencePiece could merge characters across the
    boundary into one token, and then no token count could say where the prompt ends. This way the prompt's
    tokens are exactly those the model sees at inference (`input_ids_no_response`), and the mask is exact.
    (SentencePiece starts the output with its word-boundary piece, so the model reads "### Response: <output>".)

    Returns the record's texts (kept for evaluation prompts) and:
        input_ids: LongTensor of the full example.
        input_ids_no_response: LongTensor of bos + prompt, what to generate from.
        labels: input_ids with the prompt's positions set to IGNORE_INDEX when `mask_inputs`, so that only
            the response is learned (the training loop shifts labels by one against the logits).
        truncated: whether the example was longer than `max_example_tokens`.
        num_tokens: the example's length before truncation.
    """
    style = get_prompt_style(prompt_style)
    prompt_ids = tokenizer.encode(style.prompt(record["instruction"], record["input"]), bos=True, eos=False)
    # eos after the answer, unless the style's stop text already is that token (Llama 3 Instruct's <|eot_id|>)
    eos = not style.stop_strings or tokenizer.token_id(style.stop_strings[0]) != tokenizer.eos_id
    output_ids = tokenizer.encode(style.answer(record["output"]), bos=False, eos=eos)
    full_ids = torch.cat([prompt_ids, output_ids])
    input_ids = full_ids[:max_example_tokens].clone()  # clone: do not keep the untruncated tensor alive in the save
    labels = input_ids.clone()
    if mask_inputs:
        labels[: len(prompt_ids)] = IGNORE_INDEX
    return {
        "instruction": record["instruction"],
        "input": record["input"],
        "output": record["output"],
        "input_ids": input_ids,
        "input_ids_no_response": prompt_ids[:max_example_tokens].clone(),
        "labels": labels,
        "truncated": len(full_ids) > max_example_tokens,
        "num_tokens": len(full_ids),
        "prompt_style": style.name,  # finetune's validation samples are generated in the same style
    }


def resolve_test_split_size(requested: Optional[int], num_records: int, default: int) -> int:
    """`requested` when given; otherwise `default`, or 10% (at least 1) of a dataset too small for it
    (fewer than twice `default` records, e.g. a local sample), so that most records still go to training."""
    if requested is not None:
        return requested
    if num_records >= 2 * default:
        return default
    size = max(1, num_records // 10)
    print(f"note: only {num_records} records, so the test split is 10% ({size}) instead of {default}", file=sys.stderr)
    return size


def check_prepare_flags(
    out_dir: Path, data_file: Optional[Path], test_split_size: Optional[int], max_example_tokens: int, seed: int
) -> None:
    """What scripts/prepare_*.py are given, checked before anything is read or downloaded."""
    from lit_llama.cli import check_at_least, check_file, check_out_dir, check_range

    check_out_dir(out_dir)
    check_file(data_file, "data_file")
    check_at_least("test_split_size", test_split_size, 1, optional=True)
    check_at_least("max_example_tokens", max_example_tokens, 2)
    check_range("seed", seed, 0, 2**63 - 1)


def prepare_dataset(
    records: Sequence[Dict[str, str]],
    tokenizer: Tokenizer,
    out_dir: Path,
    test_split_size: int,
    seed: int,
    max_example_tokens: int,
    mask_inputs: bool = True,
    extra_config: Optional[Dict[str, Any]] = None,
    prompt_style: str = DEFAULT_PROMPT_STYLE,
    make_sample: Optional[Callable[..., Dict[str, Any]]] = None,
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Tokenizes `records` (with `make_sample`, of `prepare_sample`'s signature: `prepare_sample` itself by
    default; lit_llama/chat_data.py's for conversations), splits them at random (repeatably, by `seed`) and
    writes `train.pt`, `test.pt` (lists of samples) and `prepare_config.json` (the settings used) to `out_dir`.
    `extra_config` is recorded in the config too (where the data and the tokenizer came from; paths are
    written resolved). Prints the split sizes, how many examples were truncated and their token lengths.
    Returns (train, test)."""
    out_dir = Path(out_dir)
    if max_example_tokens < 1:
        raise UserError(f"--max_example_tokens must be positive, got {max_example_tokens}")
    get_prompt_style(prompt_style)  # a wrong name fails before the tokenizing
    make_sample = make_sample or prepare_sample
    samples = [make_sample(r, tokenizer, max_example_tokens, mask_inputs, prompt_style)
               for r in tqdm(records, desc="tokenizing")]

    lengths = sorted(s["num_tokens"] for s in samples)  # of every record: what --max_example_tokens to choose

    # a prompt that fills max_example_tokens leaves no response token to learn: all labels ignored, a NaN loss
    learnable = [s for s in samples if (s["labels"] != IGNORE_INDEX).any()]
    num_skipped = len(samples) - len(learnable)
    if not learnable:
        raise UserError(f"every record's prompt alone fills --max_example_tokens {max_example_tokens}: raise it")
    if num_skipped:
        print(f"note: skipped {num_skipped} records whose prompt alone fills --max_example_tokens", file=sys.stderr)
    samples = learnable
    if not 1 <= test_split_size < len(samples):
        raise UserError(
            f"--test_split_size {test_split_size} must be at least 1 and less than the number of records "
            f"({len(samples)}), so that both splits get some"
        )

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(samples), generator=generator).tolist()
    test = [samples[i] for i in order[:test_split_size]]
    train = [samples[i] for i in order[test_split_size:]]

    percentiles = {f"p{p}": lengths[max(0, math.ceil(p / 100 * len(lengths)) - 1)] for p in (50, 90, 99)}
    percentiles["max"] = lengths[-1]
    truncated = sum(s["truncated"] for s in samples)
    config = {
        **{k: str(v.resolve()) if isinstance(v, Path) else v for k, v in (extra_config or {}).items()},
        "tokenizer_sha256": tokenizer.sha256,  # load_prepared refuses this data with any other tokenizer
        "prompt_style": prompt_style,
        "max_seq_length": max_example_tokens,  # the key predates the flag's name
        "mask_inputs": mask_inputs,
        "seed": seed,
        "num_records": len(records),
        "num_skipped": num_skipped,
        "num_train": len(train),
        "num_test": len(test),
        "num_truncated": truncated,
        "token_lengths": percentiles,
    }

    outputs = {"train.pt": train, "test.pt": test, PREPARE_CONFIG_NAME: json.dumps(config, indent=2) + "\n"}
    for name in outputs:
        if (out_dir / name).exists():
            print(f"note: replacing the existing {out_dir / name}", file=sys.stderr)
    save_dataset_files({out_dir / name: content for name, content in outputs.items()})

    print(f"train: {len(train)} samples, test: {len(test)} samples -> {out_dir}")
    print(f"truncated to --max_example_tokens {max_example_tokens}: {truncated} of {len(samples)}")
    print("tokens per record (before truncation): " + ", ".join(f"{k} {v}" for k, v in percentiles.items()))
    return train, test


def save_dataset_files(files: Dict[Path, Any]) -> None:
    """Writes every file (text as text, anything else with torch.save) under a temporary name beside the
    one it replaces, and renames them only once all are complete: a full disk or a crash while writing
    leaves an earlier dataset in the folder whole, never new train.pt beside old test.pt. (The renames
    themselves take microseconds.) On a failed write the temporary files are removed."""
    temporary = {path: path.with_name(path.name + ".tmp") for path in files}
    for path, content in files.items():
        with disk_errors(path, *temporary.values()):
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                temporary[path].write_text(content, encoding="utf-8")
            else:
                torch.save(content, temporary[path])
    for path, tmp in temporary.items():
        with disk_errors(path, *temporary.values()):
            os.replace(tmp, path)


def load_prepared(
    data_dir: Path, tokenizer: Optional[Tokenizer] = None
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Reads the (train, test) sample lists written by `prepare_dataset`. With `tokenizer`, refuses data that
    `prepare_config.json` says was prepared with another one (its token ids would mean other words)."""
    data_dir = Path(data_dir)
    hint = "run scripts/prepare_alpaca.py (or prepare_dolly.py) first"
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist: {hint}")
    if tokenizer is not None:
        check_prepared_tokenizer(data_dir, tokenizer)
    paths = [data_dir / "train.pt", data_dir / "test.pt"]
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path} not found: {hint}")
    splits = []
    for path in paths:
        verify_checksums(path)
        try:
            split = torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
            raise UserError(f"{path} is not a readable prepared dataset ({describe_exception(e)}): {hint}")
        if not isinstance(split, list) or not split:
            raise UserError(f"{path} does not hold a list of samples: {hint}")
        for i, sample in enumerate(split):
            check_sample(sample, f"{path}: sample {i}", hint)
        splits.append(split)
    return splits[0], splits[1]


def check_data_fits(data: List[Dict[str, Any]], vocab_size: int, data_dir: Path) -> None:
    """Token ids past the model's vocabulary mean the data was prepared with another tokenizer."""
    largest = max(max(int(s["input_ids"].max()), int(s["labels"].max())) for s in data)
    if largest >= vocab_size:
        raise UserError(
            f"{data_dir} holds token id {largest} but the model's vocabulary has {vocab_size} tokens: "
            "prepare the data with this checkpoint's tokenizer"
        )


def check_sample(sample: Any, where: str, hint: str) -> None:
    """What the training loop takes from a prepared sample (see `prepare_sample`), checked once when the data is
    loaded: an instruction, and input_ids and labels as equally long, non-empty 1-D integer tensors of token
    ids (labels may also be IGNORE_INDEX). Else the loop would fail deep inside with a KeyError, a max() of an
    empty tensor or an embedding lookup of float indices. Ids past the vocabulary: `check_data_fits`."""
    if not isinstance(sample, dict):
        raise UserError(f"{where} is not a dict of tensors: {hint}")
    if not isinstance(sample.get("instruction"), str):
        raise UserError(f"{where} has no 'instruction' text: {hint}")
    for field in ("input_ids", "labels"):
        value = sample.get(field)
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{where} has no {field!r} tensor: {hint}")
        if value.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise UserError(f"{where}: {field!r} holds {value.dtype} values, expected integer token ids: {hint}")
        if value.dim() != 1 or value.numel() == 0:
            raise UserError(f"{where}: {field!r} has shape {tuple(value.shape)}, expected a non-empty list of ids: "
                          f"{hint}")
    input_ids, labels = sample["input_ids"], sample["labels"]
    if len(labels) != len(input_ids):
        raise UserError(f"{where}: 'labels' has {len(labels)} ids and 'input_ids' {len(input_ids)}: {hint}")
    if int(input_ids.min()) < 0 or bool(((labels < 0) & (labels != IGNORE_INDEX)).any()):
        raise UserError(f"{where} holds negative token ids: {hint}")


def check_prepared_tokenizer(data_dir: Path, tokenizer: Tokenizer) -> None:
    config_path = Path(data_dir) / PREPARE_CONFIG_NAME
    if not config_path.is_file():
        return  # data prepared elsewhere: the token-id range check of the finetune scripts still applies
    try:
        recorded = json.loads(config_path.read_text()).get("tokenizer_sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{config_path} is not a valid prepare config ({e})")
    if recorded is not None and recorded != tokenizer.sha256:
        raise UserError(
            f"{data_dir} was prepared with another tokenizer than {tokenizer.path}: prepare the data again "
            "with this checkpoint's tokenizer"
        )


def load_tokenizer(
    checkpoint_dir: Optional[Path] = None, tokenizer_path: Optional[Path] = None
) -> Tuple[Tokenizer, Path]:
    """The tokenizer of `--tokenizer_path`, or `tokenizer.model` in `--checkpoint_dir` (or in its parent folder,
    lit-llama's layout), or lit-llama's default checkpoints/lit-llama/tokenizer.model. No weights are needed."""
    if tokenizer_path is None and checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise UserError(f"--checkpoint_dir {checkpoint_dir} does not exist or is not a directory")
        tokenizer_path = tokenizer_beside(checkpoint_dir)
    elif tokenizer_path is None:
        if not DEFAULT_TOKENIZER_PATH.is_file():
            raise UserError("give --checkpoint_dir (a folder with tokenizer.model) or --tokenizer_path")
        tokenizer_path = DEFAULT_TOKENIZER_PATH
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise UserError(f"tokenizer {tokenizer_path} not found")
    return Tokenizer(tokenizer_path), tokenizer_path


def download_if_missing(url: str, path: Path, timeout: float = 30.0) -> Path:
    """Downloads `url` to `path` unless that file exists. Writes to a temporary name first, so an interrupted
    download is never taken for the data."""
    path = Path(path)
    if path.is_file():
        return path
    # folders this creates are removed again if the download fails: nothing half-made is left behind
    created = [folder for folder in [path.parent, *path.parent.parents] if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {path.name}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:  # HTTPError and timeouts are subclasses
        tmp.unlink(missing_ok=True)
        for folder in created:  # innermost first
            if not any(folder.iterdir()):
                folder.rmdir()
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"could not download {url} ({reason}): this step needs network access; "
            "pass --data_file to use a local copy"
        )
    os.replace(tmp, path)
    return path
