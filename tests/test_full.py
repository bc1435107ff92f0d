"""finetune/full.py and generate/full.py end to end on CPU, with a tiny model: one process, resuming, and bad
input. Several processes (FSDP and DDP) are in test_fsdp.py."""

import warnings

import pytest
import torch
from conftest import assert_clean_error, interrupt_at_iteration, load_script, make_arithmetic_run, run_script

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out

FINAL = "lit-llama-full-finetuned.pth"
# 6 iterations of 2 examples = 3 optimizer steps of 4; validation and a checkpoint after step 2
SETTINGS = dict(precision="32-true", batch_size=4, micro_batch_size=2, max_iters=6, eval_interval=2, eval_iters=1,
                save_interval=2, warmup_iters=1)


def flags(**settings):
    return [item for key, value in settings.items() for item in (f"--{key}", value)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base checkpoint and 40 instructions prepared with its tokenizer (36 train, 4 test)."""
    return make_arithmetic_run(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """The out_dir of one uninterrupted single-process run."""
    checkpoint_dir, data_dir = base
    out_dir = tmp_path_factory.mktemp("full") / "out"
    run_script("finetune/full.py", "--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir, "--out_dir", out_dir,
               *flags(**SETTINGS))
    return out_dir


def test_every_weight_trains_and_the_checkpoint_generates(base, trained):
    checkpoint_dir, _ = base
    before = torch.load(checkpoint_dir / "lit-llama.pth")["state_dict"]
    after = torch.load(trained / FINAL)
    assert after["format"] == "lit-llama/weights"  # the format of a base checkpoint
    after = after["state_dict"]
    assert after.keys() == before.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged
    assert {"iter-000004-ckpt.pth", "resume.pth", "lit_config.json", "tokenizer.model"} <= {
        p.name for p in trained.iterdir()}

    # the checkpoint alone is enough: config and tokenizer are beside it (the default --checkpoint_dir is absent)
    proc = run_script("generate/full.py", "--checkpoint_path", trained / FINAL, "--prompt", "Add 3 and 4.",
                      "--temperature", 0, "--max_new_tokens", 8)
    assert proc.stdout.strip() and "tokens/s" in proc.stderr

    # an FSDP --state_dict_type sharded checkpoint is a torch.distributed.checkpoint folder with the weights
    # under "model" (FSDP needs GPUs, so the folder is written here directly); generate/full.py reads it
    import torch.distributed.checkpoint as dcp

    sharded = trained / "sharded-ckpt.pth"
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save({"model": after}, checkpoint_id=sharded)
    generate = load_script("generate/full.py")
    paths = generate.resolve_finetuned(sharded, None, None)
    model = generate.load_sharded(paths, torch.device("cpu"), torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, after[name]), name


def test_resume_equals_uninterrupted(base, trained, tmp_path, monkeypatch, capsys):
    checkpoint_dir, data_dir = base
    finetune = load_script("finetune/full.py")
    args = dict(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=tmp_path / "out", **SETTINGS)

    # the 5th iteration, after the save at step 2 (iteration 4)
    interrupt_at_iteration(monkeypatch, 4, finetune.setup, **args)
    assert not (tmp_path / "out" / FINAL).exists() and (tmp_path / "out" / "resume.pth").exists()
    capsys.readouterr()
    finetune.setup(resume=True, **args)
    assert "Resuming from iteration 4 (step 2)" in capsys.readouterr().out  # not from the start

    resumed, uninterrupted = (torch.load(path)["state_dict"] for path in (tmp_path / "out" / FINAL, trained / FINAL))
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_bad_input(base, trained, tmp_path):
    checkpoint_dir, data_dir = base
    # a finetuned checkpoint with a weight missing
    state_dict = torch.load(trained / FINAL)["state_dict"]
    del state_dict["transformer.h.1.mlp.c_fc2.weight"]
    broken = tmp_path / "broken.pth"
    torch.save(state_dict, broken)
    proc = run_script("generate/full.py", "--checkpoint_path", broken, "--checkpoint_dir", checkpoint_dir,
                      check=False)
    assert_clean_error(proc, "broken.pth", "'transformer.h.1.mlp.c_fc2.weight'")

    common = ["--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir, "--out_dir", tmp_path / "out"]
    proc = run_script("finetune/full.py", *common, "--devices", 999, check=False)
    assert_clean_error(proc, "--devices 999")
    proc = run_script("finetune/full.py", *common, "--state_dict_type", "consolidated", check=False)
    assert_clean_error(proc, "--state_dict_type 'consolidated'")
    proc = run_script("finetune/full.py", *common, "--state_dict_type", "sharded", check=False)  # no FSDP
    assert_clean_error(proc, "--state_dict_type sharded needs FSDP")
    proc = run_script("finetune/full.py", *common, "--strategy", "deepspeed", check=False)
    assert_clean_error(proc, "--strategy 'deepspeed' is not one of auto, ddp, fsdp")
    proc = run_script("finetune/full.py", *common, "--cpu_offload", "true", check=False)
    assert_clean_error(proc, "--cpu_offload needs FSDP")
    proc = run_script("finetune/full.py", *common, "--strategy", "fsdp", "--precision", "16-mixed", check=False)
    assert_clean_error(proc, "--precision 16-mixed does not work with FSDP")
    assert not (tmp_path / "out").exists()
