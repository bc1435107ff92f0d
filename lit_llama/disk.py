"""Writing files so that a crash, a kill or a full disk never leaves half a file: every save goes to a temporary
name and is renamed when complete, and a failed write is one clear line with the temporary file removed."""

import errno
import os
import shutil
import stat
import sys
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from lit_llama.cli import UserError


def save_atomic(obj: Any, path: Path, save: Callable[[Any, Path], None] = torch.save) -> None:
    """`save(obj, temporary name)`, then rename: an interrupted save never leaves half a file, and an
    existing file is only replaced by a complete one. A full or read-only disk is one clear error, with the
    temporary file removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with disk_errors(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        save(obj, tmp)
        # some writers (safetensors) create their file readable by its owner only: give it the mode any new
        # file of the user's gets (0666 less the umask), or keep the mode of the file it replaces
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~current_umask())
        os.replace(tmp, path)


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(text: str, path: Path) -> None:
    """Like `save_atomic`, for a text file."""
    save_atomic(text, path, lambda text, tmp: Path(tmp).write_text(text))


def replace_checkpoint(tmp: Path, path: Path) -> None:
    """Puts the complete file or folder `tmp` in the place of `path` so that a kill at any instruction leaves a
    complete one: a file is replaced in one rename; a folder cannot be, so the old one is first renamed to
    `<path>.old` and deleted only once the new one has its name (`find_resume_state` falls back to it)."""
    old = path.with_name(path.name + ".old")
    if not path.is_dir() and not tmp.is_dir():
        os.replace(tmp, path)
        return
    if path.exists():
        if old.exists():  # left by a kill while it was being deleted: `path` is complete
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)

DISK_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


@contextmanager
def disk_errors(path: Path, *temporary: Path) -> Iterator[None]:
    """Turns a failed write of `path` (full disk, read-only file system, no permission) into one line, and
    removes the `temporary` files the write left. torch.save reports a failed write as a RuntimeError."""
    try:
        yield
    except (OSError, RuntimeError, checkpoint_exception_type()) as e:
        for tmp in temporary:
            if Path(tmp).is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with suppress(OSError):  # on a read-only file system there is none (and none can be removed)
                    Path(tmp).unlink(missing_ok=True)
        # torch.distributed.checkpoint gathers every rank's failed write into one CheckpointException, raised on
        # every rank: the reason is the first write error in it. (No other name here may hold the exception:
        # its traceback keeps torch.save's file open, on a disk that could then not be unmounted.)
        reason = write_failure_reason(first_write_error(e), Path(path))
        if reason is None:
            raise  # not a failed write: a bug, keep its traceback
        raise UserError(f"could not write {path}: {reason}") from None


def write_failure_reason(e: BaseException, path: Path) -> Optional[str]:
    """Why writing `path` failed, in words; None for an exception that is no failed write."""
    reason = DISK_ERRORS.get(getattr(e, "errno", None)) or disk_state(path)
    if reason is None and not isinstance(e, OSError):
        if not isinstance(e, RuntimeError) or "write" not in str(e).lower():
            return None
        reason = "the write failed"
    return reason or getattr(e, "strerror", None) or str(e)


def checkpoint_exception_type() -> type:
    """torch.distributed.checkpoint's CheckpointException (a BaseException) once that module is loaded, without
    loading it (seconds) where it is not: it cannot have raised anything then."""
    module = sys.modules.get("torch.distributed.checkpoint.api")
    return module.CheckpointException if module is not None else OSError


def first_write_error(e: BaseException) -> BaseException:
    """The first OSError or RuntimeError a CheckpointException gathered from the ranks, else `e` itself."""
    failures = getattr(e, "failures", None) if isinstance(e, checkpoint_exception_type()) else None
    for failure, _ in (failures or {}).values():
        if isinstance(failure, (OSError, RuntimeError)):
            return failure
    return e


def disk_state(path: Path) -> Optional[str]:
    """Why nothing can be written where `path` goes, if the file system says so."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    if stats.f_flag & os.ST_RDONLY:
        return DISK_ERRORS[errno.EROFS]
    if stats.f_bavail * stats.f_frsize < 1 << 20:  # less than 1 MB left
        return DISK_ERRORS[errno.ENOSPC]
    return None
