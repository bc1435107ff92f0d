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
    load_weights,
    resolve_checkpoint,
    save_checkpoint_dir,
    save_sharded_weights,
    save_weights,
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
    weights = load_weights(paths.weights)
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
    state = torch.load(folder / WEIGHTS_NAME)["state_dict"]
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:, :-1].clone()
    torch.save(state, folder / WEIGHTS_NAME)
    with pytest.raises(UserError, match="transformer.wte.weight.*shape"):
        load_model(resolve_checkpoint(folder), CPU, FP32, LLaMA)


def test_the_weights_file_says_its_format_and_reads_back_exactly(tmp_path):
    weights = LLaMA.from_name("tiny").state_dict()
    save_weights(weights, tmp_path / WEIGHTS_NAME)
    raw = torch.load(tmp_path / WEIGHTS_NAME, weights_only=True)
    assert (raw["format"], raw["version"]) == ("lit-llama/weights", 1)
    read = load_weights(tmp_path / WEIGHTS_NAME)
    assert read.keys() == weights.keys() and all(torch.equal(read[n], weights[n]) for n in weights)


def test_an_unmarked_tensor_dict_is_read_as_before_the_marker(tmp_path):
    """Files written before the marker (and Lit-LLaMA's, which load_model then names by their keys)."""
    folder = make_checkpoint_dir(tmp_path / "base")
    marked = load_weights(folder / WEIGHTS_NAME)
    torch.save(dict(marked), tmp_path / "unmarked.pth")
    unmarked = load_weights(tmp_path / "unmarked.pth")
    assert all(torch.equal(unmarked[n], marked[n]) for n in marked)
    shutil.copy(folder / CONFIG_NAME, tmp_path)
    model = load_model(resolve_checkpoint(checkpoint_path=tmp_path / "unmarked.pth",
                                          tokenizer_path=folder / TOKENIZER_NAME), CPU, FP32)
    assert_same_weights(model, marked)


@pytest.mark.parametrize("checkpoint, message", [
    ({"format": "lit-llama/lora", "state_dict": {}}, "format 'lit-llama/lora' is not 'lit-llama/weights'"),
    ({"format": "lit-llama/weights", "version": 2, "state_dict": {}}, "version 2 is not 1"),
    ({"format": "lit-llama/weights", "version": 1, "state_dict": {"w": "text"}}, "state_dict must map names to tensors"),
    ({"lora_config": {"r": 8}, "state_dict": {}}, "is a LoRA or adapter file"),
    ({"w": torch.zeros(1), "note": "text"}, "is not a model's weights"),
])
def test_a_file_of_another_format_is_named(tmp_path, checkpoint, message):
    torch.save(checkpoint, tmp_path / "file.pth")
    with pytest.raises(UserError, match=message):
        load_weights(tmp_path / "file.pth")
