"""Sharded training (FSDP2) with two CPU processes over gloo, for full finetuning, LoRA and the adapter.

For each method: two processes train like one (the same losses and final weights; with DDP too, for LoRA),
an FSDP run killed mid-way and resumed with --resume ends exactly where the uninterrupted one ends,
and the files an FSDP run writes are the complete files a one-device run writes, loaded by the same
generate and merge scripts. Together these run every strategy the finetune scripts offer.

Settings: one process takes 6 micro-batches of 2 (3 optimizer steps of 4 examples); two processes take 3
micro-batches of 2 each, the same examples in the same steps. LoRA dropout is 0 here: its random masks
come from each process's own generator, so with dropout the two runs would differ by design.
"""

import csv
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, assert_clean_error, load_script, make_arithmetic_run, run_script

from lit_llama.checkpoint import load_state_dict, load_weights

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out

ONE_PROCESS = dict(precision="32-true", batch_size=4, micro_batch_size=2, max_iters=6, eval_interval=2, eval_iters=2,
                   save_interval=2, warmup_iters=1)
TWO_PROCESSES = {**ONE_PROCESS, "max_iters": 3, "devices": 2}
METHODS = {  # script, final file, method flags
    "full": ("finetune/full.py", "lit-llama-full-finetuned.pth", {}),
    "lora": ("finetune/lora.py", "lit-llama-lora-finetuned.pth",
             {"lora_dropout": 0, "lora_key": True, "lora_mlp": True}),
    "adapter": ("finetune/adapter.py", "lit-llama-adapter-finetuned.pth",
                {"adapter_version": 2, "adapter_start_layer": 1}),
}
LOSS_RTOL = 1e-5  # relative difference allowed between one and two processes (float32: summation order)
WEIGHT_ATOL = 1e-5  # after 3 AdamW steps of up to the learning rate (adapter: 9e-3) each
# The CPU threads of each process set from its start, for the runs compared bit for bit (two devices under
# Lightning's launcher, two nodes under torchrun). Without OMP_NUM_THREADS Lightning's launcher calls
# torch.set_num_threads(cores // 2) in the process the user started, once torch is running, while torchrun's
# processes keep every core; since torch 2.14 the two give other last bits (1e-7 in every weight).
TWO_PROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def flags(**settings):
    return [item for key, value in settings.items() for item in (f"--{key}", value)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base checkpoint and 40 instructions prepared with its tokenizer (36 train, 4 test)."""
    return make_arithmetic_run(tmp_path_factory.mktemp("fsdp"))


def common_args(base, method, out_dir):
    checkpoint_dir, data_dir = base
    return dict(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, **METHODS[method][2])


@pytest.fixture(scope="module")
def one_process(base, tmp_path_factory):
    """Per method, the out_dir of an uninterrupted one-process run (in this process: no strategy)."""
    runs = {}
    for method, (script, _, _) in METHODS.items():
        out_dir = tmp_path_factory.mktemp(f"{method}-one") / "out"
        load_script(script).setup(**common_args(base, method, out_dir), **ONE_PROCESS)
        runs[method] = out_dir
    return runs


@pytest.fixture(scope="module")
def two_process_fsdp(base, tmp_path_factory):
    """Per method, the out_dir of an uninterrupted two-process FSDP run."""
    runs = {}
    for method, (script, _, _) in METHODS.items():
        out_dir = tmp_path_factory.mktemp(f"{method}-fsdp") / "out"
        run_script(script, *flags(**common_args(base, method, out_dir), **TWO_PROCESSES, strategy="fsdp"),
                   isolated=True, env=TWO_PROCESS_ENV)
        runs[method] = out_dir
    return runs


def metrics(out_dir):
    """Train loss per iteration and the validation losses, from the run's CSV (one file over resumed parts)."""
    with open(out_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = {int(row["iter"]): float(row["train_loss"]) for row in rows if row.get("train_loss")}
    val = [float(row["val_loss"]) for row in rows if row.get("val_loss")]
    return train, val


def tensors(path):
    """The weights of a full, LoRA or adapter checkpoint file (and the rest of the file, separately)."""
    checkpoint = load_state_dict(path)
    inner = checkpoint.get("state_dict", checkpoint)
    weights = {name: t for name, t in inner.items() if isinstance(t, torch.Tensor)}
    rest = {key: value for key, value in checkpoint.items() if key != "state_dict" and key not in weights}
    if "base_model" in rest:  # a LoRA file's fingerprint of its base: tensors, compared as lists
        rest["base_model"] = {**rest["base_model"],
                              "samples": {n: t.tolist() for n, t in rest["base_model"]["samples"].items()}}
    return weights, rest


def assert_same_training(one, two):
    """Two processes (iteration i of rank 0) against one (iteration 2i: the same micro-batch)."""
    (train_one, val_one), (train_two, val_two) = metrics(one), metrics(two)
    assert len(train_two) == 3 and len(val_two) == len(val_one) == 3
    pairs = [(loss, train_one[2 * i - 1]) for i, loss in train_two.items()] + list(zip(val_two, val_one))
    print(f"largest relative loss difference: {max(abs(a - b) / abs(b) for a, b in pairs):.2e}")
    for i, loss in train_two.items():
        assert math.isclose(loss, train_one[2 * i - 1], rel_tol=LOSS_RTOL), (i, loss, train_one[2 * i - 1])
    for a, b in zip(val_two, val_one):
        assert math.isclose(a, b, rel_tol=LOSS_RTOL), (val_two, val_one)


@pytest.mark.parametrize("method", METHODS)
def test_two_fsdp_processes_train_like_one(method, one_process, two_process_fsdp):
    one, two = one_process[method], two_process_fsdp[method]
    assert_same_training(one, two)
    final = METHODS[method][1]
    (weights_one, rest_one), (weights_two, rest_two) = tensors(one / final), tensors(two / final)
    # the same complete file a one-device run writes: every tensor, whole, float32, the same settings
    assert rest_two == rest_one
    assert weights_two.keys() == weights_one.keys()
    for name, tensor in weights_two.items():
        assert tensor.dtype == torch.float32 and tensor.shape == weights_one[name].shape, name
        torch.testing.assert_close(tensor, weights_one[name], atol=WEIGHT_ATOL, rtol=0)
    print(f"largest weight difference: {max((weights_two[n] - weights_one[n]).abs().max() for n in weights_two):.2e}")
    assert (two / "iter-000002-ckpt.pth").is_file() and (two / "resume.pth").is_file()


def test_two_ddp_processes_train_like_one(base, one_process, tmp_path):
    """DDP wraps the whole model whatever the method (its trainable weights are the method's only difference, and
    the FSDP tests run all three): LoRA stands for the three."""
    method = "lora"
    script, final, _ = METHODS[method]
    out_dir = tmp_path / "out"
    run_script(script, *flags(**common_args(base, method, out_dir), **TWO_PROCESSES, strategy="ddp"), isolated=True,
               env=TWO_PROCESS_ENV)
    assert_same_training(one_process[method], out_dir)
    weights_one, _ = tensors(one_process[method] / final)
    for name, tensor in tensors(out_dir / final)[0].items():
        torch.testing.assert_close(tensor, weights_one[name], atol=WEIGHT_ATOL, rtol=0)


def run_interrupted(script, args, at_iteration):
    env = {**TWO_PROCESS_ENV, "INTERRUPT_SCRIPT": script, "INTERRUPT_AT": str(at_iteration)}
    cmd = [sys.executable, str(REPO_ROOT / "tests" / "interrupted_run.py"), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "interrupted at iteration" in proc.stderr, proc.stdout + proc.stderr


# each resumed run also turns on one more option, which must not change the result either (LoRA's resume is
# tested with packed batches, where the interrupted and resumed run has cpu_offload on, and in bf16 with dropout)
RESUME_OPTIONS = {
    # resume state and checkpoints as per-rank shard folders; the loss through the sharded output layer in chunks
    "full": {"state_dict_type": "sharded", "chunked_ce": True},
    "adapter": {"activation_checkpointing": True},
}


@pytest.mark.parametrize("method", RESUME_OPTIONS)
def test_interrupted_fsdp_run_resumes_where_it_stopped(method, base, two_process_fsdp, tmp_path):
    script, final, _ = METHODS[method]
    out_dir = tmp_path / "out"
    args = flags(**common_args(base, method, out_dir), **TWO_PROCESSES, strategy="fsdp", **RESUME_OPTIONS[method])
    run_interrupted(script, args, at_iteration=2)  # after the checkpoint of step 2, before step 3
    assert not (out_dir / final).exists() and (out_dir / "resume.pth").exists()

    proc = run_script(script, *args, "--resume", "true", isolated=True, env=TWO_PROCESS_ENV)
    assert "Resuming from iteration 2 (step 2)" in proc.stdout
    uninterrupted = two_process_fsdp[method]
    assert metrics(out_dir)[1][-1] == metrics(uninterrupted)[1][-1]  # the final validation loss
    if method == "full":  # sharded: the final weights are a folder, read as generate/full.py reads it
        assert (out_dir / "resume.pth").is_dir() and (out_dir / final).is_dir()
        generate = load_script("generate/full.py")
        model = generate.load_sharded(generate.resolve_finetuned(out_dir / final, None, None), torch.device("cpu"),
                                      torch.float32)
        resumed = model.state_dict()
    else:
        resumed = tensors(out_dir / final)[0]
    expected = tensors(uninterrupted / final)[0]
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name


def test_torchrun_two_nodes_train_like_two_devices(base, two_process_fsdp, tmp_path):
    """A multi-node launch as howto/multi_gpu.md gives it: torchrun on each of 2 "nodes" (here both on this
    machine), one process each, --num_nodes 2. The same mesh as 2 devices on one node: the same weights."""
    script, final, _ = METHODS["full"]
    out_dir = tmp_path / "out"
    args = flags(**common_args(base, "full", out_dir), **{**TWO_PROCESSES, "devices": 1}, num_nodes=2,
                 strategy="fsdp")
    port = 29500 + os.getpid() % 1000
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             str(REPO_ROOT / script), *map(str, args)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=TWO_PROCESS_ENV,
        )
        for node in (0, 1)
    ]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(outputs)
    expected = tensors(two_process_fsdp["full"] / final)[0]
    for name, tensor in tensors(out_dir / final)[0].items():
        assert torch.equal(tensor, expected[name]), name


def test_files_written_under_fsdp_load_in_generate_and_merge(base, two_process_fsdp, tmp_path, capsys):
    checkpoint_dir, _ = base
    lora_file = two_process_fsdp["lora"] / METHODS["lora"][1]
    adapter_file = two_process_fsdp["adapter"] / METHODS["adapter"][1]
    common = dict(checkpoint_dir=checkpoint_dir, prompt="Add 3 and 4.", temperature=0, max_new_tokens=5,
                  precision="32-true")
    load_script("generate/lora.py").main(lora_path=lora_file, **common)
    load_script("generate/lora.py").main(lora_path=lora_file, merge=False, **common)
    load_script("generate/adapter.py").main(adapter_path=adapter_file, **common)
    merged_dir = tmp_path / "merged"
    load_script("scripts/merge_lora.py").main(lora_path=lora_file, checkpoint_dir=checkpoint_dir,
                                              out_dir=merged_dir)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) >= 3
    merged = load_weights(merged_dir / "lit-llama.pth")
    base_weights = load_weights(checkpoint_dir / "lit-llama.pth")
    assert not torch.equal(merged["transformer.h.0.attn.c_attn.weight"],
                           base_weights["transformer.h.0.attn.c_attn.weight"])


def test_lora_in_bf16_with_dropout_resumes_exactly(base, tmp_path):
    """The 24 GB recipe's dtypes under FSDP: the frozen base in bf16, the LoRA weights (and the file written)
    in float32. With dropout, a resumed run equals the uninterrupted one only if every rank's random
    generator is restored: the resume state holds one per rank."""
    script, final, _ = METHODS["lora"]
    runs = {}
    for name in ("uninterrupted", "resumed"):
        out_dir = tmp_path / name
        args = flags(**{**common_args(base, "lora", out_dir), "lora_dropout": 0.1},
                     **{**TWO_PROCESSES, "precision": "bf16-true"}, strategy="fsdp")
        if name == "resumed":
            run_interrupted(script, args, at_iteration=2)
            resume_state = torch.load(out_dir / "resume.pth", weights_only=True)
            assert resume_state["world_size"] == 2 and len(resume_state["rng"]) == 2
            assert all(rng["cpu"].dtype == torch.uint8 for rng in resume_state["rng"])
            args += ["--resume", "true"]
        run_script(script, *args, isolated=True, env=TWO_PROCESS_ENV)
        runs[name] = tensors(out_dir / final)[0]
    assert all(t.dtype == torch.float32 for t in runs["uninterrupted"].values())
    for name, tensor in runs["uninterrupted"].items():
        assert torch.equal(runs["resumed"][name], tensor), name


def test_full_disk_under_fsdp_ends_every_process_in_one_line(base, tmp_path):
    """Rank 0 finds the disk full while writing the resume state, as the other rank waits for it in a
    collective: the run ends, in one `error:` line and no traceback from any process (tests/full_disk_run.py
    fakes the full disk in every process Fabric starts)."""
    out_dir = tmp_path / "out"
    args = flags(**common_args(base, "full", out_dir), **{**TWO_PROCESSES, "max_iters": 1, "eval_interval": 0},
                 strategy="fsdp")
    env = {**os.environ, "FULL_DISK_SCRIPT": "finetune/full.py", "FULL_DISK_MATCH": "resume.pth"}
    cmd = [sys.executable, str(REPO_ROOT / "tests" / "full_disk_run.py"), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert_clean_error(proc, f"could not write {out_dir / 'resume.pth'}: the disk is full")
    assert not any(p.name.endswith(".tmp") for p in out_dir.iterdir())


def test_packed_fsdp_run_trains_like_one_process_and_resumes_exactly(base, tmp_path):
    """--packing under FSDP: each rank packs its own micro-batch, so two processes train as one does (iteration
    i of rank 0 is iteration 2i of one process), and a run with --cpu_offload (which must not change the
    result) interrupted after step 2 and resumed ends bit for bit where the uninterrupted one does."""
    script, final, _ = METHODS["lora"]
    one = tmp_path / "one"
    load_script(script).setup(**common_args(base, "lora", one), **ONE_PROCESS, packing=True)
    runs = {}
    for name in ("uninterrupted", "resumed"):
        runs[name] = tmp_path / name
        args = flags(**common_args(base, "lora", runs[name]), **TWO_PROCESSES, strategy="fsdp", packing=True)
        if name == "resumed":
            args += ["--cpu_offload", "true"]
            run_interrupted(script, args, at_iteration=2)
            args += ["--resume", "true"]
        run_script(script, *args, isolated=True, env=TWO_PROCESS_ENV)
    assert_same_training(one, runs["uninterrupted"])
    expected, resumed = tensors(runs["uninterrupted"] / final)[0], tensors(runs["resumed"] / final)[0]
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
