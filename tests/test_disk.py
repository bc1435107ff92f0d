"""lit_llama/disk.py: a write that fails (a full disk, a read-only file system) is one line and leaves no
temporary file."""

import errno
import subprocess
from pathlib import Path

import pytest
import torch

from lit_llama.cli import UserError, check_out_dir
from lit_llama.disk import save_atomic


def test_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    def fills_the_disk(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=r"could not write .*weights.pth: the disk is full"):
        save_atomic({"w": torch.ones(3)}, tmp_path / "weights.pth", fills_the_disk)
    assert list(tmp_path.iterdir()) == []

    def torch_write_fails(obj, path):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: file write failed")

    with pytest.raises(UserError, match="the write failed"):
        save_atomic({"w": torch.ones(3)}, tmp_path / "weights.pth", torch_write_fails)
    assert list(tmp_path.iterdir()) == []


def test_real_full_and_read_only_file_system(small_tmpfs):
    with pytest.raises(UserError, match="the disk is full"):
        save_atomic({"w": torch.ones(1 << 20)}, small_tmpfs / "big.pth")  # 4 MB
    assert list(small_tmpfs.iterdir()) == []

    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(UserError, match="--out_dir .* is on a read-only file system"):
        check_out_dir(small_tmpfs / "out")
    with pytest.raises(UserError, match="the file system is read-only"):
        save_atomic({"w": torch.ones(3)}, small_tmpfs / "small.pth")
    assert list(small_tmpfs.iterdir()) == []
