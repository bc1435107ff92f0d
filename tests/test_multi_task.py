"""Several LoRAs trained in one run (finetune/multi_lora.py, lit_llama/multi_task.py): each task's LoRA equals
training it alone with finetune/lora.py on the same rows in the same order; the files are ordinary LoRA files;
resume, FSDP, the run folder and bad input work as in the other finetune scripts."""

import json
import math

import pytest
import torch
from conftest import (
    assert_clean_error,
    interrupt_at_iteration,
    load_script,
    make_checkpoint_dir,
    run_script,
    tiny_corpus,
)

from lit_llama.checkpoint import resolve_checkpoint
from lit_llama.cli import normalize_repeated_flag
from lit_llama.data import prepare_dataset
from lit_llama.lora import load_lora_model
from lit_llama.model import Config
from lit_llama.tokenizer import Tokenizer, train_from_texts

SCRIPT = "finetune/multi_lora.py"
FINAL = "lit-llama-lora-finetuned.pth"
# 2 optimizer steps of 4 rows per task (2 accumulation micro-batches of 2 per task; 8 and 4 rows in all), a save
# after the first (for --resume)
STEPS = 2
TOGETHER = dict(precision="32-true", batch_size=8, micro_batch_size=4, max_iters=2 * STEPS, warmup_iters=1,
                eval_iters=2, eval_interval=0, save_interval=1, lora_dropout=0.0, seed=7)
ALONE = {**TOGETHER, "batch_size": 4, "micro_batch_size": 2}
TASKS = {  # task: (records, per-task flags) -- different ranks, targets and learning rates
    "add": (lambda i: {"instruction": f"Add {i % 7} and {i // 7}.", "input": "", "output": str(i % 7 + i // 7)},
            dict(lora_r=4, learning_rate=3e-3)),
    "mul": (lambda i: {"instruction": f"Multiply {i % 5} by {i // 5}, please.", "input": "",
                       "output": f"The product is {(i % 5) * (i // 5)}."},
            dict(lora_r=2, lora_alpha=8, lora_key=True, lora_mlp=True, learning_rate=1e-3)),
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A tiny base and two tasks' data prepared with its tokenizer (the second of 30 examples, the first 40)."""
    root = tmp_path_factory.mktemp("multi_task")
    checkpoint_dir = make_checkpoint_dir(root / "checkpoint")
    tokenizer = Tokenizer(checkpoint_dir / "tokenizer.model")
    data_dirs = {}
    for (name, (record, _)), n in zip(TASKS.items(), (40, 30)):
        data_dirs[name] = root / name
        prepare_dataset([record(i) for i in range(n)], tokenizer, data_dirs[name], test_split_size=4, seed=42,
                        max_example_tokens=128)
    return checkpoint_dir, data_dirs


def together_flags(checkpoint_dir, data_dirs, out_dir, **extra):
    return dict(checkpoint_dir=checkpoint_dir, out_dir=out_dir, task=[f"{n}={d}" for n, d in data_dirs.items()],
                task_lora_r=["add=4", "mul=2"], task_lora_alpha=["mul=8"],
                task_lora_targets=["mul=query,value,key,mlp"],
                task_learning_rate=["add=3e-3", "mul=1e-3"], **{**TOGETHER, **extra})


@pytest.fixture(scope="module")
def together(tasks, tmp_path_factory):
    """The out_dir of an uninterrupted one-process run of both tasks."""
    out_dir = tmp_path_factory.mktemp("together") / "out"
    load_script(SCRIPT).setup(**together_flags(*tasks, out_dir))
    return out_dir


def command_line(flags):
    args = [f"--{k}={v}" for k, v in flags.items() if not isinstance(v, list)]
    return args + [item for k, v in flags.items() if isinstance(v, list) for x in v for item in (f"--{k}", x)]


def lora_tensors(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_each_task_trains_as_it_would_alone(tasks, together, tmp_path):
    """The correctness test of issue 19 point 3, with the batches fixed by the seed: 4 micro-batches of 4 rows
    (2 per task, interleaved) against finetune/lora.py on each task alone with micro-batches of 2. Also: the
    files load in generate/lora.py's loader, and the run writes run.json and summary.json."""
    checkpoint_dir, data_dirs = tasks
    lora = load_script("finetune/lora.py")
    for name, (_, flags) in TASKS.items():
        lora.setup(checkpoint_dir=checkpoint_dir, data_dir=data_dirs[name], out_dir=tmp_path / name,
                   **{**ALONE, **flags})
        alone, mixed = lora_tensors(tmp_path / name / FINAL), lora_tensors(together / name / FINAL)
        assert alone.keys() == mixed.keys()
        worst = 0.0
        for key in alone:
            # Both runs compute the same sums in other orders (the stacked update B_full @ A vs block by block;
            # the mixed batch padded to its longest row): float32 rounding, 2^-24 relative per operation, grows
            # over a few hundred operations per value and is divided by AdamW's sqrt(v) (the step is lr * m /
            # sqrt(v), about lr per weight whatever the gradient's size, so a relative error of the gradient is
            # that error of lr). So: within 1e-4 of the learning rate per step, against updates of about lr.
            lr = flags["learning_rate"]
            torch.testing.assert_close(mixed[key], alone[key], rtol=0, atol=1e-4 * STEPS * lr)
            worst = max(worst, float((mixed[key] - alone[key]).abs().max()) / lr)
        assert all(alone[k].abs().max() > 0 for k in alone if k.endswith("lora_B"))  # trained: B moved from zero
        print(f"{name}: largest difference together - alone {worst:.1e} x its learning rate")
        checkpoint = torch.load(together / name / FINAL, weights_only=True)
        reference = torch.load(tmp_path / name / FINAL, weights_only=True)
        assert checkpoint["lora_config"] == reference["lora_config"]
        assert checkpoint["prompt_style"] == reference["prompt_style"]
        load_lora_model(resolve_checkpoint(checkpoint_dir), together / name / FINAL, torch.device("cpu"),
                        torch.float32)
    run = json.loads((together / "run.json").read_text())
    assert run["method"] == "multi_lora" and list(run["tasks"]) == ["add", "mul"]
    assert run["tasks"]["mul"]["lora"]["r"] == 2 and run["tasks"]["add"]["learning_rate"] == 3e-3
    assert math.isfinite(json.loads((together / "summary.json").read_text())["val_loss"])


def test_resume_ends_where_the_uninterrupted_run_ends(tasks, together, tmp_path, monkeypatch):
    """Interrupted after its first saved step and resumed, the run ends with the same files; then a new run in
    that folder is refused (it holds checkpoints)."""
    script = load_script(SCRIPT)
    flags = together_flags(*tasks, tmp_path / "resumed")
    interrupt_at_iteration(monkeypatch, 3, script.setup, **flags)
    assert (tmp_path / "resumed" / "add" / "iter-000002-ckpt.pth").is_file()
    script.setup(**flags, resume=True)
    for name in TASKS:
        whole, resumed = lora_tensors(together / name / FINAL), lora_tensors(tmp_path / "resumed" / name / FINAL)
        for key in whole:
            assert torch.equal(whole[key], resumed[key]), key
    assert_clean_error(run_script(SCRIPT, *command_line(flags), check=False), "already holds checkpoints")


def test_bad_input(tasks, tmp_path):
    """One error: line each, naming the flag (or the task) and what was expected."""
    checkpoint_dir, data_dirs = tasks
    base = ["--checkpoint_dir", checkpoint_dir, "--out_dir", tmp_path / "out", "--max_iters", 2]
    add, mul = f"add={data_dirs['add']}", f"mul={data_dirs['mul']}"
    cases = [
        ([], "--task: name at least one task"),
        (["--task", "add"], "expected NAME=DATA_DIR"),
        (["--task", add, "--task", f"add={data_dirs['mul']}"], "given twice"),
        (["--task", "a.b=x"], "a task name is letters"),
        (["--task", add, "--task_lora_r", "sub=4"], "no task 'sub'"),
        (["--task", add, "--task_lora_r", "add=four"], "expected a whole number"),
        (["--task", add, "--task_lora_targets", "add=query,head"], "expected a comma-separated list"),
        (["--task", add, "--task_learning_rate", "add=2"], "--task_learning_rate add=2"),
        (["--task", add, "--lora_dora", "true"], None),  # not a flag of this script: jsonargparse's error
        (["--task", add, "--task", mul, "--micro_batch_size", 3, "--batch_size", 6], "multiple of the number of tasks"),
    ]
    for args, fragment in cases:
        proc = run_script(SCRIPT, *base, *args, check=False)
        assert_clean_error(proc, *([fragment] if fragment else []))
    # the repeated flags joined into one JSON list, also when joined already (Lightning starts the other
    # devices' processes with the command line the first one was given, after __main__ joined them)
    once = normalize_repeated_flag(["--task", add, "--max_iters", "2", "--task", mul], "--task")
    assert once == ["--max_iters", "2", "--task", json.dumps([add, mul])]
    assert normalize_repeated_flag(once, "--task") == once

    # a task whose data was prepared with another tokenizer (one trained on other sentences)
    train_from_texts(tiny_corpus(seed=5), tmp_path / "other", vocab_size=Config.from_name("tiny").vocab_size)
    prepare_dataset([TASKS["add"][0](i) for i in range(10)], Tokenizer(tmp_path / "other" / "tokenizer.model"),
                    tmp_path / "foreign", test_split_size=2, seed=42, max_example_tokens=128)
    proc = run_script(SCRIPT, *base, "--task", add, "--task", f"tools={tmp_path / 'foreign'}", check=False)
    assert_clean_error(proc, "--task tools:", "another tokenizer")


@pytest.mark.slow  # two processes, each importing torch and Lightning
def test_two_fsdp_processes_train_like_one(tasks, together, tmp_path):
    """FSDP2 over 2 CPU processes (gloo), as tests/test_fsdp.py runs it: 2 micro-batches per process against 4 in
    one process (rank r of iteration i takes the rows of iteration 2i + r), the same complete LoRA files."""
    from test_fsdp import TWO_PROCESS_ENV, WEIGHT_ATOL

    two = {**together_flags(*tasks, tmp_path / "two"), "max_iters": STEPS, "devices": 2, "strategy": "fsdp"}
    run_script(SCRIPT, *command_line(two), isolated=True, env=TWO_PROCESS_ENV)
    for name in TASKS:
        expected, sharded = lora_tensors(together / name / FINAL), lora_tensors(tmp_path / "two" / name / FINAL)
        assert sharded.keys() == expected.keys()
        for key, tensor in expected.items():
            torch.testing.assert_close(sharded[key], tensor, atol=WEIGHT_ATOL, rtol=0)


def test_loss_is_the_sum_of_the_tasks_means(tiny_checkpoint_dir):
    """compute_loss with tasks, plain and in chunks of the output layer (2 chunks here), against each task's rows
    as a batch of their own; and the gradient each task's rows give is that task's alone."""
    from lit_llama.checkpoint import load_model
    from lit_llama.data import IGNORE_INDEX
    from lit_llama.training import compute_loss

    model = load_model(resolve_checkpoint(tiny_checkpoint_dir), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (4, 90), generator=g)
    labels = input_ids.clone()
    labels[:, :30] = IGNORE_INDEX  # a prompt
    labels[1, 60:] = IGNORE_INDEX  # rows of other lengths: tasks of other token counts
    tasks = torch.tensor([0, 1, 0, 2])
    expected = sum(compute_loss(model, input_ids[tasks == t], labels[tasks == t]) for t in range(3))
    for chunked in (False, True):
        torch.testing.assert_close(compute_loss(model, input_ids, labels, chunked, tasks), expected)
