"""lit_llama/checkpoint.py: where a model's files are, reading them safely, and each of our formats read back
exactly as it was written (the checkpoint folder, and the sharded folder FSDP writes)."""

import shutil

import lightning as L
import pytest
import torch
from conftest import make_checkpoint_dir

from lit_llama.checkpoint import (
    CONFIG_NAME,
    TOKENIZER_NAME,
    WEIGHTS_NAME,
    tokenizer_beside,
    load_model,
    load_sharded,
    load_state_dict,
    resolve_checkpoint,
    save_checkpoint_dir,
    save_sharded_weights,
)
from lit_llama.cli import UserError
from lit_llama.model import LLaMA

CPU, FP32 = torch.device("cpu"), torch.float32


def assert_same_weights(model: torch.nn.Module, expected: dict) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_checkpoint_folder_round_trip(tmp_path):
    source = make_checkpoint_dir(tmp_path / "source")
    paths = resolve_checkpoint(source)
    weights = load_state_dict(paths.weights)
    save_checkpoint_dir(tmp_path / "copy", weights, paths.config, paths.tokenizer)
    assert {p.name for p in (tmp_path / "copy").iterdir()} == {WEIGHTS_NAME, CONFIG_NAME, TOKENIZER_NAME}
    copy = resolve_checkpoint(tmp_path / "copy")
    assert copy.config == paths.config
    assert_same_weights(load_model(copy, CPU, FP32), weights)


def test_tokenizer_beside_the_weights_or_one_folder_up(tmp_path):
    """Lit-LLaMA's and Meta's layout keep one tokenizer.model for all sizes, in the parent folder."""
    folder = make_checkpoint_dir(tmp_path / "lit-llama" / "tiny")
    assert tokenizer_beside(folder) == folder / TOKENIZER_NAME
    shutil.move(folder / TOKENIZER_NAME, tmp_path / "lit-llama" / TOKENIZER_NAME)
    assert tokenizer_beside(folder) == (tmp_path / "lit-llama" / TOKENIZER_NAME).resolve()
    assert resolve_checkpoint(folder).tokenizer == (tmp_path / "lit-llama" / TOKENIZER_NAME).resolve()
    (tmp_path / "lit-llama" / TOKENIZER_NAME).unlink()
    with pytest.raises(UserError, match="tokenizer"):
        resolve_checkpoint(folder)


def test_sharded_folder_is_read_back_as_written(tmp_path):
    """What `save_sharded_weights` writes (here from one process), `load_sharded` reads into the same weights, in
    the dtype asked for."""
    paths = resolve_checkpoint(make_checkpoint_dir(tmp_path / "base"))
    model = load_model(paths, CPU, FP32)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    save_sharded_weights(fabric, model, tmp_path / "sharded.pth")
    assert (tmp_path / "sharded.pth").is_dir() and not (tmp_path / "sharded.pth.tmp").exists()
    sharded = type(paths)(tmp_path / "sharded.pth", paths.config, paths.tokenizer)
    assert_same_weights(load_sharded(sharded, CPU, FP32), model.state_dict())
    half = load_sharded(sharded, CPU, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half.state_dict().values())


def test_a_checkpoint_of_another_shape_is_refused_before_it_loads(tmp_path):
    folder = make_checkpoint_dir(tmp_path / "base")
    state = torch.load(folder / WEIGHTS_NAME)
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:, :-1].clone()
    torch.save(state, folder / WEIGHTS_NAME)
    with pytest.raises(UserError, match="transformer.wte.weight.*shape"):
        load_model(resolve_checkpoint(folder), CPU, FP32, LLaMA)
