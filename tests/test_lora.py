import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, interrupt_at_iteration, load_script, make_checkpoint_dir, run_script

import lit_llama.training as training
from lit_llama.lora import (
    LoRAConfig,
    LoRALinear,
    LoRALLaMA,
    load_lora_state_dict,
    lora_state_dict,
    mark_only_lora_as_trainable,
)
from lit_llama.model import Config, LLaMA
from lit_llama.checkpoint import load_model, resolve_checkpoint
from lit_llama.cli import UserError

ALL_TARGETS = LoRAConfig(key=True, projection=True, mlp=True, head=True)


def lora_and_base(name: str, lora: LoRAConfig):
    torch.manual_seed(0)
    base = LLaMA.from_name(name).eval()
    model = LoRALLaMA(base.config, lora).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    return model, base


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
@pytest.mark.parametrize("lora", [LoRAConfig(), ALL_TARGETS], ids=["query-value", "all"])
def test_step_zero_equals_base(name, lora):
    model, base = lora_and_base(name, lora)
    x = torch.randint(0, base.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


def test_load_model_initialises_lora(tiny_checkpoint_dir):
    paths = resolve_checkpoint(tiny_checkpoint_dir)
    base = load_model(paths, torch.device("cpu"), torch.float32).eval()
    model = load_model(paths, torch.device("cpu"), torch.float32, LoRALLaMA, lora=ALL_TARGETS).eval()
    for layer in model.lora_layers():
        assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().sum() > 0
    x = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_only_lora_parameters_get_gradients(name):
    model, _ = lora_and_base(name, LoRAConfig())
    mark_only_lora_as_trainable(model)
    for layer in model.lora_layers():
        torch.nn.init.normal_(layer.lora_B)  # nonzero B so A receives gradient too
    model(torch.randint(0, 512, (2, 8))).sum().backward()
    for param_name, param in model.named_parameters():
        if "lora_" in param_name:
            assert param.grad is not None and param.grad.abs().sum() > 0, param_name
        else:
            assert not param.requires_grad and param.grad is None, param_name


def test_query_value_targets_only_touch_query_and_value_rows():
    model, _ = lora_and_base("tiny-gqa", LoRAConfig())
    layer = model.transformer.h[0].attn.c_attn
    torch.nn.init.normal_(layer.lora_B)
    delta = layer.delta_weight()
    cfg = model.config
    q, kv = cfg.n_head * cfg.head_size, cfg.n_query_groups * cfg.head_size
    assert delta.shape == layer.weight.shape
    assert delta[:q].abs().sum() > 0 and delta[q + kv :].abs().sum() > 0
    assert torch.all(delta[q : q + kv] == 0)  # keys are not adapted by default


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_merge_and_unmerge(name):
    model, base = lora_and_base(name, ALL_TARGETS)
    for layer in model.lora_layers():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        unmerged = model(x)
        model.merge_lora()
        merged = model(x)
        assert all(layer.merged for layer in model.lora_layers())
        model.unmerge_lora()
        again = model(x)
    assert not torch.equal(unmerged, base(x))
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)
    for name_, tensor in base.state_dict().items():  # the base weights are back, up to rounding
        torch.testing.assert_close(model.state_dict()[name_], tensor, atol=1e-6, rtol=0)


def test_lora_linear_equals_reference_formula():
    torch.manual_seed(0)
    layer = LoRALinear(16, 24, r=4, alpha=8, parts=[(8, True), (8, False), (8, True)])
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    A_q, A_v = layer.lora_A.split(4)
    B_q, B_v = layer.lora_B.split(8)
    expected = x @ layer.weight.T
    expected[:, :8] += 2.0 * x @ A_q.T @ B_q.T
    expected[:, 16:] += 2.0 * x @ A_v.T @ B_v.T
    torch.testing.assert_close(layer(x), expected)


def test_lora_checkpoint_holds_only_lora_tensors():
    model, _ = lora_and_base("tiny", LoRAConfig(r=4, alpha=32))
    checkpoint = lora_state_dict(model)
    assert checkpoint["lora_config"]["r"] == 4 and checkpoint["lora_config"]["alpha"] == 32
    assert all("lora_" in name for name in checkpoint["state_dict"])
    lora_numel = sum(t.numel() for t in checkpoint["state_dict"].values())
    assert lora_numel < 0.05 * sum(p.numel() for p in model.parameters())
    # a fresh model built from the file's config reproduces the tensors
    fresh = LoRALLaMA(model.config, LoRAConfig(**checkpoint["lora_config"]))
    load_lora_state_dict(fresh, checkpoint, Path("x.pth"))
    for name, tensor in checkpoint["state_dict"].items():
        assert torch.equal(fresh.state_dict()[name], tensor)


def test_lora_checkpoint_for_other_model_is_refused():
    model, _ = lora_and_base("tiny", LoRAConfig(r=4))
    checkpoint = lora_state_dict(model)
    other_rank = LoRALLaMA(model.config, LoRAConfig(r=8))
    with pytest.raises(UserError, match="shape"):
        load_lora_state_dict(other_rank, checkpoint, Path("x.pth"))
    bigger = LoRALLaMA(Config.from_name("tiny", n_embd=128), LoRAConfig(r=4))
    with pytest.raises(UserError, match="n_embd=64"):
        load_lora_state_dict(bigger, checkpoint, Path("x.pth"))


# --- the scripts, end to end on CPU ---------------------------------------------------------------


def arithmetic_records(n: int = 120):
    return [{"instruction": f"Add {i % 11} and {i // 11}.", "input": "", "output": f"{i % 11 + i // 11}"}
            for i in range(n)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_checkpoint_dir):
    root = tmp_path_factory.mktemp("lora")
    data_file = root / "records.json"
    data_file.write_text(json.dumps(arithmetic_records()))
    run_script("scripts/prepare_alpaca.py", "--checkpoint_dir", tiny_checkpoint_dir, "--data_file", data_file,
               "--out_dir", root / "data", "--test_split_size", 12, "--max_example_tokens", 128)
    return root


FAST = ["--precision", "32-true", "--batch_size", 8, "--micro_batch_size", 4, "--eval_iters", 2,
        "--learning_rate", 3e-3, "--warmup_iters", 2]


def read_metrics(out_dir: Path):
    with open(out_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_end_to_end(tiny_checkpoint_dir, prepared, tmp_path):
    out = tmp_path / "out"
    run_script("finetune/lora.py", "--checkpoint_dir", tiny_checkpoint_dir, "--data_dir", prepared / "data",
               "--out_dir", out, "--max_iters", 40, "--eval_interval", 5, "--save_interval", 5, *FAST)
    final = out / "lit-llama-lora-finetuned.pth"
    assert final.is_file() and (out / "iter-000010-ckpt.pth").is_file()
    assert final.stat().st_size < 0.1 * (tiny_checkpoint_dir / "lit-llama.pth").stat().st_size

    rows = read_metrics(out)
    assert {"iter", "train_loss", "val_loss", "lr", "tokens_per_sec", "peak_memory"} <= set(rows[0])
    val_losses = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert val_losses[-1] < val_losses[0] - 0.1, val_losses  # learning happened

    common = ["--checkpoint_dir", tiny_checkpoint_dir, "--lora_path", final, "--prompt", "Add 3 and 4.",
              "--temperature", 0, "--max_new_tokens", 12]
    merged = run_script("generate/lora.py", *common)
    unmerged = run_script("generate/lora.py", *common, "--merge", "false")
    assert merged.stdout == unmerged.stdout and "tokens/s" in merged.stderr
    article_form = run_script("generate_lora.py", "--pretrained_path", tiny_checkpoint_dir / "lit-llama.pth",
                              *common[2:])
    assert article_form.stdout == merged.stdout

    run_script("scripts/merge_lora.py", "--checkpoint_dir", tiny_checkpoint_dir, "--lora_path", final,
               "--out_dir", tmp_path / "merged")
    # the merged folder is an ordinary checkpoint: its weights equal base + LoRA delta
    paths = resolve_checkpoint(tmp_path / "merged")
    merged_model = load_model(paths, torch.device("cpu"), torch.float32).eval()
    lora_model = load_model(resolve_checkpoint(tiny_checkpoint_dir), torch.device("cpu"), torch.float32, LoRALLaMA,
                            lora=LoRAConfig(**torch.load(final)["lora_config"]))
    load_lora_state_dict(lora_model, torch.load(final), final)
    lora_model.eval()
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged_model(x), lora_model(x), atol=1e-5, rtol=1e-5)
    run_script("generate.py", "--checkpoint_dir", tmp_path / "merged", "--max_new_tokens", 4)

    # a second run into the same folder would overwrite it: refused
    proc = run_script("finetune/lora.py", "--checkpoint_dir", tiny_checkpoint_dir, "--data_dir", prepared / "data",
                      "--out_dir", out, "--max_iters", 4, *FAST, check=False)
    assert_clean_error(proc, "--out_dir")


def load_finetune_lora():
    return load_script("finetune/lora.py")


@pytest.mark.slow
def test_resume_equals_uninterrupted(tiny_checkpoint_dir, prepared, tmp_path, monkeypatch):
    finetune = load_finetune_lora()
    args = dict(checkpoint_dir=tiny_checkpoint_dir, data_dir=prepared / "data", precision="32-true",
                batch_size=8, micro_batch_size=4, max_iters=16, eval_interval=0, eval_iters=1, save_interval=2,
                learning_rate=3e-3, warmup_iters=2, lora_dropout=0.1)
    finetune.setup(out_dir=tmp_path / "straight", **args)

    # micro-iteration 10: between the saves at iterations 8 and 12
    interrupt_at_iteration(monkeypatch, 10, finetune.setup, out_dir=tmp_path / "resumed", **args)
    assert not (tmp_path / "resumed" / "lit-llama-lora-finetuned.pth").exists()
    finetune.setup(out_dir=tmp_path / "resumed", resume=True, **args)

    straight = torch.load(tmp_path / "straight" / "lit-llama-lora-finetuned.pth")["state_dict"]
    resumed = torch.load(tmp_path / "resumed" / "lit-llama-lora-finetuned.pth")["state_dict"]
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=0, rtol=0)


@pytest.mark.slow
def test_same_seed_same_losses(tiny_checkpoint_dir, prepared, tmp_path):
    finetune = load_finetune_lora()
    args = dict(checkpoint_dir=tiny_checkpoint_dir, data_dir=prepared / "data", precision="32-true",
                batch_size=8, micro_batch_size=4, max_iters=6, eval_interval=0, eval_iters=1, save_interval=0)
    finetune.setup(out_dir=tmp_path / "a", **args)
    finetune.setup(out_dir=tmp_path / "b", **args)
    losses = [[r["train_loss"] for r in read_metrics(tmp_path / run)] for run in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) > 1


def test_bad_input(tiny_checkpoint_dir, prepared, tmp_path):
    base = ["--checkpoint_dir", tiny_checkpoint_dir, "--data_dir", prepared / "data", "--out_dir", tmp_path / "o"]
    proc = run_script("finetune/lora.py", *base, "--micro_batch_size", 8, "--batch_size", 4, check=False)
    assert_clean_error(proc, "--micro_batch_size")
    proc = run_script("finetune/lora.py", *base[:2], "--data_dir", tmp_path / "nothing", "--out_dir", tmp_path / "o",
                      check=False)
    assert_clean_error(proc, "prepare_alpaca.py")

    # a LoRA file trained on another base model size
    other = make_checkpoint_dir(tmp_path / "other", "tiny")
    cfg = json.loads((other / "lit_config.json").read_text())
    cfg["n_embd"] = 128
    model = LoRALLaMA(Config(**cfg), LoRAConfig())
    torch.save(lora_state_dict(model), tmp_path / "other_lora.pth")
    proc = run_script("generate/lora.py", "--checkpoint_dir", tiny_checkpoint_dir, "--lora_path",
                      tmp_path / "other_lora.pth", check=False)
    assert_clean_error(proc, "other_lora.pth", "n_embd")
    # not a LoRA file at all
    proc = run_script("generate/lora.py", "--checkpoint_dir", tiny_checkpoint_dir, "--lora_path",
                      tiny_checkpoint_dir / "lit-llama.pth", check=False)
    assert_clean_error(proc, "not a LoRA checkpoint")


def test_loss_scores_only_response_positions():
    """compute_loss sends only the scored positions through the output layer; the loss equals plain
    cross-entropy over the full logits."""
    torch.manual_seed(0)
    model = LLaMA.from_name("tiny")
    input_ids = torch.randint(0, 512, (2, 10))
    labels = input_ids.clone()
    labels[0, :6] = training.IGNORE_INDEX  # a prompt of 6 tokens
    labels[1, 8:] = training.IGNORE_INDEX  # padding
    logits = model(input_ids)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(training.compute_loss(model, input_ids, labels), expected)


def test_flags_from_yaml_config(tiny_checkpoint_dir, prepared, tmp_path):
    """--config FILE.yaml takes every flag (here a bad combination, so that the run stops at the check)."""
    config = tmp_path / "lora.yaml"
    config.write_text(f"checkpoint_dir: {tiny_checkpoint_dir}\ndata_dir: {prepared / 'data'}\n"
                      f"out_dir: {tmp_path / 'o'}\nbatch_size: 4\nmicro_batch_size: 8\nlora_r: 4\n")
    proc = run_script("finetune/lora.py", "--config", config, check=False)
    assert_clean_error(proc, "--micro_batch_size 8", "--batch_size 4")


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_run(tiny_checkpoint_dir, prepared, tmp_path):
    finetune = load_finetune_lora()
    args = dict(checkpoint_dir=tiny_checkpoint_dir, data_dir=prepared / "data", precision="32-true", batch_size=8,
                micro_batch_size=4, max_iters=6, eval_interval=0, eval_iters=1, save_interval=0, lora_dropout=0.1)
    finetune.setup(out_dir=tmp_path / "stored", **args)
    finetune.setup(out_dir=tmp_path / "recomputed", activation_checkpointing=True, **args)
    stored = torch.load(tmp_path / "stored" / "lit-llama-lora-finetuned.pth")["state_dict"]
    recomputed = torch.load(tmp_path / "recomputed" / "lit-llama-lora-finetuned.pth")["state_dict"]
    for name in stored:  # same dropout masks too: checkpointing replays the RNG state
        torch.testing.assert_close(recomputed[name], stored[name], atol=1e-6, rtol=0)
