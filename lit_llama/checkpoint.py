"""Checkpoints: where a model's files are (`resolve_checkpoint`), reading them safely (no code runs, checksums
and shapes checked), building the model from them, and each of our formats' reader beside its writer:

- a checkpoint folder: `lit-llama.pth` (the weights: `save_weights` / `load_weights`), `lit_config.json`, the
  tokenizer (`save_checkpoint_dir`, `load_model`);
- a sharded folder (torch.distributed.checkpoint, written by every FSDP rank: `save_sharded_weights`,
  `load_sharded`).

LoRA and adapter files are read and written in lit_llama/lora.py and lit_llama/adapter.py, resume states in
lit_llama/run_dir.py."""

import os
import pickle
import shutil
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lit_llama.cli import UserError, describe_exception
from lit_llama.disk import disk_errors, replace_checkpoint, save_atomic, write_text_atomic
from lit_llama.distributed import unwrap
from lit_llama.model import Config, LLaMA, llama_configs
from lit_llama.tokenizer import (
    HF_TOKENIZER_NAME,
    MAX_VOCAB_PADDING,
    SENTENCEPIECE_NAME,
    TOKENIZER_FILES,
    find_tokenizer,
)

if TYPE_CHECKING:  # Lightning is imported where training starts: generation and serving start without it
    import lightning as L

WEIGHTS_NAME = "lit-llama.pth"

# Our weights file says what it is: {"format": WEIGHTS_FORMAT, "version": 1, "state_dict": {...}}. Lit-LLaMA wrote
# a bare tensor dict under the same name in another layout; so did this repository before the marker. Only such an
# unmarked file is told apart by its keys (`read_weights`).
WEIGHTS_FORMAT = "lit-llama/weights"
WEIGHTS_FORMAT_VERSION = 1

CONFIG_NAME = "lit_config.json"

TOKENIZER_NAME = "tokenizer.model"


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
        tokenizer_path = tokenizer_beside(folder)
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise UserError(f"tokenizer {tokenizer_path} not found (give --tokenizer_path or put it in the checkpoint dir)")
    return CheckpointPaths(checkpoint_path, config, tokenizer_path, config_file)


def tokenizer_beside(folder: Path) -> Path:
    """The tokenizer beside a model's weights in `folder` (tokenizer.model, else tokenizer.json: see
    `tokenizer.find_tokenizer`), or in its parent folder (Lit-LLaMA's and Meta's layout: checkpoints/lit-llama/
    tokenizer.model beside checkpoints/lit-llama/7B/); where there is none, the path it would have beside the
    weights (for the caller's error)."""
    candidates = [find_tokenizer(folder), find_tokenizer(Path(folder).resolve().parent)]
    return next((path for path in candidates if path.is_file()), candidates[0])


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


def save_weights(state_dict: Dict[str, torch.Tensor], path: Path) -> None:
    """Writes a model's weights (a base `lit-llama.pth`, a full finetune) with the format marker, atomically."""
    if not all(isinstance(t, torch.Tensor) for t in state_dict.values()):  # e.g. a whole file read back unopened
        raise TypeError("save_weights takes a dict of tensors")
    save_atomic({"format": WEIGHTS_FORMAT, "version": WEIGHTS_FORMAT_VERSION, "state_dict": state_dict}, path)


def load_weights(path: Path) -> Dict[str, torch.Tensor]:
    """Reads what `save_weights` writes (memory-mapped, see `load_state_dict`): the weights' tensors by name.
    A file without the marker is read as a bare tensor dict, as this repository wrote them before the marker;
    Lit-LLaMA's files have the same shape, and `check_state_dict_fits` names them by their keys."""
    checkpoint = load_state_dict(path)
    marker = checkpoint.get("format")
    if marker is None:
        if "lora_config" in checkpoint or "adapter_config" in checkpoint:
            raise UserError(f"{path} is a LoRA or adapter file, not a model's weights")
        if not all(isinstance(t, torch.Tensor) for t in checkpoint.values()):
            raise UserError(f"{path} is not a model's weights: expected the {WEIGHTS_FORMAT!r} format or tensors")
        return checkpoint
    if marker != WEIGHTS_FORMAT:
        raise UserError(f"{path}: format {marker!r} is not {WEIGHTS_FORMAT!r}, the format of a model's weights")
    if checkpoint.get("version") != WEIGHTS_FORMAT_VERSION:
        raise UserError(f"{path}: {WEIGHTS_FORMAT} version {checkpoint.get('version')!r} is not "
                        f"{WEIGHTS_FORMAT_VERSION}, the one this version of lit-llama reads (a newer lit-llama wrote it?)")
    tensors = checkpoint.get("state_dict")
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise UserError(f"{path}: state_dict must map names to tensors")
    return tensors


def is_marked_weights(checkpoint: Dict[str, Any]) -> bool:
    """A file `save_weights` wrote (checked by its marker alone)."""
    return checkpoint.get("format") == WEIGHTS_FORMAT


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
    state_dict = load_weights(paths.weights)
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


def save_checkpoint_dir(
    output_dir: Path, state_dict: Dict[str, torch.Tensor], config: Config, tokenizer_path: Path
) -> None:
    """Writes a self-describing checkpoint folder: weights, model config and tokenizer."""
    output_dir = Path(output_dir)
    save_weights(state_dict, output_dir / WEIGHTS_NAME)
    write_text_atomic(config.to_json_text(), output_dir / CONFIG_NAME)
    copy_tokenizer(tokenizer_path, output_dir)


def copy_tokenizer(tokenizer_path: Path, output_dir: Path) -> None:
    """Copies the tokenizer file (as tokenizer.model, or tokenizer.json), and every other tokenizer file beside
    it: the other format where a model ships both (Mistral), and the settings files that say its special tokens
    (tokenizer_config.json, generation_config.json, special_tokens_map.json)."""
    tokenizer_path = Path(tokenizer_path)
    name = HF_TOKENIZER_NAME if tokenizer_path.suffix == ".json" else SENTENCEPIECE_NAME
    sources = [(tokenizer_path, name)] + [(tokenizer_path.parent / other, other) for other in TOKENIZER_FILES
                                          if other != name and (tokenizer_path.parent / other).is_file()]
    for source, name in sources:
        if source.resolve() != (Path(output_dir) / name).resolve():  # may be the same folder
            save_atomic(source, Path(output_dir) / name, shutil.copyfile)


def full_state_dict(model: torch.nn.Module, trainable_only: bool = False) -> Dict[str, torch.Tensor]:
    """The model's weights (or only those that train), whole, in CPU memory on rank 0; the other ranks get
    an empty dict. Under FSDP they are gathered from the shards, so every rank must call this."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(unwrap(model), options=options)


def save_sharded_weights(fabric: "L.Fabric", model: torch.nn.Module, path: Path) -> None:
    """A torch.distributed.checkpoint folder of the weights (under "model"; each rank writes its shards, no
    gathering), written under a temporary name and renamed when complete. generate/full.py reads it."""
    tmp = path.with_name(path.name + ".tmp")
    with disk_errors(path, tmp):
        dcp.save({"model": get_model_state_dict(unwrap(model))}, checkpoint_id=tmp)
        fabric.barrier()
        if fabric.global_rank == 0:
            replace_checkpoint(tmp, path)
    fabric.barrier()


def load_sharded(paths: CheckpointPaths, device: torch.device, dtype: torch.dtype) -> LLaMA:
    """Reads what `save_sharded_weights` writes: the folder of an FSDP sharded checkpoint (torch.distributed.checkpoint format, the weights under
    "model") in a single process, straight into the model's tensors."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = read_dcp_metadata(paths.weights)  # refuses anything but metadata: a crafted file runs no code
    except Exception as e:  # noqa: BLE001 - any unreadable folder is the user's input
        raise UserError(f"{paths.weights} is not a sharded checkpoint folder ({describe_exception(e)})")
    with torch.device("meta"), default_dtype(dtype):
        model = LLaMA(paths.config)
    stored = {  # the shapes of the stored weights, as empty tensors, to check them like a .pth file's
        name[len("model.") :]: torch.empty(entry.size, device="meta")
        for name, entry in metadata.state_dict_metadata.items()
        if name.startswith("model.") and isinstance(entry, TensorStorageMetadata)
    }
    check_state_dict_fits(model, stored, paths.weights)
    model.to_empty(device=device)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        # fills the tensors in place, casting them to dtype; one process reads every shard
        try:
            dcp_load_weights_only(state, paths.weights, no_dist=True)
        except Exception as e:  # noqa: BLE001 - any unreadable shard is the user's input
            raise UserError(f"{paths.weights} has unreadable shards ({describe_exception(e)})")
    model.load_state_dict(state["model"])
    check_finite(state["model"], paths.weights)
    return model


def num_parameters(module: torch.nn.Module, requires_grad: Optional[bool] = None) -> int:
    return sum(p.numel() for p in module.parameters() if requires_grad is None or p.requires_grad == requires_grad)
