"""The run folder (`--out_dir`) of a finetuning run: its lock (one run at a time), `run.json` (what the run is,
for `--resume` to check) and the resume state (trainable weights, AdamW states, counters and every rank's
random generators)."""

import fcntl
import json
import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from lit_llama.checkpoint import check_finite, dcp_load_weights_only, verify_checksums
from lit_llama.cli import UserError, check_out_dir, describe_exception
from lit_llama.disk import disk_errors, replace_checkpoint
from lit_llama.distributed import unwrap

if TYPE_CHECKING:  # Lightning is imported where training starts: generation and serving start without it
    import lightning as L

RESUME_NAME = "resume.pth"  # trainable weights, optimizer, counters and RNG of the last save

RESUME_META = "meta.pth"  # in a sharded resume folder: the counters and RNG beside the shards

RUN_NAME = "run.json"  # what the run in a folder is (method, model, method settings): --resume compares it

LOCK_NAME = "run.lock"  # held by the running process: a second run on the same folder stops at once
METRICS_NAME = "metrics.csv"  # one row per logged iteration, every row once, over all resumed parts


@contextmanager
def claim_out_dir(out_dir: Path, resume: bool, run_info: Dict[str, Any], world_size: int) -> Iterator[None]:
    """Makes `out_dir` this run's own for as long as the run lasts. The folder must be writable; a lock file
    keeps a second run out while this one runs (the lock goes with the process, also when it is killed). A
    new run refuses a folder with checkpoints in it; `--resume` refuses a folder whose `run.json` describes
    another method, model or method settings than `run_info` (`fit` writes it when training starts). Only
    the launching process (global rank 0) does this: the processes Fabric starts for the other devices run
    the script again and skip it. `world_size` is the number of processes the flags ask for (devices x nodes):
    a one-process run is always the launching process, whatever RANK or SLURM_PROCID its environment holds."""
    check_out_dir(out_dir)
    if world_size > 1 and not is_launching_process():
        yield
        return
    if resume and not out_dir.is_dir():
        raise UserError(f"--resume: {out_dir} does not exist: there is no run to continue")
    with disk_errors(out_dir / LOCK_NAME):  # only the lock's own writing: not the run it guards
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / LOCK_NAME, "a+")
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            raise UserError(
                f"--out_dir {out_dir} is in use by another run ({owner}): wait for it to end or choose another "
                "--out_dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        lock.flush()
        try:
            check_run_dir(out_dir, resume, run_info)
            yield
        finally:
            # removed while still held: a run starting now creates a new lock file, and this one is done
            with suppress(OSError):
                (out_dir / LOCK_NAME).unlink()
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_launching_process() -> bool:
    """In a launch of several processes: the process a user started (global rank 0), not one Fabric, torchrun or
    SLURM started for another device. Asked only when the run has several processes: left over in the
    environment of a one-process run (an interactive SLURM shell, say), these variables mean nothing."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def check_run_dir(out_dir: Path, resume: bool, run_info: Dict[str, Any]) -> None:
    """A finished or interrupted run in `out_dir` is never overwritten by a new one, and only the same kind of
    run continues it."""
    if not resume:
        if any(out_dir.glob("*.pth")):
            raise UserError(
                f"--out_dir {out_dir} already holds checkpoints: pass --resume true to continue that run, "
                "or choose another --out_dir"
            )
        return
    run_file = out_dir / RUN_NAME
    if not run_file.is_file():
        if (out_dir / RESUME_NAME).exists():
            return  # written before run.json existed: load_resume_state still checks what it holds
        raise UserError(f"--resume: {out_dir} holds no run to continue (no {RUN_NAME}); start without --resume")
    try:
        there = json.loads(run_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--resume: {run_file} is not valid JSON ({e})")
    if not isinstance(there, dict):
        raise UserError(f"--resume: {run_file} is not a run description")
    for key, ours in run_info.items():
        theirs = there.get(key)
        if theirs == ours or key not in there:  # a key newer than the run.json: nothing to compare with
            continue
        if key == "method":
            raise UserError(f"--resume: {out_dir} holds a run of finetune/{theirs}.py, not of finetune/{ours}.py")
        if isinstance(theirs, dict) and isinstance(ours, dict):  # name only the settings that differ
            differ = [k for k in {**theirs, **ours} if theirs.get(k) != ours.get(k)]
            theirs = ", ".join(f"{k}={theirs.get(k)}" for k in differ)
            ours = ", ".join(f"{k}={ours.get(k)}" for k in differ)
        raise UserError(f"--resume: {out_dir} holds a run with {key} {theirs}; this run has {ours}")


def save_resume_state(
    fabric: "L.Fabric",
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    counters: Dict[str, Any],
    path: Path,
    sharded: bool = False,
) -> None:
    """Everything `--resume` needs: the trainable weights, the AdamW states, the counters and every rank's
    random generators. One file, gathered on rank 0; or with `sharded` a torch.distributed.checkpoint folder
    in which each rank writes its own shards (no gathering: for full finetuning of large models). Written
    under a temporary name and renamed when complete, so a crash never leaves half a resume state."""
    options = StateDictOptions(full_state_dict=not sharded, cpu_offload=True, ignore_frozen_params=True)
    weights, optimizer_state = get_state_dict(unwrap(model), unwrap(optimizer), options=options)
    meta = {**counters, "world_size": fabric.world_size, "rng": gather_rng_states(fabric)}
    tmp = path.with_name(path.name + ".tmp")
    with disk_errors(path, tmp):
        if sharded:
            dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=tmp)
            if fabric.global_rank == 0:
                torch.save(meta, tmp / RESUME_META)
        elif fabric.global_rank == 0:
            torch.save({"model": weights, "optimizer": optimizer_state, **meta}, tmp)
        fabric.barrier()
        if fabric.global_rank == 0:
            replace_checkpoint(tmp, path)
    fabric.barrier()


def find_resume_state(path: Path) -> Optional[Path]:
    """The resume state at `path`, or the previous one at `<path>.old` if a kill came between the renames of
    `replace_checkpoint`; None when there is none."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        return path
    return old if old.exists() else None


def load_resume_state(
    fabric: "L.Fabric", model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path
) -> Dict[str, Any]:
    """Restores what `save_resume_state` wrote (a file or a sharded folder, on any strategy) into the set-up
    model and optimizer, and this rank's random generators; returns the counters. Only tensors and plain
    values are read (`weights_only`): a resume file cannot run code."""
    if path.is_file():
        verify_checksums(path)
    try:
        if path.is_dir():
            # the set-up model's own (sharded) state dicts are the templates the shards are read into
            weights, optimizer_state = get_state_dict(
                unwrap(model), unwrap(optimizer), options=StateDictOptions(ignore_frozen_params=True)
            )
            saved = {"model": weights, "optimizer": optimizer_state}
            dcp_load_weights_only(saved, path)
            meta = torch.load(path / RESUME_META, weights_only=True)
            options = StateDictOptions(ignore_frozen_params=True)
        else:
            saved = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
            meta = saved
            options = StateDictOptions(full_state_dict=True, strict=False)  # frozen weights are not in it
    except Exception as e:  # noqa: BLE001 - any unreadable resume state is the user's file
        raise UserError(f"--resume: {path} is not a resume state this version can read ({describe_exception(e)})")
    if not isinstance(meta, dict) or "world_size" not in meta or "rng" not in meta:
        raise UserError(f"--resume: {path} was written by an older version; start a new run in another --out_dir")
    if meta["world_size"] != fabric.world_size:
        raise UserError(
            f"--resume: {path} was written by {meta['world_size']} processes; resume it with as many "
            f"(--devices x --num_nodes), not {fabric.world_size}"
        )
    trainable = {name for name, p in unwrap(model).named_parameters() if p.requires_grad}
    if set(saved["model"]) != trainable:
        unexpected = sorted(set(saved["model"]) ^ trainable)
        raise UserError(f"--resume: {path} holds the weights of another model or method (e.g. {unexpected[0]!r})")
    check_finite({name: t.to_local() if isinstance(t, DTensor) else t for name, t in saved["model"].items()}, path)
    set_state_dict(
        unwrap(model), unwrap(optimizer), model_state_dict=saved["model"],
        optim_state_dict=saved["optimizer"], options=options,
    )
    rng = meta["rng"][fabric.global_rank]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and fabric.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], fabric.device)
    return {key: meta[key] for key in ("iter_num", "step_count", "tokens", "train_seconds")}


def gather_rng_states(fabric: "L.Fabric") -> List[Dict[str, torch.Tensor]]:
    """Every rank's CPU (and CUDA) random generator state, in rank order: LoRA dropout draws from the
    generator of the device it runs on, and each rank has its own."""
    mine = {"cpu": torch.get_rng_state()}
    if fabric.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(fabric.device)
    if fabric.world_size == 1:
        return [mine]
    states: List[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(states, mine)
    return states
