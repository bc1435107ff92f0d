"""Files are checked, not trusted; a run's folder is its own: the safety properties of issue 11 that need more
than one bad input each (test_bad_input.py has those): a kill at the worst moment, a resumed run's metrics, a
full or read-only disk, secrets on the command line, deprecated flag names, any model depth, the README's
install command."""

import csv
import errno
import gc
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, Interrupted, assert_clean_error, interrupt_at_iteration, load_script, run_script

import lit_llama.run_dir as run_dir
import lit_llama.training as training
from lit_llama.cli import check_out_dir, UserError, check_torch_version
from lit_llama.disk import save_atomic
from lit_llama.data import prepare_dataset
from lit_llama.finetune import resolve_max_seq_length
from lit_llama.model import Config
from lit_llama.tokenizer import Tokenizer

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


def test_torch_whose_load_can_run_code_is_refused():
    with pytest.raises(UserError, match=r"torch 2\.5\.1 is too old: .* >= 2\.6"):
        check_torch_version("2.5.1")
    check_torch_version("2.6.0+cpu")
    check_torch_version(torch.__version__)


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


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MB file system (root only: elsewhere the test is skipped)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


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


def test_access_token_is_never_printed():
    proc = run_script("scripts/download.py", "--access_token", "hf_TopSecret123", "--print_config", check=False)
    assert proc.returncode == 0
    assert "access_token" in proc.stdout and "hf_TopSecret123" not in proc.stdout + proc.stderr


def test_block_size_is_a_deprecated_name_of_max_seq_length(capsys):
    tiny = Config.from_name("tiny")  # a context of 256 tokens
    assert resolve_max_seq_length(None, None, tiny) == 256  # 512 by default, but no longer than that
    assert resolve_max_seq_length(128, None, tiny) == 128
    assert resolve_max_seq_length(None, 64, tiny) == 64
    assert "--block_size is deprecated: use --max_seq_length" in capsys.readouterr().err
    with pytest.raises(UserError, match="--max_seq_length 300 is longer than the model's context"):
        resolve_max_seq_length(300, None, tiny)


def test_training_config_is_built_with_keywords():
    with pytest.raises(TypeError):
        training.TrainingConfig(3e-4, 4, 2, 8, 1.0, 1, 0.0, 64, 1, 1, 1)  # the positional form is gone


def test_adapter_on_a_two_layer_model_with_default_settings(tiny_checkpoint_dir, data_dir, tmp_path):
    """The article's start layer 2 does not exist in a 2-layer model: the default adapts its last layer."""
    finetune = load_script("finetune/adapter.py")
    finetune.setup(checkpoint_dir=tiny_checkpoint_dir, data_dir=data_dir, out_dir=tmp_path / "out",
                   precision="32-true", batch_size=2, micro_batch_size=2, max_iters=2, eval_interval=0, eval_iters=1,
                   save_interval=0)
    saved = torch.load(tmp_path / "out" / "lit-llama-adapter-finetuned.pth")
    assert saved["adapter_config"]["adapter_start_layer"] == 1


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


def test_readme_install_command_installs_what_the_tests_need():
    """The README's commands on a fresh machine: the CPU-only torch install as a command of its own, then the
    install, whose extras hold pytest and hypothesis (and every library the tests import lazily), then the
    tests; .ci/run runs each of them."""
    import ast
    import re

    readme = (REPO_ROOT / "README.md").read_text()
    cpu_block, block = [b.split("```", 1)[0] for b in readme.split("```bash")[1:3]]
    assert cpu_block.strip() == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    install = next(line for line in block.splitlines() if line.startswith("pip install -e"))
    extras = re.search(r'"\.\[([\w,]+)\]"', install).group(1).split(",")
    assert block.index("pip install -e") < block.index("pytest tests")
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    # as written, but for .ci/run's optional constraints file between `pip install` and `-e`
    for command in (cpu_block.strip(), install.split("#")[0].strip().replace("pip install ", ""), "pytest tests"):
        assert command in ci, command
    assert "python3 -m venv" in ci  # a fresh environment, not the machine's

    setup = ast.parse((REPO_ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords
                if k.arg in ("install_requires", "extras_require")}
    installed = {re.split(r"[<>=\[]", r)[0] for r in keywords["install_requires"]}
    installed |= {re.split(r"[<>=\[]", r)[0] for extra in extras for r in keywords["extras_require"][extra]}
    needed = {"pytest", "hypothesis", "transformers", "peft", "safetensors", "matplotlib", "pyyaml", "huggingface_hub",
              "torch", "lightning", "sentencepiece", "jsonargparse"}
    assert needed <= installed, needed - installed


def test_resume_checks_the_batch_settings_a_run_json_has(tmp_path):
    """run.json records the settings that decide each step's examples; one written before they were recorded
    (no "batches") still resumes, one that has them refuses others."""
    run_info = {"method": "lora", "batches": {"seed": 1, "micro_batch_size": 2}}
    (tmp_path / run_dir.RUN_NAME).write_text(json.dumps({"method": "lora"}))
    run_dir.check_run_dir(tmp_path, resume=True, run_info=run_info)
    (tmp_path / run_dir.RUN_NAME).write_text(json.dumps({"method": "lora", "batches": {"seed": 1, "micro_batch_size": 4}}))
    with pytest.raises(UserError, match="batches micro_batch_size=4; this run has micro_batch_size=2"):
        run_dir.check_run_dir(tmp_path, resume=True, run_info=run_info)
