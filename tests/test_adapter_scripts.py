"""finetune/adapter.py, generate/adapter.py and generate_adapter.py end to end on CPU, on a tiny model
(2 layers: the adapter goes in layer 1) and a small arithmetic instruction set."""

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, interrupt_at_iteration, load_script, make_checkpoint_dir, run_script

from lit_llama.adapter import AdapterLLaMA, adapter_state_dict
from lit_llama.data import prepare_dataset
from lit_llama.model import Config
from lit_llama.tokenizer import Tokenizer
from lit_llama.cli import UserError

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out

FINAL_NAME = "lit-llama-adapter-finetuned.pth"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_checkpoint_dir) -> Path:
    records = [{"instruction": f"Add {i % 11} and {i // 11}.", "input": "", "output": f"{i % 11 + i // 11}"}
               for i in range(120)]
    path = tmp_path_factory.mktemp("adapter") / "data"
    tokenizer = Tokenizer(tiny_checkpoint_dir / "tokenizer.model")
    prepare_dataset(records, tokenizer, path, test_split_size=12, seed=42, max_example_tokens=128)
    return path  # 108 training examples


def read_metrics(out_dir: Path):
    with open(out_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def val_losses(out_dir: Path):
    return [float(r["val_loss"]) for r in read_metrics(out_dir) if r["val_loss"]]


def assert_adapter_only(path: Path, version: int) -> None:
    """The file holds the adapter's settings and trainable tensors, nothing of the frozen base model."""
    checkpoint = torch.load(path)
    assert checkpoint.pop("adapter_config")["adapter_version"] == version
    names = set(checkpoint)
    adapter_names = {n for n in names if "adapter_" in n}
    assert {"transformer.h.1.attn.adapter_wte.weight", "transformer.h.1.attn.adapter_gating_factor"} <= names
    assert not any(n.startswith("transformer.h.0.attn.adapter_") for n in names)  # below the start layer
    if version == 1:
        assert names == adapter_names
    else:  # plus the RMSNorm weights it trains
        assert names - adapter_names == {"transformer.ln_f.weight"} | {
            f"transformer.h.{i}.rms_{j}.weight" for i in (0, 1) for j in (1, 2)}
        assert any(n.endswith("mlp.c_fc1.adapter_scale") for n in names)


COMMON = ["--precision", "32-true", "--batch_size", 8, "--micro_batch_size", 4, "--eval_iters", 2,
          "--adapter_start_layer", 1]


def test_v1_end_to_end(tiny_checkpoint_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    # lr 0.1: one adapted layer of a random 2-layer model learns slowly at the article's 9e-3
    run_script("finetune/adapter.py", "--checkpoint_dir", tiny_checkpoint_dir, "--data_dir", data_dir,
               "--out_dir", out, "--max_iters", 24, "--eval_interval", 3, "--save_interval", 3,
               "--learning_rate", 0.1, "--warmup_iters", 1, *COMMON)
    final = out / FINAL_NAME
    assert (out / "iter-000006-ckpt.pth").is_file() and final.is_file()
    assert_adapter_only(final, version=1)
    assert {"iter", "train_loss", "val_loss", "lr", "tokens_per_sec", "peak_memory"} <= set(read_metrics(out)[0])
    losses = val_losses(out)
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.1, losses  # learning happened

    common = ["--adapter_path", final, "--prompt", "Add 3 and 4.", "--temperature", 0, "--max_new_tokens", 12]
    script = run_script("generate/adapter.py", "--checkpoint_dir", tiny_checkpoint_dir, *common)
    article_form = run_script("generate_adapter.py", "--pretrained_path", tiny_checkpoint_dir / "lit-llama.pth",
                              *common)
    assert script.stdout.strip() and "tokens/s" in script.stderr
    assert article_form.stdout == script.stdout


def test_v2_defaults(tiny_checkpoint_dir, data_dir, tmp_path, monkeypatch, capsys):
    """v2 in-process: its default --out_dir, the default warmup (2 epochs, clamped to the run), and the
    generate scripts read what it wrote."""
    monkeypatch.chdir(tmp_path)
    finetune = load_script("finetune/adapter.py")
    finetune.setup(checkpoint_dir=tiny_checkpoint_dir, data_dir=data_dir, precision="32-true", batch_size=8,
                   micro_batch_size=4, max_iters=16, eval_interval=0, eval_iters=2, save_interval=0,
                   learning_rate=3e-2, adapter_start_layer=1, adapter_version=2)
    out = tmp_path / "out" / "adapter_v2" / "alpaca"
    assert_adapter_only(out / FINAL_NAME, version=2)
    losses = val_losses(out)
    assert losses[-1] < losses[0] - 0.1, losses
    # 2 epochs of 108 examples in batches of 8 = 27 warmup steps, clamped to the run's 8: the learning
    # rate rises linearly to its peak at the last step
    lrs = [float(r["lr"]) for r in read_metrics(out) if r["lr"]]
    assert lrs[0] == pytest.approx(3e-2 / 8) and lrs[-1] == pytest.approx(3e-2)

    args = dict(adapter_path=out / FINAL_NAME, checkpoint_dir=tiny_checkpoint_dir, prompt="Add 3 and 4.",
                temperature=0, max_new_tokens=12)
    capsys.readouterr()
    load_script("generate/adapter.py").main(**args)
    in_process = capsys.readouterr().out
    article_form = run_script("generate_adapter.py", *[f"--{k}={v}" for k, v in args.items()])
    assert in_process.strip() and article_form.stdout == in_process


def test_resume_equals_uninterrupted(tiny_checkpoint_dir, data_dir, tmp_path, monkeypatch):
    """v2: the resume state must hold the trainable RMSNorm weights too, not only the adapter_ tensors."""
    finetune = load_script("finetune/adapter.py")
    args = dict(checkpoint_dir=tiny_checkpoint_dir, data_dir=data_dir, precision="32-true", batch_size=8,
                micro_batch_size=4, max_iters=12, eval_interval=0, eval_iters=1, save_interval=2,
                learning_rate=3e-2, warmup_iters=2, adapter_start_layer=1, adapter_version=2)
    finetune.setup(out_dir=tmp_path / "straight", **args)

    # micro-iteration 6: between the saves at iterations 4 and 8
    interrupt_at_iteration(monkeypatch, 6, finetune.setup, out_dir=tmp_path / "resumed", **args)
    assert not (tmp_path / "resumed" / FINAL_NAME).exists()
    finetune.setup(out_dir=tmp_path / "resumed", resume=True, **args)

    straight = torch.load(tmp_path / "straight" / FINAL_NAME)
    resumed = torch.load(tmp_path / "resumed" / FINAL_NAME)
    assert straight.keys() == resumed.keys() and any("rms_" in name for name in straight)
    for name in straight:
        if name != "adapter_config":
            torch.testing.assert_close(resumed[name], straight[name], atol=0, rtol=0)


def test_bad_adapter_settings(tiny_checkpoint_dir, data_dir, tmp_path):
    finetune = load_script("finetune/adapter.py")
    args = dict(checkpoint_dir=tiny_checkpoint_dir, data_dir=data_dir, out_dir=tmp_path / "o")
    with pytest.raises(UserError, match=r"^--adapter_start_layer must be in \[0, n_layer=2\), got 2$"):
        finetune.setup(**args, adapter_start_layer=2)  # tiny has only layers 0 and 1
    with pytest.raises(UserError, match=r"^--adapter_version must be 1 or 2, got 3$"):
        finetune.setup(**args, adapter_start_layer=1, adapter_version=3)
    with pytest.raises(UserError, match=r"^--adapter_prompt_length must be at least 1, got 0$"):
        finetune.setup(**args, adapter_start_layer=1, adapter_prompt_length=0)
    assert not (tmp_path / "o").exists()


def test_adapter_file_for_another_model(tiny_checkpoint_dir, tmp_path):
    def generate(adapter_path: Path):
        return run_script("generate/adapter.py", "--checkpoint_dir", tiny_checkpoint_dir, "--adapter_path",
                          adapter_path, "--max_new_tokens", 2, check=False)

    # trained on another base model size
    other = make_checkpoint_dir(tmp_path / "other", "tiny")
    cfg = json.loads((other / "lit_config.json").read_text())
    wider = AdapterLLaMA(Config(**{**cfg, "n_embd": 128}), adapter_start_layer=1)
    torch.save(adapter_state_dict(wider), tmp_path / "wider.pth")
    assert_clean_error(generate(tmp_path / "wider.pth"), "wider.pth", "n_embd=128 (base checkpoint: 64)")

    # settings that do not match its tensors: a v1 file relabelled as v2
    v1 = adapter_state_dict(AdapterLLaMA(Config(**cfg), adapter_start_layer=1))
    v1["adapter_config"]["adapter_version"] = 2
    torch.save(v1, tmp_path / "relabelled.pth")
    assert_clean_error(generate(tmp_path / "relabelled.pth"), "relabelled.pth does not fit this model: missing")

    # adapter weights without the settings (another version of Lit-LLaMA), and a base checkpoint
    legacy = {k: v for k, v in adapter_state_dict(AdapterLLaMA(Config(**cfg), adapter_start_layer=1)).items()
              if k != "adapter_config"}
    torch.save(legacy, tmp_path / "legacy.pth")
    assert_clean_error(generate(tmp_path / "legacy.pth"), "legacy.pth holds adapter weights but no adapter_config")
    assert_clean_error(generate(tiny_checkpoint_dir / "lit-llama.pth"), "not an adapter checkpoint")
