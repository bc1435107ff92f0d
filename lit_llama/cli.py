"""The command line every script shares: `run_cli` (jsonargparse with one-line errors), `UserError`, deprecated
flag names and the checks of flag values, run before any work starts or any file is written: a bad value is
one line naming the flag and what it expects."""

import json
import math
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch


class UserError(Exception):
    """A mistake in the user's input (a path, a flag, a file): printed as one line, exit code 1."""

# from 2.6 on, `torch.load` reads only tensors and plain values unless told otherwise; every load here also
# says `weights_only=True`, but an older torch would unpickle (run code from) files inside its own helpers
MIN_TORCH_VERSION = (2, 6)


def describe_exception(e: BaseException) -> str:
    """"Type: first line of the message": torch's loading errors run over many lines of advice."""
    if isinstance(e, pickle.UnpicklingError):  # what weights_only refuses; torch's advice is to load it anyway
        return "it holds Python objects other than tensors, which could run code when loaded: refused"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def check_torch_version(version: str = torch.__version__) -> None:
    numbers = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    if numbers < MIN_TORCH_VERSION:
        raise UserError(
            f"torch {version} is too old: lit-llama needs torch >= {'.'.join(map(str, MIN_TORCH_VERSION))}, "
            "whose torch.load cannot run code from a checkpoint (pip install -U torch)"
        )


def run_cli(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """`jsonargparse.CLI(fn)` with the errors of `with_one_line_errors`."""
    from jsonargparse import CLI

    return with_one_line_errors(lambda: CLI(fn, *args, exit_on_error=False, **kwargs), kwargs.get("args"))


def with_one_line_errors(run: Callable[[], Any], argv: Optional[List[str]] = None) -> Any:
    """`run()` (which parses `argv`, by default the command line's, and does the work) with a `UserError` turned
    into one clear line on stderr and exit code 1, and a flag that cannot be parsed (unknown, or a value of the
    wrong type) into one line and exit code 2."""
    from argparse import ArgumentError

    try:
        check_torch_version()
        check_yaml_arguments(argv or sys.argv[1:])
        return run()
    except ArgumentError as e:
        print(f"error: {describe_argument_error(e)} (--help lists the flags)", file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        rank = peer_failure_rank(e)
        if rank is None:
            raise  # a bug: keep its traceback
        # another process of this multi-process run stopped, and printed why: this one follows it, and only the
        # first process says so
        if rank == 0:
            print("error: another process of this run stopped (its error is printed above): stopping too",
                  file=sys.stderr)
        sys.exit(1)


def peer_failure_rank(e: BaseException) -> Optional[int]:
    """This process's rank, if `e` is a collective of a multi-process run failing because another process of
    it has ended (gloo: "Connection closed by peer"); else None."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return None
    lost_peer = isinstance(e, distributed.DistError) or (
        isinstance(e, RuntimeError)
        and re.search(r"connection (closed|reset) by peer|broken pipe|remote worker", str(e), re.IGNORECASE)
    )
    return distributed.get_rank() if lost_peer and distributed.get_world_size() > 1 else None

MAX_YAML_NODES = 100_000  # a config or flag value with more values than this, once its aliases are expanded


def check_yaml_arguments(argv: List[str]) -> None:
    """What jsonargparse would read as YAML, checked before it does: a `--config` file must be UTF-8, and no
    config or flag value may expand, through YAML aliases (`*name` repeating an `&name` anchor), into more
    than MAX_YAML_NODES values. A "billion laughs" file of a few hundred bytes expands into billions and
    runs out of memory after minutes."""
    import yaml

    for i, arg in enumerate(argv):
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
        else:
            name, value = (argv[i - 1] if i and argv[i - 1].startswith("--") else f"argument {i + 1}"), arg
        if name == "--config" and Path(value).is_file():  # else jsonargparse reads the value as YAML itself
            name = f"--config {value}"
            try:
                value = Path(value).read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                byte = f"byte {e.object[e.start]:#04x} at offset {e.start}"
                raise UserError(f"{name} is not UTF-8 text ({byte})") from None
        if "*" not in value:
            continue  # no alias: nothing can expand
        try:
            nodes = yaml_expanded_size(yaml.compose(value, Loader=yaml.SafeLoader))
        except (yaml.YAMLError, RecursionError):
            continue  # not YAML, or nested too deeply: jsonargparse reports it
        if nodes > MAX_YAML_NODES:
            raise UserError(f"{name} expands through YAML aliases into {nodes:.3g} values (at most "
                            f"{MAX_YAML_NODES:,} are accepted): write the values out")


def yaml_expanded_size(root: Any) -> int:
    """How many values a composed YAML node stands for with every alias expanded, counted without expanding
    them (an alias is the same node object as its anchor: each node is counted once, then reused)."""
    import yaml

    sizes: Dict[int, int] = {}

    def size(node: Any) -> int:
        if id(node) not in sizes:
            if isinstance(node, yaml.SequenceNode):
                sizes[id(node)] = 1 + sum(size(child) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                sizes[id(node)] = 1 + sum(size(key) + size(value) for key, value in node.value)
            else:
                sizes[id(node)] = 1
        return sizes[id(node)]

    return size(root) if root is not None else 0


def describe_argument_error(e: Exception) -> str:
    """jsonargparse's multi-line message in one line: `--top_k 'many' is not a valid int or null`."""
    text = str(e)
    key = re.match(r'Parser key "([^"]+)"', text)
    value = re.search(r"(?:Given|Got) value: (.*)", text)
    if not key or not value:
        return " ".join(line.strip() for line in text.splitlines())
    expected_part = re.sub(r"Given value type: .*", "", text)  # the type of what was given is not expected
    types = dict.fromkeys(re.findall(r"<class '(\w+)'>", expected_part))  # in order, once each
    expected = " or ".join("null" if t == "NoneType" else t for t in types) or "value"
    return f"--{key.group(1)} {value.group(1).strip()!r} is not a valid {expected}"


def deprecated_flag(new: str, value: Any, old: str, old_value: Any) -> Any:
    """The value of `--new`, or of its deprecated old name `--old` when that was given (with a note)."""
    if old_value is None:
        return value
    print(f"note: --{old} is deprecated: use --{new}", file=sys.stderr)
    return old_value

Number = Union[int, float]


def check_range(
    flag: str,
    value: Optional[Number],
    low: Optional[Number] = None,
    high: Optional[Number] = None,
    low_inclusive: bool = True,
    optional: bool = False,
) -> None:
    """`value` of `--flag` is a finite number in [low, high] (or (low, high] without `low_inclusive`);
    None only when `optional`."""
    if value is None and optional:
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"--{flag} must be a finite number, got {value!r}")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and value > high
    if too_low or too_high:
        left = "[" if low_inclusive else "("
        bounds = f"{left}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise UserError(f"--{flag} must be in {bounds}, got {value}")


def check_positive(flag: str, value: Optional[Number], optional: bool = False) -> None:
    check_range(flag, value, 0, low_inclusive=False, optional=optional)


def check_at_least(flag: str, value: Optional[Number], low: Number, optional: bool = False) -> None:
    check_range(flag, value, low, optional=optional)


def check_out_dir(path: Path, flag: str = "out_dir", replaces: Optional[str] = None, overwrite: bool = False) -> None:
    """`path` can be made into a folder and written to: it is not a file, nor under a file, nor on a read-only
    file system or in a folder without write permission. Nothing is created. `replaces`: the file the script
    writes in it, which is replaced only with `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--{flag} {path} is a file, expected a folder")
    existing = path
    while not existing.exists():  # the nearest folder that exists is where writing starts
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--{flag} {path}: {existing} is a file, not a folder")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise UserError(f"--{flag} {path} is on a read-only file system")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--{flag} {path}: no permission to write in {existing}")
    if replaces is not None and (path / replaces).exists() and not overwrite:
        raise UserError(f"{path / replaces} already exists; pass --overwrite true to replace it")


def check_file(path: Optional[Path], flag: str) -> None:
    """An input file the user named exists and is a file."""
    if path is not None and not Path(path).is_file():
        raise UserError(f"--{flag} {path} {'is not a file' if Path(path).exists() else 'not found'}")


def run_renamed_script(old: str, new: str) -> None:
    """Runs scripts/`new` in place of its old name scripts/`old` (kept so that commands written before a rename
    still work), with the same flags, after a note naming it."""
    import runpy

    print(f"note: scripts/{old} is now scripts/{new} (see scripts/README.md)", file=sys.stderr)
    sys.argv[0] = str(Path(__file__).resolve().parents[1] / "scripts" / new)
    runpy.run_path(sys.argv[0], run_name="__main__")


def normalize_repeated_flag(argv: List[str], flag: str) -> List[str]:
    """`--lora A --lora B` as one `--lora ["A", "B"]`: jsonargparse reads a list flag given once as a JSON list."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
        elif argv[i].startswith(flag + "="):
            values.append(argv[i][len(flag) + 1 :])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + ([flag, json.dumps(values)] if values else [])
