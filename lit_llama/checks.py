"""Checks of flag values, run before any work starts or any file is written: a bad value is one `UserError`
line naming the flag and what it expects (see `lit_llama.utils.run_cli`)."""

import math
import os
from pathlib import Path
from typing import Optional, Union

from lit_llama.utils import UserError

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


def check_out_dir(path: Path, flag: str = "out_dir") -> None:
    """`path` can be made into a folder and written to: it is not a file, nor under a file, nor on a read-only
    file system or in a folder without write permission. Nothing is created."""
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


def check_file(path: Optional[Path], flag: str) -> None:
    """An input file the user named exists and is a file."""
    if path is not None and not Path(path).is_file():
        raise UserError(f"--{flag} {path} {'is not a file' if Path(path).exists() else 'not found'}")
