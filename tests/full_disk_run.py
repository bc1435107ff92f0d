"""`python tests/full_disk_run.py ARGS` runs the script named by $FULL_DISK_SCRIPT with ARGS, as `python SCRIPT
ARGS` would, but on a disk that is full for the files whose path contains $FULL_DISK_MATCH, written by the
ranks in $FULL_DISK_RANKS (comma-separated; default all): a full disk at a known point of a run, without
filling a real one. torch.save, torch.distributed.checkpoint's file writes and text writes fail with ENOSPC.

Fabric starts the other processes of a multi-process run by running this same file again with the same
environment, so every rank sees the same disk.
"""

import errno
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def main() -> None:
    script, match = REPO_ROOT / os.environ["FULL_DISK_SCRIPT"], os.environ["FULL_DISK_MATCH"]
    ranks = os.environ.get("FULL_DISK_RANKS")

    def full(path) -> bool:
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        return match in str(path) and (ranks is None or rank in ranks.split(","))

    def no_space(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    real_save = torch.save  # before lit_llama is imported: save_atomic's default is bound at import

    def save(obj, f, *args, **kwargs):
        if full(f):
            no_space(f)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    from torch.distributed.checkpoint.filesystem import FileSystem

    real_create_stream = FileSystem.create_stream

    def create_stream(self, path, mode):
        if "w" in mode and full(path):
            no_space(path)
        return real_create_stream(self, path, mode)

    FileSystem.create_stream = create_stream
    # run as __main__ with sys.argv[0] still naming this file (runpy would name the script there): Fabric starts
    # the other ranks as `python sys.argv[0] ARGS`, and they need the same full disk
    exec(compile(script.read_text(), str(script), "exec"), {"__name__": "__main__", "__file__": str(script)})


if __name__ == "__main__":
    main()
