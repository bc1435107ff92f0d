"""Checkpoint I/O, precision helpers and the command-line error handling every script shares."""

import errno
import os
import pickle
import re
import shutil
import stat
import sys
import zipfile
import zlib
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from lit_llama.model import Config, LLaMA, llama_configs

WEIGHTS_NAME = "lit-llama.pth"
CONFIG_NAME = "lit_config.json"
TOKENIZER_NAME = "tokenizer.model"
# embedding rows a model may have beyond its tokenizer's tokens (padding to a round size: Qwen2.5 has 271)
MAX_VOCAB_PADDING = 512


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
    """`jsonargparse.CLI(fn)` that turns `UserError`s into one clear line on stderr and exit code 1, and a
    flag it cannot parse (unknown, or a value of the wrong type) into one line and exit code 2."""
    from argparse import ArgumentError

    from jsonargparse import CLI

    try:
        check_torch_version()
        check_yaml_arguments(kwargs.get("args") or sys.argv[1:])
        return CLI(fn, *args, exit_on_error=False, **kwargs)
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


@dataclass
class CheckpointPaths:
    weights: Path
    config: Config
    tokenizer: Path
    config_file: Optional[Path] = None  # where `config` was read from (None: from the folder's name)


def resolve_checkpoint(
    checkpoint_dir: Optional[Path] = None,
    checkpoint_path: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
) -> CheckpointPaths:
    """Finds weights, model config and tokenizer.

    The usual way is one self-describing directory (`--checkpoint_dir`) holding `lit-llama.pth`,
    `lit_config.json` and `tokenizer.model`. Lit-LLaMA's original flags (`--checkpoint_path X.pth
    --tokenizer_path Y`) also work: the config is then read from `lit_config.json` beside the weights,
    or from the name of their folder (`checkpoints/lit-llama/7B/lit-llama.pth` -> size "7B").
    """
    if checkpoint_path is None and checkpoint_dir is None:
        raise UserError("give --checkpoint_dir (a folder made by scripts/convert_hf_checkpoint.py)")
    if checkpoint_path is None:
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise UserError(f"--checkpoint_dir {checkpoint_dir} does not exist or is not a directory")
        checkpoint_path = checkpoint_dir / WEIGHTS_NAME
        if not checkpoint_path.is_file():
            raise UserError(
                f"--checkpoint_dir {checkpoint_dir} has no {WEIGHTS_NAME}; "
                "convert weights first with scripts/convert_hf_checkpoint.py"
            )
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise UserError(f"--checkpoint_path {checkpoint_path} does not exist")
    folder = checkpoint_path.parent

    config_file: Optional[Path] = folder / CONFIG_NAME
    if config_file.is_file():
        try:
            config = Config.from_json(config_file)
        except (ValueError, TypeError) as e:
            raise UserError(f"{config_file} is not a valid model config: {e}")
    elif folder.name in llama_configs:
        config, config_file = Config.from_name(folder.name), None
    else:
        raise UserError(
            f"no {CONFIG_NAME} beside {checkpoint_path} and its folder name {folder.name!r} is not a known size "
            f"({', '.join(llama_configs)})"
        )

    if tokenizer_path is None:
        from lit_llama.tokenizer import find_tokenizer  # tokenizer.model, else tokenizer.json

        tokenizer_path = find_tokenizer(folder)
        if not tokenizer_path.is_file() and (folder.parent / TOKENIZER_NAME).is_file():
            tokenizer_path = folder.parent / TOKENIZER_NAME  # lit-llama layout: checkpoints/lit-llama/tokenizer.model
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise UserError(f"tokenizer {tokenizer_path} not found (give --tokenizer_path or put it in the checkpoint dir)")
    return CheckpointPaths(checkpoint_path, config, tokenizer_path, config_file)


def file_in_folder(folder: Path, name: Any, source: Path) -> Path:
    """`folder / name` for a file name read from the file `source` (a sharded checkpoint's index), refused unless it
    stays inside `folder`: a crafted file must not make a script read a file elsewhere, by `..`,
    an absolute path or a symbolic link out of the folder. Links within a Hugging Face cache snapshot point
    into its repository's blobs/ folder: those are allowed."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{source}: {name!r} is not a file name")
    folder = Path(folder)
    root = folder.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        root = root.parent.parent  # models--org--name/snapshots/<revision>/x -> models--org--name/blobs/<hash>
    path = folder / name
    escapes = Path(name).is_absolute() or ".." in Path(name).parts
    if escapes or not path.resolve().is_relative_to(root):
        raise UserError(f"{source} names {name!r}, which is not inside {folder}: refused")
    return path


def check_vocab(tokenizer: Any, paths: CheckpointPaths) -> None:
    """The tokenizer must not produce ids the model has no embedding for (a few padding rows are fine)."""
    model_vocab, tokenizer_vocab = paths.config.vocab_size, tokenizer.vocab_size
    if not 0 <= model_vocab - tokenizer_vocab <= MAX_VOCAB_PADDING:
        raise UserError(
            f"tokenizer {paths.tokenizer} has {tokenizer_vocab} tokens but the model has {model_vocab}: "
            "they do not belong together"
        )


def load_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Memory-maps a `.pth` file: tensors are read from disk only when used, never all copied to RAM.
    Only tensors and plain values are read (`weights_only`): a checkpoint cannot run code. The file's
    checksums are verified first (see `verify_checksums`)."""
    verify_checksums(path)
    try:
        state_dict = torch.load(str(path), mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({describe_exception(e)})")
    if not isinstance(state_dict, dict):
        raise UserError(f"{path} does not hold a state dict")
    return state_dict


def verify_checksums(path: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 of every tensor's bytes, which torch.load never checks:
    a flipped bit in a weight loads silently. Checking them reads the file once (a few seconds for 7B; the
    pages then stay cached for the load)."""
    if not zipfile.is_zipfile(path):
        return  # an old-style checkpoint without checksums, or not a checkpoint: torch.load says which
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError):
        return  # a damaged archive: torch.load names the problem
    if bad is not None:
        raise UserError(f"{path} is corrupted: its record {bad} does not match its checksum")


def check_finite(tensors: Dict[str, Any], path: Path) -> None:
    """Corrupted bytes in a checkpoint mostly show up as NaN or infinite weights (a flipped exponent bit);
    a trained model has none. Call it on the weights once they are in memory (it reads every value)."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{path} is corrupted: tensor {name!r} holds NaN or infinite values")


def dcp_load_weights_only(state: Dict[str, Any], path: Path, no_dist: bool = False) -> None:
    """`torch.distributed.checkpoint.load` of a folder (an FSDP sharded checkpoint or resume state) into
    `state`, without unpickling: torch's own reader unpickles the `.metadata` file and the non-tensor values
    with full pickle, which runs whatever code a crafted file holds. Here the metadata may only name the
    classes torch writes there (`read_dcp_metadata`), and values are read with `weights_only=True`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, load
    from torch.distributed.checkpoint._traverse import set_element

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_dcp_metadata(path)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    load(state, storage_reader=Reader(str(path)), planner=Planner(), no_dist=no_dist)


def read_dcp_metadata(path: Path) -> Any:
    """The `.metadata` of a torch.distributed.checkpoint folder, read without running code."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    with open(Path(path) / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only what torch.distributed.checkpoint writes into `.metadata`: its dataclasses, sizes,
    dtypes, layouts and paths. Anything else (os.system, ...) is refused."""

    ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "TensorStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
            "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex", "StorageMeta",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self.ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


def load_model(
    paths: CheckpointPaths,
    device: torch.device,
    dtype: torch.dtype,
    model_class: Callable[..., LLaMA] = LLaMA,
    **model_kwargs: Any,
) -> LLaMA:
    """Builds the model without allocating memory (meta device), then loads the weights straight into
    `dtype` on `device`, tensor by tensor. Keys the model has but the file lacks (LoRA or adapter
    parameters) keep a fresh initialisation."""
    # a config that does not belong to the weights is refused before the model is built: building even on the
    # meta device takes minutes for millions of layers, and allocating its weights may never end
    config_source = paths.config_file or f"the {paths.weights.parent.name} model config"
    check_model_fits(paths.config, dtype, device, config_source)
    state_dict = load_state_dict(paths.weights)
    check_layer_count(paths.config, state_dict, paths.weights, config_source)
    with torch.device("meta"), default_dtype(dtype):
        model = model_class(paths.config, **model_kwargs)
    check_state_dict_fits(model, state_dict, paths.weights)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in state_dict:
                tensor.copy_(state_dict[name])
        # in memory now: one more pass over the loaded weights, no more disk reads
        check_finite({name: t for name, t in model.state_dict().items() if name in state_dict}, paths.weights)
        # LoRA / adapter parameters are not in a base checkpoint: give them their initial values
        for module in model.modules():
            if hasattr(module, "reset_extra_parameters"):
                module.reset_extra_parameters()
    return model


def parameter_count(config: Config) -> int:
    """The base model's number of parameters, computed from the config (nothing is built)."""
    q_size, kv_size = config.n_head * config.head_size, config.n_query_groups * config.head_size
    attention = config.n_embd * (q_size + 2 * kv_size) + q_size * config.n_embd
    per_layer = attention + 3 * config.n_embd * config.intermediate_size + 2 * config.n_embd
    return 2 * config.vocab_size * config.n_embd + config.n_layer * per_layer + config.n_embd


def device_memory(device: torch.device) -> Optional[int]:
    """The memory of `device` in bytes: the machine's RAM for the CPU, the GPU's own for CUDA."""
    device = torch.device(device)
    if device.type == "cpu":
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index if device.index is not None else 0).total_memory
    return None  # meta, or a device whose memory we cannot ask about


def check_model_fits(config: Config, dtype: torch.dtype, device: torch.device, source: Any) -> None:
    """The weights of the model `config` describes fit in the memory of `device` in `dtype` (before anything
    is built or allocated: a wrong size otherwise ends, minutes later, in a MemoryError or the OOM killer)."""
    memory = device_memory(device)
    n_params = parameter_count(config)
    needed = n_params * dtype.itemsize
    if memory is not None and needed > memory:
        sizes = ", ".join(f"{f}={getattr(config, f)}" for f in ("n_layer", "n_embd", "intermediate_size", "vocab_size"))
        raise UserError(
            f"{source} describes a model of {n_params:,} parameters ({sizes}): {needed / 1e9:,.1f} GB in "
            f"{str(dtype).removeprefix('torch.')}, more than the {memory / 1e9:,.1f} GB of memory of the {device} "
            "device"
        )


def check_layer_count(config: Config, state_dict: Dict[str, Any], path: Path, source: Any) -> None:
    """The config's n_layer is the number of layers in the weights file."""
    layers = {name.split(".")[2] for name in state_dict if name.startswith("transformer.h.")}
    if layers and config.n_layer != len(layers):
        raise UserError(f"{source}: n_layer is {config.n_layer}, but {path} holds {len(layers)} layers")


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Creates modules directly in `dtype` (no float32 copy of a 7B model first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def check_state_dict_fits(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], path: Path) -> None:
    """A base checkpoint must give every base weight, with the right shape."""
    expected = model.state_dict()
    for name, tensor in state_dict.items():
        if name not in expected and name.endswith((".rms_1.scale", ".rms_2.scale", "ln_f.scale")):
            raise UserError(
                f"{path} is a Lit-LLaMA checkpoint (RMSNorm .scale weights, Meta's rotary layout): convert it with "
                "scripts/convert_lit_llama_checkpoint.py"
            )
        if name not in expected:
            raise UserError(f"{path}: unexpected tensor {name!r}; is it a checkpoint of this model family?")
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise UserError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model config expects "
                f"{tuple(expected[name].shape)}"
            )
    base_names = [n for n in expected if not is_extra_parameter(n)]
    missing = [n for n in base_names if n not in state_dict]
    if missing:
        raise UserError(f"{path}: missing {len(missing)} weights, e.g. {missing[0]!r}")


def is_extra_parameter(name: str) -> bool:
    """Parameters added on top of the base model by LoRA or the adapter."""
    return "lora_" in name or "adapter_" in name


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


def check_output_dir(
    output_dir: Path, overwrite: bool = False, filename: str = WEIGHTS_NAME, flag: str = "out_dir"
) -> None:
    """`--out_dir` (or the script's `--flag`) can be written, and an existing checkpoint in it is replaced only
    when asked to."""
    from lit_llama.checks import check_out_dir  # lit_llama.checks imports this module

    check_out_dir(output_dir, flag)
    if (Path(output_dir) / filename).exists() and not overwrite:
        raise UserError(f"{Path(output_dir) / filename} already exists; pass --overwrite true to replace it")


def save_checkpoint_dir(
    output_dir: Path, state_dict: Dict[str, torch.Tensor], config: Config, tokenizer_path: Path
) -> None:
    """Writes a self-describing checkpoint folder: weights, model config and tokenizer."""
    output_dir = Path(output_dir)
    save_atomic(state_dict, output_dir / WEIGHTS_NAME)
    write_text_atomic(config.to_json_text(), output_dir / CONFIG_NAME)
    copy_tokenizer(tokenizer_path, output_dir)


def copy_tokenizer(tokenizer_path: Path, output_dir: Path) -> None:
    """Copies the tokenizer file (as tokenizer.model, or tokenizer.json), and every other tokenizer file beside
    it: the other format where a model ships both (Mistral), and the settings files that say its special tokens
    (tokenizer_config.json, generation_config.json, special_tokens_map.json)."""
    from lit_llama.tokenizer import HF_TOKENIZER_NAME, SENTENCEPIECE_NAME, TOKENIZER_FILES

    tokenizer_path = Path(tokenizer_path)
    name = HF_TOKENIZER_NAME if tokenizer_path.suffix == ".json" else SENTENCEPIECE_NAME
    sources = [(tokenizer_path, name)] + [(tokenizer_path.parent / other, other) for other in TOKENIZER_FILES
                                          if other != name and (tokenizer_path.parent / other).is_file()]
    for source, name in sources:
        if source.resolve() != (Path(output_dir) / name).resolve():  # may be the same folder
            save_atomic(source, Path(output_dir) / name, shutil.copyfile)


PRECISION_DTYPES = {
    "32-true": torch.float32,
    "16-true": torch.float16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float32,
    "bf16-mixed": torch.float32,
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_precision() -> str:
    """bf16 where the GPU supports it, full precision on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-true"
    return "32-true"


def precision_dtype(precision: Optional[str]) -> torch.dtype:
    precision = precision or default_precision()
    if precision not in PRECISION_DTYPES:
        raise UserError(f"--precision {precision!r} is not one of {', '.join(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[precision]


def num_parameters(module: torch.nn.Module, requires_grad: Optional[bool] = None) -> int:
    return sum(p.numel() for p in module.parameters() if requires_grad is None or p.requires_grad == requires_grad)
