"""Devices: Fabric, the strategy (one device, DDP or FSDP2 sharding) and precision, each flag turned into
settings here once; and starting the processes of a run."""

import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Union

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from lit_llama.args import RunArgs
from lit_llama.cli import UserError, check_at_least

if TYPE_CHECKING:  # Lightning is imported where training starts: generation and serving start without it
    import lightning as L
    from lightning.fabric.loggers import Logger
    from lightning.fabric.strategies import Strategy

STRATEGIES = ("auto", "ddp", "fsdp")  # what every finetune script offers; the tests run each one

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Precision:
    """--precision, turned once into what each part of a run needs from it."""

    name: str  # the flag's value: 32-true, 16-true, bf16-true, 16-mixed or bf16-mixed
    DTYPES = {"32-true": torch.float32, "16-true": torch.float16, "bf16-true": torch.bfloat16,
              "16-mixed": torch.float32, "bf16-mixed": torch.float32}

    @classmethod
    def from_flag(cls, precision: Optional[str], trains_every_weight: bool = False) -> "Precision":
        """The flag's value, checked; by default bf16 on a GPU that has it and float32 on a CPU. bf16-true keeps
        frozen weights in bf16 (the trained ones are kept in float32, see finetune.py); a run that trains every
        weight defaults to bf16-mixed instead: an AdamW step of about its learning rate (3e-5) is less than
        half the bf16 spacing at a weight of 0.02 (1.2e-4), so it would be rounded away."""
        if precision is None:
            bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            precision = ("bf16-mixed" if trains_every_weight else "bf16-true") if bf16 else "32-true"
        if precision not in cls.DTYPES:
            raise UserError(f"--precision {precision!r} is not one of {', '.join(cls.DTYPES)}")
        return cls(precision)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are loaded in."""
        return self.DTYPES[self.name]

    @property
    def fabric_precision(self) -> str:
        """What Fabric is given: the scripts load the weights in their dtype themselves (with the trained ones in
        float32): Fabric's "-true" precisions would cast every weight once more."""
        return "32-true" if self.name.endswith("-true") else self.name

    @property
    def fsdp_compute_dtype(self) -> Optional[torch.dtype]:
        """bf16-mixed under FSDP: float32 shards, gathered for computation in bf16 (half the traffic and memory
        of float32)."""
        return torch.bfloat16 if self.name == "bf16-mixed" else None


def precision_dtype(precision: Optional[str]) -> torch.dtype:
    """The dtype inference loads the weights in for --precision (default: bf16 on a GPU that has it)."""
    return Precision.from_flag(precision).dtype


def make_fabric(run: RunArgs, precision: Precision, out_dir: Path) -> "L.Fabric":
    """Fabric with the devices, strategy (see `choose_strategy`) and precision of a run, and for --logger_name
    tensorboard or wandb the logger that gets every metrics.csv row too (see `make_logger`)."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count() or 1
    check_at_least("devices", run.devices, 1)
    check_at_least("num_nodes", run.num_nodes, 1)
    if run.devices > available and run.num_nodes == 1:
        raise UserError(f"--devices {run.devices} is more than the {available} devices available on this machine")
    logger = make_logger(run.logger_name, out_dir)
    import lightning as L

    return L.Fabric(
        devices=run.devices,
        num_nodes=run.num_nodes,
        strategy=choose_strategy(run, precision),
        precision=precision.fabric_precision,
        loggers=[logger] if logger is not None else None,
    )


LOGGER_NAMES = ("csv", "tensorboard", "wandb")


def make_logger(logger_name: str, out_dir: Path) -> Optional["Logger"]:
    """Where the metrics of a run go besides out_dir/metrics.csv, which every run writes. csv (default): nowhere
    else. tensorboard: out_dir/logs/version_N/events.out.tfevents.* (`tensorboard --logdir out_dir/logs`).
    wandb: a Weights & Biases run, its local files in out_dir/wandb; with WANDB_MODE=offline nothing leaves the
    machine (`wandb sync` uploads the run later)."""
    if logger_name == "csv":
        return None
    if logger_name == "tensorboard":
        from lightning.fabric.loggers import TensorBoardLogger

        try:
            return TensorBoardLogger(root_dir=out_dir, name="logs")
        except ModuleNotFoundError:
            raise UserError("--logger_name tensorboard needs the tensorboard package: pip install tensorboard")
    if logger_name == "wandb":
        try:
            import wandb  # noqa: F401
            from lightning.pytorch.loggers import WandbLogger
        except ModuleNotFoundError:
            raise UserError("--logger_name wandb needs the wandb package: pip install wandb")

        class FinishingWandbLogger(WandbLogger):
            """Lightning's Trainer finishes the W&B run at the end; under Fabric the logger's finalize does."""

            def finalize(self, status: str) -> None:
                super().finalize(status)
                if self._experiment is not None:
                    self._experiment.finish()

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return FinishingWandbLogger(project="lit-llama", name=Path(out_dir).name, save_dir=str(out_dir))
    raise UserError(f"--logger_name {logger_name!r} is not one of {', '.join(LOGGER_NAMES)}")


def uses_fsdp(run: RunArgs) -> bool:
    """--strategy fsdp, or auto over several devices."""
    if run.strategy not in STRATEGIES:
        raise UserError(f"--strategy {run.strategy!r} is not one of {', '.join(STRATEGIES)}")
    return run.strategy == "fsdp" or (run.strategy == "auto" and run.devices * run.num_nodes > 1)


def choose_strategy(run: RunArgs, precision: Precision) -> Union[str, "Strategy"]:
    """--strategy as Fabric takes it. auto: FSDP over several devices, nothing to distribute on one. ddp:
    every device holds the whole model and its AdamW states; gradients are averaged. fsdp: FSDP2 sharding
    (see `shard_model`), also on one device, over NCCL on GPUs or gloo on CPUs."""
    fsdp = uses_fsdp(run)
    if run.cpu_offload and not fsdp:
        raise UserError("--cpu_offload needs FSDP: add --strategy fsdp")
    if not fsdp:
        return run.strategy
    if precision.name == "16-mixed":
        raise UserError("--precision 16-mixed does not work with FSDP (its gradient scaler cannot unscale sharded "
                        "gradients): use bf16-mixed, bf16-true or 32-true")
    parallelize = partial(shard_model, param_dtype=precision.fsdp_compute_dtype, cpu_offload=run.cpu_offload)
    world = run.devices * run.num_nodes
    from lightning.fabric.strategies import ModelParallelStrategy

    return ModelParallelStrategy(parallelize, data_parallel_size=world, tensor_parallel_size=1)


def shard_model(
    model: torch.nn.Module, device_mesh: Any, param_dtype: Optional[torch.dtype], cpu_offload: bool
) -> torch.nn.Module:
    """FSDP2: every transformer block is one unit, gathered whole only while it runs (forward, and again in
    backward), then the root unit holds the rest (embedding, final norm, output layer). Weights, gradients
    and AdamW states are split among all processes. Each shard keeps its weight's dtype, so LoRA and adapter
    weights stay float32 beside a bf16 base; gradients are averaged in float32. With `cpu_offload` the
    shards (and the AdamW step) live in CPU memory and each block is copied to the GPU when it runs."""
    mesh = device_mesh["data_parallel"]
    options: Dict[str, Any] = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype, torch.float32)}
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in model.transformer.h:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def is_fsdp(fabric: "L.Fabric") -> bool:
    from lightning.fabric.strategies import ModelParallelStrategy

    return isinstance(fabric.strategy, ModelParallelStrategy)


def load_device(fabric: "L.Fabric", quantize: Optional[str] = None) -> torch.device:
    """Where a script loads the weights: under FSDP (or to quantize them) into CPU memory, from which sharding
    (or quantization) moves each block to its device, so no GPU ever holds the whole model at full size;
    else straight onto the device."""
    return torch.device("cpu") if is_fsdp(fabric) or quantize else fabric.device


def launch(fabric: "L.Fabric", function: Callable, *args: Any) -> Any:
    """`fabric.launch(function, *args)`. When it fails in the process the user started, the processes Fabric
    started for the other devices are stopped with it: they may be waiting in a collective for this one, and
    would wait for a timeout of many minutes (NCCL) or print a traceback of a lost connection (gloo)."""
    try:
        return fabric.launch(function, *args)
    except BaseException:
        launched = getattr(getattr(fabric.strategy, "launcher", None), "procs", [])
        processes = list(launched)
        # emptied in place: Fabric's observer thread watches this list, and would kill this process too (before
        # it prints its error) when it sees the others ended
        launched.clear()
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + 10
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # hanging in a collective: only SIGKILL ends it
                process.kill()
        raise


def unwrap(obj: Any) -> Any:
    """The model or optimizer itself, from Fabric's wrapper (under FSDP2 the model is sharded in place)."""
    wrappers = sys.modules.get("lightning.fabric.wrappers")  # not imported: nothing was wrapped by Fabric
    if wrappers is not None and isinstance(obj, wrappers._FabricModule):
        return obj.module
    if wrappers is not None and isinstance(obj, wrappers._FabricOptimizer):
        return obj.optimizer
    return obj


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux
