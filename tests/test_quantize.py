"""QLoRA: the frozen base in NF4 (lit_llama/quantize.py, torchao's NF4Tensor) under LoRA and the adapter, on CPU."""

import subprocess
import sys

import pytest
import torch
from conftest import assert_clean_error, interrupt_at_iteration, load_script, make_arithmetic_run, run_script

from lit_llama.lora import LoRAConfig, LoRALLaMA, base_fingerprint, lora_state_dict, mark_only_lora_as_trainable
from lit_llama.model import Config
from lit_llama.quantize import frozen_weight_bytes, quantize_frozen_linears
from lit_llama.checkpoint import load_model, load_state_dict, load_weights, resolve_checkpoint

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out

pytest.importorskip("torchao")
# torchao's NF4 tensor class: torchao.quantization.quantize_.workflows.nf4.nf4_tensor in 0.18 (not yet in 0.17), before
# torchao.dtypes.nf4tensor (lit_llama/quantize.py imports either)
NF4_MODULES = ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor")
# int8 weight-only quantization's weight class: Int8Tensor in torchao 0.18, AffineQuantizedTensor in 0.14
INT8_CLASSES = ("Int8Tensor", "AffineQuantizedTensor")
SETTINGS = dict(precision="32-true", batch_size=8, micro_batch_size=4, max_iters=24, eval_interval=3, eval_iters=2,
                save_interval=3, warmup_iters=1, learning_rate=1e-2)


def is_nf4(t: torch.Tensor) -> bool:
    return type(t).__module__ in NF4_MODULES and type(t).__name__ == "NF4Tensor"


def test_nf4_model_computes_with_its_dequantized_weights():
    """The NF4 model's logits are exactly those of the model whose frozen weights are the dequantized NF4
    ones: the only difference from the full-precision model is the quantization error of the weights."""
    torch.manual_seed(0)
    config = Config.from_name("tiny")
    model = LoRALLaMA(config, LoRAConfig(mlp=True, dropout=0.0)).eval()
    mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for layer in model.lora_layers():
            layer.lora_B.normal_(std=0.1)
    full_precision = LoRALLaMA(config, LoRAConfig(mlp=True, dropout=0.0)).eval()
    full_precision.load_state_dict(model.state_dict())
    quantize_frozen_linears(model, torch.device("cpu"))

    quantized = [name for name, p in model.named_parameters() if is_nf4(p)]
    assert len(quantized) == config.n_layer * 5  # c_attn, c_proj, c_fc1, c_fc2, mlp c_proj
    assert all(p.dtype == torch.float32 and p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert 0.5 < frozen_weight_bytes(model) < 0.56  # 4-bit codes and their scales

    dequantized = LoRALLaMA(config, LoRAConfig(mlp=True, dropout=0.0)).eval()
    dequantized.load_state_dict({n: p.get_original_weight() if is_nf4(p) else p.detach()
                                 for n, p in model.named_parameters()})
    x = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        logits, reference, exact = model(x), dequantized(x), full_precision(x)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    error = (logits - exact).abs().max() / exact.abs().max()
    assert 0 < error < 0.2, error

    # gradients reach the LoRA weights through the quantized base
    model.train()
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base checkpoint and 48 instructions prepared with its tokenizer (40 train, 8 test)."""
    return make_arithmetic_run(tmp_path_factory.mktemp("qlora"), records=48, test_split_size=8)


def summary(out_dir):
    import csv

    with open(out_dir / "metrics.csv") as f:
        return [float(row["val_loss"]) for row in csv.DictReader(f) if row["val_loss"]]


@pytest.mark.parametrize("script", ["finetune/lora.py", "finetune/adapter.py"])
def test_qlora_run_trains_and_its_file_is_the_usual_one(script, base, tmp_path, capsys):
    checkpoint_dir, data_dir = base
    out_dir = tmp_path / "out"
    extra = {"adapter_start_layer": 1, "learning_rate": 0.1} if "adapter" in script else {}
    load_script(script).setup(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, quantize="nf4",
                              **{**SETTINGS, **extra})
    assert "bytes per weight" in capsys.readouterr().out
    val_losses = summary(out_dir)
    assert val_losses[-1] < val_losses[0] - 0.1, val_losses  # learning happened through the NF4 base

    final = next(out_dir.glob("lit-llama-*-finetuned.pth"))
    checkpoint = load_state_dict(final)
    tensors = checkpoint.get("state_dict", checkpoint)
    assert all(t.dtype == torch.float32 for t in tensors.values() if isinstance(t, torch.Tensor))
    if "lora" in script:  # the same file as a full-precision run writes: it merges into the full-precision base
        paths = resolve_checkpoint(checkpoint_dir)
        template = load_model(paths, torch.device("cpu"), torch.float32, LoRALLaMA, lora=LoRAConfig())
        assert set(checkpoint) == set(lora_state_dict(template, base_model=base_fingerprint(paths.weights)))
        assert set(tensors) == set(lora_state_dict(template)["state_dict"])
        merged_dir = tmp_path / "merged"
        load_script("scripts/merge_lora.py").main(lora_path=final, checkpoint_dir=checkpoint_dir,
                                                  output_dir=merged_dir)
        merged, original = load_weights(merged_dir / "lit-llama.pth"), load_weights(paths.weights)
        assert merged["transformer.h.0.attn.c_attn.weight"].dtype == original["transformer.h.0.attn.c_attn.weight"].dtype
        assert not torch.equal(merged["transformer.h.0.attn.c_attn.weight"],
                               original["transformer.h.0.attn.c_attn.weight"])


def test_qlora_resume_equals_uninterrupted(base, tmp_path, monkeypatch):
    checkpoint_dir, data_dir = base
    finetune = load_script("finetune/lora.py")
    runs = {}
    for name in ("uninterrupted", "resumed"):
        args = dict(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=tmp_path / name, quantize="nf4",
                    **{**SETTINGS, "max_iters": 12})
        if name == "resumed":
            interrupt_at_iteration(monkeypatch, 7, finetune.setup, **args)
            args["resume"] = True
        finetune.setup(**args)
        runs[name] = load_state_dict(tmp_path / name / "lit-llama-lora-finetuned.pth")["state_dict"]
    for key, tensor in runs["uninterrupted"].items():
        assert torch.equal(runs["resumed"][key], tensor), key


def test_qlora_under_fsdp_trains_like_one_device_and_resumes(base, tmp_path):
    """The NF4 base sharded over two CPU processes (FSDP2, gloo) against one process without FSDP, the same
    global batch (as tests/test_fsdp.py does for the unquantized base): each rank's rows of a weight are exact
    slices of the one-device NF4 tensor and the all-gather rebuilds it, so the dequantized weights are the same
    bits and the losses differ only by float32 summation order (test_fsdp's 1e-5). The two-process run is
    interrupted after step 2 and resumed (one run less than comparing it with an uninterrupted one too; resuming
    bit for bit under FSDP is test_fsdp's): its metrics and final LoRA weights must still match one process."""
    from test_fsdp import ONE_PROCESS, TWO_PROCESS_ENV, TWO_PROCESSES, WEIGHT_ATOL, assert_same_training, flags, \
        run_interrupted

    checkpoint_dir, data_dir = base
    common = dict(checkpoint_dir=checkpoint_dir, data_dir=data_dir, quantize="nf4", lora_dropout=0, lora_mlp=True)
    final = "lit-llama-lora-finetuned.pth"
    load_script("finetune/lora.py").setup(**common, out_dir=tmp_path / "one", **ONE_PROCESS)
    args = flags(**common, out_dir=tmp_path / "two", **TWO_PROCESSES, strategy="fsdp")
    run_interrupted("finetune/lora.py", args, at_iteration=2)
    proc = run_script("finetune/lora.py", *args, "--resume", "true", isolated=True, env=TWO_PROCESS_ENV)
    assert "Frozen block weights in NF4" in proc.stdout and "Resuming from iteration 2" in proc.stdout
    assert_same_training(tmp_path / "one", tmp_path / "two")
    one, two = (load_state_dict(tmp_path / run / final)["state_dict"] for run in ("one", "two"))
    assert two.keys() == one.keys() and len(two) == 2 * 4 * 2  # A and B of the fused q/v and 3 MLP layers, 2 blocks
    for name, tensor in two.items():
        torch.testing.assert_close(tensor, one[name], atol=WEIGHT_ATOL, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["--quantize", "nf3"], "--quantize 'nf3' is not one of nf4"),
    (["--quantize", "nf4", "--strategy", "ddp"], "--quantize nf4 does not work with --strategy ddp"),
    (["--quantize", "nf4", "--strategy", "fsdp", "--cpu_offload", "true"], "--quantize nf4 does not work with --cpu_offload"),
    (["--quantize", "nf4", "--num_nodes", "3"], "cannot be sharded in NF4 over 3 processes"),
])
def test_quantize_bad_input(args, message, base, tmp_path, capsys, monkeypatch):
    checkpoint_dir, data_dir = base
    argv = ["--checkpoint_dir", str(checkpoint_dir), "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "o"),
            *args]
    module = load_script("finetune/lora.py")
    monkeypatch.setattr(sys, "argv", ["finetune/lora.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.finetune_cli(module.lora, module.LoRAFinetune.flag_defaults)
    out, err = capsys.readouterr()
    assert_clean_error(subprocess.CompletedProcess(argv, exit_info.value.code, out, err), message)
    assert not (tmp_path / "o").exists()


def test_int8_generation_keeps_the_logits_close(tiny_checkpoint_dir):
    """Weight-only int8 (one scale per output row): every linear layer quantized, logits within a few percent."""
    from lit_llama.quantize import quantize_for_generation

    paths = resolve_checkpoint(tiny_checkpoint_dir)
    model = load_model(paths, torch.device("cpu"), torch.float32).eval()
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        reference = model(x)
        quantize_for_generation(model, "int8")
        quantized = model(x)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight).__name__ in INT8_CLASSES for m in linears)
    error = (quantized - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05, error


@pytest.mark.parametrize("script, extra", [
    ("generate.py", []),
    ("generate/lora.py", ["--lora_path", "LORA"]),
    ("generate/adapter.py", ["--adapter_path", "ADAPTER"]),
])
def test_generate_scripts_run_int8(script, extra, base, tmp_path):
    """Each generate script with --quantize int8 (a LoRA merged first), on the files a QLoRA-free run writes."""
    from conftest import run_script

    checkpoint_dir, data_dir = base
    finetuned = {}
    for name, finetune in (("LORA", "finetune/lora.py"), ("ADAPTER", "finetune/adapter.py")):
        if name in extra:
            out_dir = tmp_path / name
            settings = {**SETTINGS, "max_iters": 4, **({"adapter_start_layer": 1} if "adapter" in finetune else {})}
            load_script(finetune).setup(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, **settings)
            finetuned[name] = str(next(out_dir.glob("lit-llama-*-finetuned.pth")))
    args = [finetuned.get(a, a) for a in extra]
    proc = run_script(script, "--checkpoint_dir", checkpoint_dir, *args, "--quantize", "int8", "--max_new_tokens", 5,
                      "--temperature", 0)
    assert "tokens/s" in proc.stderr  # it generated and reported its speed


@pytest.mark.parametrize("args, message", [
    (["--quantize", "nf4"], "--quantize 'nf4' is not one of int8, int4"),
    (["--quantize", "int8", "--merge", "false"], "--quantize needs --merge true"),
] + ([(["--quantize", "int4"], "--quantize int4 needs a CUDA GPU")] if not torch.cuda.is_available() else []))
def test_generate_quantize_bad_input(args, message, base, capsys, monkeypatch):
    checkpoint_dir, _ = base
    argv = ["--checkpoint_dir", str(checkpoint_dir), "--lora_path", str(checkpoint_dir / "lit-llama.pth"), *args]
    module = load_script("generate/lora.py")
    monkeypatch.setattr(sys, "argv", ["generate/lora.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.run_cli(module.main)
    out, err = capsys.readouterr()
    assert_clean_error(subprocess.CompletedProcess(argv, exit_info.value.code, out, err), message)
