"""lit_llama/run_dir.py: a run's folder is its own (a lock, run.json), and a run resumes from it as if it had never
stopped: a kill at the worst moment, a resumed run's metrics, a full or read-only disk during a run."""

import csv
import gc
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import Interrupted, assert_clean_error, interrupt_at_iteration, load_script, run_script

import lit_llama.run_dir as run_dir
import lit_llama.training as training
from lit_llama.cli import UserError
from lit_llama.data import prepare_dataset
from lit_llama.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out

FINAL = "lit-llama-lora-finetuned.pth"


@pytest.fixture(scope="module")
def data_dir(tiny_checkpoint_dir, tmp_path_factory) -> Path:
    records = [{"instruction": f"Add {i % 5} and {i // 5}.", "input": "", "output": str(i % 5 + i // 5)}
               for i in range(24)]
    path = tmp_path_factory.mktemp("trust") / "data"
    prepare_dataset(records, Tokenizer(tiny_checkpoint_dir / "tokenizer.model"), path, 4, 42, 128)
    return path


@pytest.fixture
def lora_args(tiny_checkpoint_dir, data_dir):
    # 8 iterations of 2 examples = 4 optimizer steps of 4; a checkpoint after steps 1, 2 and 3
    return dict(checkpoint_dir=tiny_checkpoint_dir, data_dir=data_dir, precision="32-true", batch_size=4,
                micro_batch_size=2, max_iters=8, eval_interval=2, eval_iters=1, save_interval=1, warmup_iters=1,
                learning_rate=3e-3)


def metric_rows(out_dir: Path):
    """(iter, train_loss, val_loss) of every row of the run's one metrics file."""
    with open(out_dir / "metrics.csv", newline="") as f:
        return [(r["iter"], r["train_loss"], r["val_loss"]) for r in csv.DictReader(f)]


def test_kill_between_first_weights_file_and_first_resume_state(lora_args, tmp_path, monkeypatch, capsys):
    """The worst moment: the first checkpoint is written, its resume state is not. A new run refuses the folder
    (it holds a checkpoint) and says to --resume, which starts over and ends exactly where an unkilled run does."""
    finetune = load_script("finetune/lora.py")
    finetune.setup(out_dir=tmp_path / "straight", **lora_args)

    real_save = training.save_resume_state

    def killed(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(training, "save_resume_state", killed)
    with pytest.raises(Interrupted):
        finetune.setup(out_dir=tmp_path / "killed", **lora_args)
    monkeypatch.setattr(training, "save_resume_state", real_save)
    assert (tmp_path / "killed" / "iter-000002-ckpt.pth").is_file()
    assert not (tmp_path / "killed" / "resume.pth").exists()

    with pytest.raises(UserError, match="already holds checkpoints: pass --resume true"):
        finetune.setup(out_dir=tmp_path / "killed", **lora_args)
    capsys.readouterr()
    finetune.setup(out_dir=tmp_path / "killed", resume=True, **lora_args)
    assert "No resume state" in capsys.readouterr().out
    straight = torch.load(tmp_path / "straight" / FINAL)["state_dict"]
    resumed = torch.load(tmp_path / "killed" / FINAL)["state_dict"]
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert metric_rows(tmp_path / "killed") == metric_rows(tmp_path / "straight")


def test_resumed_run_has_every_metric_row_once_in_one_file(lora_args, tmp_path, monkeypatch):
    finetune = load_script("finetune/lora.py")
    finetune.setup(out_dir=tmp_path / "straight", **lora_args)

    # every row on disk at once, so that the rows logged after the last save are in the file when it stops
    monkeypatch.setattr(training.MetricsLog, "log", lambda self, row: (self.pending.append(row), self.flush()))
    interrupt_at_iteration(monkeypatch, 5, finetune.setup, out_dir=tmp_path / "resumed", **lora_args)
    logged = [row[0] for row in metric_rows(tmp_path / "resumed")]
    assert logged[-1] == "5"  # iteration 5 was logged after the save at iteration 4
    finetune.setup(out_dir=tmp_path / "resumed", resume=True, **lora_args)

    rows = metric_rows(tmp_path / "resumed")
    assert rows == metric_rows(tmp_path / "straight")
    assert [r[0] for r in rows] == ["0", *map(str, range(1, 9)), "8"]  # the last row: the final validation
    assert not (tmp_path / "resumed" / "logs").exists()


def test_resume_state_written_with_the_run_is_read(lora_args, tmp_path):
    """run.json names the method, model and LoRA settings; the lock file is released when a run ends."""
    finetune = load_script("finetune/lora.py")
    lora_args.update(max_iters=2, eval_interval=0, save_interval=0)
    finetune.setup(out_dir=tmp_path / "out", **lora_args)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["method"] == "lora" and run["lora"]["r"] == 8 and run["model"]["n_layer"] == 2
    assert not (tmp_path / "out" / "run.lock").exists()  # released and removed when the run ended
    finetune.setup(out_dir=tmp_path / "out", resume=True, **lora_args)


def test_finetune_on_a_full_disk_and_a_read_only_one(small_tmpfs, tiny_checkpoint_dir, data_dir):
    """Full finetuning of the tiny model writes more than the 1 MB there is: one line saying so, no temporary
    file; then the same file system read-only: refused before any work."""
    args = ["--checkpoint_dir", tiny_checkpoint_dir, "--data_dir", data_dir, "--out_dir", small_tmpfs / "out",
            "--precision", "32-true", "--batch_size", 2, "--micro_batch_size", 2, "--max_iters", 2,
            "--eval_interval", 0, "--eval_iters", 1, "--save_interval", 1]
    proc = run_script("finetune/full.py", *args, check=False)
    assert_clean_error(proc, "could not write", "the disk is full")
    assert not [p for p in small_tmpfs.rglob("*") if ".tmp" in p.name]

    gc.collect()  # the failed write's file object, still open until collected, would keep the remount busy
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    proc = run_script("finetune/full.py", *args[:4], "--out_dir", small_tmpfs / "other", *args[6:], check=False)
    assert_clean_error(proc, "--out_dir", "is on a read-only file system")


def test_resume_checks_the_batch_settings_a_run_json_has(tmp_path):
    """run.json records the settings that decide each step's examples; one written before they were recorded
    (no "batches") still resumes, one that has them refuses others."""
    run_info = {"method": "lora", "batches": {"seed": 1, "micro_batch_size": 2}}
    (tmp_path / run_dir.RUN_NAME).write_text(json.dumps({"method": "lora"}))
    run_dir.check_run_dir(tmp_path, resume=True, run_info=run_info)
    (tmp_path / run_dir.RUN_NAME).write_text(json.dumps({"method": "lora", "batches": {"seed": 1, "micro_batch_size": 4}}))
    with pytest.raises(UserError, match="batches micro_batch_size=4; this run has micro_batch_size=2"):
        run_dir.check_run_dir(tmp_path, resume=True, run_info=run_info)
