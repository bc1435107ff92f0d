"""What a new user's mistakes and an attacker's files get, script family by script family: for every case a
non-zero exit, exactly one `error:` line naming the culprit, no traceback, and every file the user had
unchanged. Files that would run code when unpickled must not (the marker file they would create stays absent).

The scripts run in-process (conftest's `run_script`: as `__main__`, without another Python start), so that a
case costs milliseconds.
"""

import fcntl
import hashlib
import json
import pathlib
import pickle
import shutil
import socket
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple

import pytest
import torch
from conftest import assert_clean_error, load_script, make_checkpoint_dir, run_script, tiny_corpus

from lit_llama.adapter import AdapterLLaMA, adapter_state_dict
from lit_llama.data import prepare_dataset
from lit_llama.lora import LoRAConfig, LoRALLaMA, lora_state_dict
from lit_llama.model import Config
from lit_llama.tokenizer import Tokenizer, train_from_texts

MARKER = "pwned"  # what an unpickled malicious file would create in the world folder


class Evil:
    """Unpickling this creates a file: stands for any code a crafted checkpoint could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


class World(NamedTuple):
    root: Path
    ckpt: Path  # the tiny base checkpoint folder
    data: Path  # data prepared with its tokenizer
    lora_run: Path  # a finished 4-iteration LoRA run (run.json, resume.pth, checkpoints, metrics.csv)

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def records(n: int = 24) -> List[Dict[str, str]]:
    return [{"instruction": f"Add {i % 5} and {i // 5}.", "input": "", "output": str(i % 5 + i // 5)} for i in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad_input")
    ckpt = make_checkpoint_dir(root / "ckpt")
    config = Config.from_json(ckpt / "lit_config.json")
    prepare_dataset(records(), Tokenizer(ckpt / "tokenizer.model"), root / "data", 4, 42, 128)

    # another tokenizer of the same vocabulary size, and data prepared with it
    train_from_texts(tiny_corpus(seed=1)[::-1], root / "other_tokenizer", vocab_size=config.vocab_size)
    prepare_dataset(records(), Tokenizer(root / "other_tokenizer" / "tokenizer.model"), root / "data_other_tok", 4,
                    42, 128)
    shutil.copytree(root / "data", root / "data_bitflip")
    flip_a_bit(root / "data_bitflip" / "train.pt")
    # a checkpoint of another shape (grouped-query attention) for --resume
    make_checkpoint_dir(root / "ckpt_gqa", "tiny-gqa")

    # broken copies of the base checkpoint: each differs from ckpt in one file
    def broken(name: str, file: str, write: Callable[[Path], None]) -> None:
        shutil.copytree(ckpt, root / name)
        write(root / name / file)

    state = torch.load(ckpt / "lit-llama.pth")["state_dict"]
    nan_state = {k: v.clone() for k, v in state.items()}
    nan_state["transformer.h.0.mlp.c_fc1.weight"][0, 0] = float("nan")
    broken("ckpt_nan", "lit-llama.pth", lambda p: torch.save(nan_state, p))
    broken("ckpt_truncated", "lit-llama.pth", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))
    broken("ckpt_evil", "lit-llama.pth", lambda p: torch.save(Evil(root / MARKER), p))
    broken("ckpt_bitflip", "lit-llama.pth", flip_a_bit)
    broken("ckpt_bad_tokenizer", "tokenizer.model", lambda p: p.write_bytes(b"\x00garbage" * 100))
    broken("ckpt_config_json", "lit_config.json", lambda p: p.write_text("{n_layer: 2"))
    for name, field, value in [("type", "n_layer", "2"), ("field", "n_layers", 2), ("float", "n_embd", 64.5)]:
        broken(f"ckpt_config_{name}", "lit_config.json",
               lambda p: p.write_text(json.dumps({**asdict(config), field: value})))

    # LoRA and adapter files
    lora_model = LoRALLaMA(config, lora=LoRAConfig())
    torch.save(lora_state_dict(lora_model), root / "lora.pth")
    lora_nan = lora_state_dict(lora_model)
    next(iter(lora_nan["state_dict"].values()))[0, 0] = float("inf")
    torch.save(lora_nan, root / "lora_inf.pth")
    torch.save(Evil(root / MARKER), root / "evil.pth")
    torch.save(adapter_state_dict(AdapterLLaMA(config, adapter_start_layer=1)), root / "adapter.pth")
    for folder, name in [("serve_loras", "lora.pth"), ("serve_evil", "evil.pth"), ("serve_inf", "lora_inf.pth")]:
        (root / folder).mkdir()  # serve.py's --lora_dir: LoRA files in a folder
        shutil.copy(root / name, root / folder / name)
    (root / "serve_dora").mkdir()
    torch.save(lora_state_dict(LoRALLaMA(config, lora=LoRAConfig(dora=True))), root / "serve_dora" / "dora.pth")

    # an FSDP sharded checkpoint folder whose metadata is a malicious pickle
    (root / "sharded_evil").mkdir()
    (root / "sharded_evil" / ".metadata").write_bytes(pickle.dumps(Evil(root / MARKER)))
    shutil.copy(ckpt / "lit_config.json", root / "sharded_evil" / "lit_config.json")
    shutil.copy(ckpt / "tokenizer.model", root / "sharded_evil" / "tokenizer.model")

    # data files for the prepare scripts
    (root / "good.json").write_text(json.dumps(records()))
    (root / "not_json.json").write_text("[{'instruction': 'single quotes'}]")
    (root / "not_list.json").write_text(json.dumps({"instruction": "a", "output": "b"}))
    (root / "missing_output.json").write_text(json.dumps([{"instruction": "a", "input": ""}]))
    (root / "number_output.json").write_text(json.dumps([{"instruction": "a", "input": "", "output": 3}]))
    (root / "empty_list.json").write_text("[]")
    (root / "latin1.json").write_bytes('[{"instruction": "caf\xe9", "output": "x"}]'.encode("latin-1"))
    (root / "empty_instruction.json").write_text(json.dumps([{"instruction": " ", "output": "b"}]))
    (root / "bad_line.jsonl").write_text('{"instruction": "a", "context": "", "response": "b"}\n{"instruction": \n')
    (root / "a_file").write_text("not a folder")
    (root / "tiny_data.json").write_text(json.dumps(records(3)))

    # a real LoRA run to resume: 4 iterations of 2 examples, a checkpoint after every optimizer step
    finetune = load_script("finetune/lora.py")
    finetune.setup(checkpoint_dir=ckpt, data_dir=root / "data", out_dir=root / "lora_run", precision="32-true",
                   batch_size=2, micro_batch_size=2, max_iters=4, eval_interval=0, eval_iters=1, save_interval=2,
                   warmup_iters=1)
    for name, change in [("lora_run_evil", lambda p: torch.save(Evil(root / MARKER), p)),
                         ("lora_run_bitflip", flip_a_bit),
                         ("lora_run_nan", lambda p: torch.save(nan_resume(p), p)),
                         ("lora_run_truncated", lambda p: p.write_bytes(p.read_bytes()[:1000]))]:
        shutil.copytree(root / "lora_run", root / name)
        change(root / name / "resume.pth")
    shutil.copytree(root / "lora_run", root / "lora_run_locked")
    return World(root, ckpt, root / "data", root / "lora_run")


def flip_a_bit(path: Path) -> None:
    """One flipped mantissa bit in the first tensor's bytes: a finite value, caught only by the checksum."""
    with zipfile.ZipFile(path) as archive:
        record = next(i for i in archive.infolist() if "/data/" in i.filename)
    data = bytearray(path.read_bytes())
    data[record.header_offset + 30 + len(record.filename) + len(record.extra) + 64] ^= 0x01
    path.write_bytes(bytes(data))


def nan_resume(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    next(iter(state["model"].values())).fill_(float("nan"))
    return state


def snapshot(root: Path) -> Dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def check_case(world: World, script: str, args: List, fragments: List[str]) -> None:
    before = snapshot(world.root)
    proc = run_script(script, *[a(world) if callable(a) else a for a in args], check=False)
    assert_clean_error(proc, *fragments)
    after = snapshot(world.root)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"{script} changed the user's files: {changed}"
    assert not [name for name in after if name not in before and "new_out" not in name], "files left behind"
    assert not (world.root / MARKER).exists(), "a file ran code when it was loaded"


class w:
    """A path in the world folder, resolved when the case runs."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, world: World) -> Path:
        return world / self.name

    def __repr__(self) -> str:
        return self.name


def case_id(case) -> str:
    """A test id, the same in every pytest-xdist worker (a function is named by its name, not its address)."""
    words = [getattr(flag, "__name__", repr(flag)) for flag in case[1][-4:]]
    return f"{case[0]}:{' '.join(words)}"[:70]


# --- finetune/lora.py, finetune/adapter.py, finetune/full.py ----------------------------------------------

BASE = ["--checkpoint_dir", w("ckpt"), "--data_dir", w("data"), "--precision", "32-true", "--max_iters", 4,
        "--batch_size", 2, "--micro_batch_size", 2, "--eval_iters", 1, "--warmup_iters", 1]  # lora_run's warmup
NEW = ["--out_dir", w("new_out")]  # a folder no case may leave behind a checkpoint in

FINETUNE_CASES = [
    # (script, extra flags, fragments the error line must name)
    ("lora", ["--micro_batch_size", 0], ["--micro_batch_size", "got 0"]),
    ("lora", ["--micro_batch_size", -1], ["--micro_batch_size"]),
    ("lora", ["--batch_size", 0], ["--batch_size"]),
    ("lora", ["--batch_size", 2, "--micro_batch_size", 4], ["--micro_batch_size 4 is larger than --batch_size 2"]),
    ("lora", ["--batch_size", 3], ["--batch_size 3 must be a multiple"]),
    ("lora", ["--max_seq_length", 0], ["--max_seq_length"]),
    ("lora", ["--max_seq_length", 100000], ["--max_seq_length 100000 is longer than the model's context"]),
    ("lora", ["--block_size", 1], ["--max_seq_length"]),  # the deprecated name
    ("lora", ["--eval_iters", 0], ["--eval_iters"]),
    ("lora", ["--eval_interval", -1], ["--eval_interval"]),
    ("lora", ["--save_interval", -5], ["--save_interval"]),
    ("lora", ["--log_interval", 0], ["--log_interval"]),
    ("lora", ["--warmup_iters", -1], ["--warmup_iters"]),
    ("lora", ["--learning_rate", 0], ["--learning_rate"]),
    ("lora", ["--learning_rate", -0.1], ["--learning_rate"]),
    ("lora", ["--learning_rate", 50], ["--learning_rate must be in (0, 1]"]),
    ("lora", ["--learning_rate", "nan"], ["learning_rate"]),  # refused by jsonargparse, in its words
    ("lora", ["--learning_rate", "inf"], ["learning_rate"]),
    ("lora", ["--learning_rate", "fast"], ["--learning_rate 'fast' is not a valid float"]),
    ("lora", ["--weight_decay", -1], ["--weight_decay"]),
    ("lora", ["--epochs", 0], ["--epochs"]),
    ("lora", ["--max_iters", 0], ["--max_iters"]),
    ("lora", ["--max_iters", 1, "--batch_size", 4], ["--max_iters 1 is fewer than one optimizer step"]),
    ("lora", ["--devices", 0], ["--devices"]),
    ("lora", ["--devices", 999], ["--devices 999"]),
    ("lora", ["--num_nodes", 0], ["--num_nodes"]),
    ("lora", ["--seed", -1], ["--seed"]),
    ("lora", ["--precision", "64-true"], ["--precision '64-true'"]),
    ("lora", ["--strategy", "deepspeed"], ["--strategy 'deepspeed'"]),
    ("lora", ["--cpu_offload", "true"], ["--cpu_offload needs FSDP"]),
    ("lora", ["--lora_r", 0], ["--lora_r"]),
    ("lora", ["--lora_alpha", 0], ["--lora_alpha"]),
    ("lora", ["--lora_dropout", 1.5], ["--lora_dropout"]),
    ("lora", ["--lora_query", "false", "--lora_value", "false"], ["--lora_query"]),
    ("lora", ["--unknown_flag", 1], ["unknown_flag"]),
    ("lora", ["--chunked_ce", "maybe"], ["--chunked_ce 'maybe'"]),
    ("adapter", ["--group_by_length", "sometimes"], ["--group_by_length 'sometimes'"]),
    ("full", ["--chunked_ce", "2"], ["--chunked_ce"]),
    ("adapter", ["--adapter_version", 3], ["--adapter_version"]),
    ("adapter", ["--adapter_prompt_length", 0], ["--adapter_prompt_length"]),
    ("adapter", ["--adapter_start_layer", 5], ["--adapter_start_layer", "n_layer=2"]),
    ("adapter", ["--adapter_start_layer", -1], ["--adapter_start_layer"]),
    ("full", ["--state_dict_type", "consolidated"], ["--state_dict_type 'consolidated'"]),
    ("full", ["--state_dict_type", "sharded"], ["--state_dict_type sharded needs FSDP"]),
    ("full", ["--strategy", "fsdp", "--precision", "16-mixed"], ["--precision 16-mixed does not work with FSDP"]),
    # folders and files
    ("lora", ["--out_dir", w("a_file")], ["--out_dir", "a_file is a file"]),
    ("lora", ["--out_dir", w("a_file/sub")], ["--out_dir", "is a file, not a folder"]),
    ("lora", ["--checkpoint_dir", w("missing")], ["--checkpoint_dir", "missing"]),
    ("lora", ["--checkpoint_dir", w("data")], ["has no lit-llama.pth"]),
    ("lora", ["--data_dir", w("missing")], ["data directory", "missing"]),
    ("lora", ["--data_dir", w("ckpt")], ["train.pt not found"]),
    ("full", ["--data_dir", w("data_other_tok")], ["data_other_tok was prepared with another tokenizer"]),
    ("adapter", ["--data_dir", w("data_bitflip")], ["data_bitflip/train.pt is corrupted", "checksum"]),
    ("lora", ["--checkpoint_dir", w("ckpt_bad_tokenizer")], ["tokenizer.model is not a SentencePiece tokenizer"]),
    ("lora", ["--checkpoint_dir", w("ckpt_config_type")], ["lit_config.json", "'n_layer'", "expected an integer"]),
    ("adapter", ["--checkpoint_dir", w("ckpt_config_json")], ["lit_config.json", "not valid JSON"]),
    ("full", ["--checkpoint_dir", w("ckpt_config_field")], ["lit_config.json", "unknown field 'n_layers'"]),
    ("lora", ["--checkpoint_dir", w("ckpt_config_float")], ["lit_config.json", "'n_embd'"]),
    ("full", ["--checkpoint_dir", w("ckpt_nan")], ["ckpt_nan/lit-llama.pth is corrupted", "NaN"]),
    ("lora", ["--checkpoint_dir", w("ckpt_truncated")], ["lit-llama.pth is not a readable PyTorch checkpoint"]),
    ("adapter", ["--checkpoint_dir", w("ckpt_evil")], ["ckpt_evil/lit-llama.pth is not a readable"]),
    # run folders: another run's, an interrupted one, a busy one, crafted resume states
    ("lora", ["--out_dir", w("lora_run")], ["already holds checkpoints", "--resume"]),
    ("lora", ["--out_dir", w("data"), "--resume", "true"], ["--resume", "holds no run to continue"]),
    ("lora", ["--out_dir", w("typo"), "--resume", "true"], ["--resume", "typo does not exist"]),
    ("adapter", ["--out_dir", w("lora_run"), "--resume", "true"], ["holds a run of finetune/lora.py"]),
    ("full", ["--out_dir", w("lora_run"), "--resume", "true"], ["holds a run of finetune/lora.py"]),
    ("lora", ["--out_dir", w("lora_run"), "--resume", "true", "--lora_r", 4], ["--resume", "lora r=8", "r=4"]),
    ("lora", ["--out_dir", w("lora_run"), "--resume", "true", "--seed", 7], ["--resume", "batches seed=", "seed=7"]),
    ("lora", ["--out_dir", w("lora_run"), "--resume", "true", "--group_by_length", "true"],
     ["--resume", "group_by_length=False", "group_by_length=True"]),
    ("lora", ["--out_dir", w("lora_run"), "--resume", "true", "--checkpoint_dir", w("ckpt_gqa")],
     ["--resume", "n_query_groups=4", "n_query_groups=2"]),
    ("lora", ["--out_dir", w("lora_run_evil"), "--resume", "true"], ["lora_run_evil/resume.pth is not a resume state"]),
    ("lora", ["--out_dir", w("lora_run_nan"), "--resume", "true"], ["lora_run_nan/resume.pth is corrupted"]),
    ("lora", ["--out_dir", w("lora_run_bitflip"), "--resume", "true"], ["resume.pth is corrupted", "checksum"]),
    ("full", ["--checkpoint_dir", w("ckpt_bitflip")], ["ckpt_bitflip/lit-llama.pth is corrupted", "checksum"]),
    ("lora", ["--out_dir", w("lora_run_truncated"), "--resume", "true"], ["resume.pth is not a resume state"]),
]


@pytest.mark.parametrize("script, flags, fragments", FINETUNE_CASES,
                         ids=[f"{c[0]}:{' '.join(map(str, c[1]))[:60]}" for c in FINETUNE_CASES])
def test_finetune(world, script, flags, fragments):
    out = [] if "--out_dir" in flags else NEW
    check_case(world, f"finetune/{script}.py", BASE + out + flags, fragments)
    assert not any((world / "new_out").glob("*.pth"))


def test_finetune_lock(world):
    """A second run on a folder that a running one holds stops at once, saying so."""
    with open(world / "lora_run_locked" / "run.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        check_case(world, "finetune/lora.py", BASE + ["--out_dir", w("lora_run_locked"), "--resume", "true"],
                   ["lora_run_locked is in use by another run"])


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


@pytest.mark.parametrize("variable", RANK_VARIABLES)
def test_finetune_rank_variables_of_no_launch(world, variable, monkeypatch):
    """A rank left in the environment of a plain one-process run (an interactive SLURM shell, a copied export)
    does not make the run skip the finished-run check or the lock: one process is the launching process."""
    monkeypatch.setenv(variable, "1")
    check_case(world, "finetune/lora.py", BASE + ["--out_dir", w("lora_run")], ["already holds checkpoints"])
    with open(world / "lora_run_locked" / "run.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        check_case(world, "finetune/lora.py", BASE + ["--out_dir", w("lora_run_locked"), "--resume", "true"],
                   ["lora_run_locked is in use by another run"])


# --- generate.py, generate/lora.py, generate/adapter.py, generate/full.py ---------------------------------

LORA = ["--checkpoint_dir", w("ckpt"), "--lora_path", w("lora.pth")]
ADAPTER = ["--checkpoint_dir", w("ckpt"), "--adapter_path", w("adapter.pth")]
GENERATE_CASES = [
    ("generate.py", ["--num_samples", 0], ["--num_samples"]),
    ("generate.py", ["--num_samples", -3], ["--num_samples"]),
    ("generate.py", ["--max_new_tokens", 0], ["--max_new_tokens"]),
    ("generate.py", ["--max_new_tokens", 100000], ["--max_new_tokens 100000 is more than the model's context"]),
    ("generate.py", ["--temperature", -1], ["--temperature"]),
    ("generate.py", ["--temperature", "nan"], ["temperature"]),
    ("generate.py", ["--temperature", 1000], ["--temperature"]),
    ("generate.py", ["--top_k", 0], ["--top_k"]),
    ("generate.py", ["--top_k", -5], ["--top_k"]),
    ("generate.py", ["--top_k", "many"], ["--top_k 'many' is not a valid int or null"]),
    ("generate.py", ["--seed", -1], ["--seed"]),
    ("generate.py", ["--prompt", "water " * 300], ["--prompt is", "the model's context is 256"]),
    ("generate.py", ["--precision", "int4"], ["--precision 'int4'"]),
    ("generate.py", ["--checkpoint_dir", w("missing")], ["--checkpoint_dir", "missing"]),
    ("generate.py", ["--checkpoint_path", w("missing.pth")], ["--checkpoint_path", "missing.pth"]),
    ("generate.py", ["--tokenizer_path", w("ckpt_bad_tokenizer/tokenizer.model")], ["is not a SentencePiece"]),
    ("generate.py", ["--checkpoint_dir", w("ckpt_nan")], ["lit-llama.pth is corrupted"]),
    ("generate.py", ["--checkpoint_dir", w("ckpt_bitflip")], ["lit-llama.pth is corrupted", "checksum"]),
    ("generate.py", ["--checkpoint_dir", w("ckpt_evil")], ["lit-llama.pth is not a readable PyTorch checkpoint"]),
    ("generate.py", ["--checkpoint_dir", w("ckpt_config_type")], ["'n_layer'"]),
    ("generate.py", ["--bogus", 1], ["bogus"]),
    ("generate/lora.py", LORA + ["--num_samples", 0], ["--num_samples"]),
    ("generate/lora.py", LORA + ["--temperature", -0.5], ["--temperature"]),
    ("generate/lora.py", ["--checkpoint_dir", w("ckpt"), "--lora_path", w("missing.pth")], ["missing.pth"]),
    ("generate/lora.py", ["--checkpoint_dir", w("ckpt"), "--lora_path", w("lora_inf.pth")],
     ["lora_inf.pth is corrupted"]),
    ("generate/lora.py", ["--checkpoint_dir", w("ckpt"), "--lora_path", w("evil.pth")], ["evil.pth is not a readable"]),
    ("generate/lora.py", ["--checkpoint_dir", w("ckpt"), "--lora_path", w("adapter.pth")], ["adapter.pth"]),
    ("generate/lora.py", ["--checkpoint_dir", w("ckpt"), "--lora_path", w("ckpt/lit-llama.pth")], ["lit-llama.pth"]),
    ("generate/lora.py", LORA + ["--prompt", "sleep " * 300], ["--prompt is"]),
    ("generate/adapter.py", ADAPTER + ["--top_k", 0], ["--top_k"]),
    ("generate/adapter.py", ADAPTER + ["--max_new_tokens", -1], ["--max_new_tokens"]),
    ("generate/adapter.py", ["--checkpoint_dir", w("ckpt"), "--adapter_path", w("lora.pth")], ["lora.pth"]),
    ("generate/adapter.py", ["--checkpoint_dir", w("ckpt"), "--adapter_path", w("evil.pth")], ["evil.pth"]),
    ("generate/full.py", ["--checkpoint_path", w("ckpt/lit-llama.pth"), "--seed", -2], ["--seed"]),
    ("generate/full.py", ["--checkpoint_path", w("missing.pth")], ["missing.pth"]),
    ("generate/full.py", ["--checkpoint_path", w("sharded_evil"), "--checkpoint_dir", w("ckpt")],
     ["sharded_evil is not a sharded checkpoint", "could run code"]),
    ("generate/full.py", ["--checkpoint_path", w("ckpt_evil/lit-llama.pth")], ["is not a readable"]),
]


@pytest.mark.parametrize("script, flags, fragments", GENERATE_CASES,
                         ids=[f"{c[0]}:{' '.join(map(str, c[1][-2:]))[:50]}" for c in GENERATE_CASES])
def test_generate(world, script, flags, fragments):
    if script == "generate.py" and "--checkpoint_dir" not in flags and "--checkpoint_path" not in flags:
        flags = ["--checkpoint_dir", w("ckpt")] + flags
    check_case(world, script, flags, fragments)


# --- scripts/prepare_alpaca.py, scripts/prepare_dolly.py -------------------------------------------------

PREPARE = ["--checkpoint_dir", w("ckpt"), "--out_dir", w("prepared")]
PREPARE_CASES = [
    ("alpaca", ["--data_file", w("missing.json")], ["--data_file", "missing.json"]),
    ("alpaca", ["--data_file", w("not_json.json")], ["not_json.json is not valid JSON"]),
    ("alpaca", ["--data_file", w("not_list.json")], ["not_list.json"]),
    ("alpaca", ["--data_file", w("missing_output.json")], ["record 0", "has no answer field 'output' or 'response'", "--response_key"]),
    ("alpaca", ["--data_file", w("number_output.json")], ["record 0", "'output' is a number"]),
    ("alpaca", ["--data_file", w("empty_list.json")], ["empty_list.json holds no records"]),
    ("alpaca", ["--data_file", w("latin1.json")], ["latin1.json is not UTF-8"]),
    ("alpaca", ["--data_file", w("empty_instruction.json")], ["'instruction' is empty"]),
    ("alpaca", ["--data_file", w("good.json"), "--max_example_tokens", 0], ["--max_example_tokens"]),
    ("alpaca", ["--data_file", w("good.json"), "--max_example_tokens", 1], ["--max_example_tokens"]),
    ("alpaca", ["--data_file", w("good.json"), "--max_example_tokens", 10], ["--max_example_tokens 10"]),
    ("alpaca", ["--data_file", w("good.json"), "--test_split_size", 0], ["--test_split_size"]),
    ("alpaca", ["--data_file", w("good.json"), "--test_split_size", 500], ["--test_split_size 500"]),
    ("alpaca", ["--data_file", w("good.json"), "--seed", -1], ["--seed"]),
    ("alpaca", ["--data_file", w("good.json"), "--out_dir", w("a_file")], ["--out_dir", "is a file"]),
    ("alpaca", ["--data_file", w("good.json"), "--tokenizer_path", w("ckpt_bad_tokenizer/tokenizer.model")],
     ["is not a SentencePiece tokenizer"]),
    ("alpaca", ["--data_file", w("good.json"), "--checkpoint_dir", w("missing")], ["--checkpoint_dir", "missing"]),
    ("alpaca", ["--data_file", w("good.json"), "--tokenizer_path", w("missing.model")], ["missing.model"]),
    ("dolly", ["--data_file", w("bad_line.jsonl")], ["bad_line.jsonl", "record 1 (line 2) is not valid JSON"]),
    ("dolly", ["--data_file", w("good.json")], ["'response' is missing"]),
    ("alpaca", ["--data_file", w("tiny_data.json"), "--test_split_size", 3], ["--test_split_size 3"]),
    ("dolly", ["--data_file", w("good.json"), "--out_dir", w("a_file/x")],
     ["--out_dir", "not a folder"]),
]


@pytest.mark.parametrize("script, flags, fragments", PREPARE_CASES,
                         ids=[f"{c[0]}:{' '.join(map(str, c[1][-2:]))[:50]}" for c in PREPARE_CASES])
def test_prepare(world, script, flags, fragments):
    check_case(world, f"scripts/prepare_{script}.py", PREPARE + flags, fragments)
    assert not (world / "prepared").exists()


# --- scripts/convert_hf_checkpoint.py, convert_meta_checkpoint.py, export_hf.py, merge_lora.py ----


@pytest.fixture(scope="module")
def hf_dirs(world) -> Path:
    """Hugging Face style folders, each wrong in one way."""
    base = world / "hf"
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 176}
    for name in ("no_config", "gpt2", "bad_json", "no_weights", "evil_bin", "garbage_safetensors", "str_size",
                 "negative_layers"):
        (base / name).mkdir(parents=True)
        shutil.copy(world.ckpt / "tokenizer.model", base / name / "tokenizer.model")
        (base / name / "config.json").write_text(json.dumps(config))
    (base / "no_config" / "config.json").unlink()
    (base / "gpt2" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": []}))
    (base / "bad_json" / "config.json").write_text("{")
    (base / "str_size" / "config.json").write_text(json.dumps({**config, "hidden_size": "64"}))
    (base / "negative_layers" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": -2}))
    torch.save(Evil(world / MARKER), base / "evil_bin" / "pytorch_model.bin")
    (base / "garbage_safetensors" / "model.safetensors").write_bytes(b"\xff" * 64)
    (world / "meta" / "no_params").mkdir(parents=True)
    (world / "meta" / "evil").mkdir(parents=True)
    (world / "meta" / "evil" / "params.json").write_text(json.dumps(
        {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 512, "norm_eps": 1e-5, "multiple_of": 16}))
    shutil.copy(world.ckpt / "tokenizer.model", world / "meta" / "evil" / "tokenizer.model")
    torch.save(Evil(world / MARKER), world / "meta" / "evil" / "consolidated.00.pth")
    (world / "meta" / "bad_params").mkdir(parents=True)
    (world / "meta" / "bad_params" / "params.json").write_text('{"dim": "sixty-four"}')
    return base


def h(name: str) -> w:
    return w(f"hf/{name}")


CONVERT_CASES = [
    ("convert_hf_checkpoint", ["--checkpoint_dir", w("missing")], ["--checkpoint_dir", "missing"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", h("no_config")], ["config.json"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", h("gpt2")], ["not a LLaMA-architecture model"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", h("bad_json")], ["config.json"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", h("no_weights")], ["has no weights"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", h("str_size")], ["config.json", "'hidden_size' is '64'"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", h("negative_layers")], ["'num_hidden_layers' is -2"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", h("evil_bin")], ["pytorch_model.bin is not a readable"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", h("garbage_safetensors")], ["model.safetensors"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", h("no_weights"), "--dtype", "float8"], ["--dtype 'float8'"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", h("no_weights"), "--out_dir", w("a_file")], ["--out_dir", "a file"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", h("no_weights"), "--out_dir", w("ckpt")],
     ["lit-llama.pth already exists", "--overwrite"]),
    ("convert_meta_checkpoint", ["--checkpoint_dir", w("meta/no_params")], ["params.json"]),
    ("convert_meta_checkpoint", ["--checkpoint_dir", w("meta/bad_params")], ["params.json"]),
    ("convert_meta_checkpoint", ["--checkpoint_dir", w("meta/evil"), "--out_dir", w("converted")],
     ["consolidated.00.pth is not a readable"]),
    ("convert_meta_checkpoint", [], ["--checkpoint_dir"]),
    ("export_hf", ["--checkpoint_dir", w("missing")], ["missing"]),
    ("export_hf", ["--checkpoint_dir", w("ckpt_evil"), "--out_dir", w("exported")], ["not a readable"]),
    ("export_hf", ["--checkpoint_dir", w("ckpt"), "--out_dir", w("a_file")], ["--out_dir", "a file"]),
    ("export_hf", ["--checkpoint_dir", w("ckpt"), "--out_dir", w("ckpt"), "--dtype", "int3"], ["--dtype"]),
    ("merge_lora", ["--checkpoint_dir", w("ckpt"), "--lora_path", w("missing.pth"), "--out_dir", w("merged")],
     ["missing.pth"]),
    ("merge_lora", ["--checkpoint_dir", w("ckpt"), "--lora_path", w("lora.pth"), "--out_dir", w("ckpt")],
     ["is the base checkpoint's folder"]),
    ("merge_lora", ["--checkpoint_dir", w("ckpt"), "--lora_path", w("evil.pth"), "--out_dir", w("merged")],
     ["evil.pth is not a readable"]),
    ("merge_lora", ["--checkpoint_dir", w("ckpt"), "--lora_path", w("lora_inf.pth"), "--out_dir", w("merged")],
     ["lora_inf.pth is corrupted"]),
    ("merge_lora", ["--checkpoint_dir", w("ckpt"), "--lora_path", w("lora.pth"), "--out_dir", w("a_file")],
     ["--out_dir", "a file"]),
]


@pytest.mark.parametrize("script, flags, fragments", CONVERT_CASES,
                         ids=[f"{c[0]}:{' '.join(map(str, c[1][-2:]))[-40:]}" for c in CONVERT_CASES])
def test_convert(world, hf_dirs, script, flags, fragments):
    check_case(world, f"scripts/{script}.py", flags, fragments)
    assert not any(p.name.endswith(".tmp") for p in world.root.rglob("*"))


# --- scripts/compare.py, scripts/download.py ----------------------------------------------------------------

class adapter_run(w):
    """--run_dirs '{"adapter": "<a folder in the world>"}'."""

    def __call__(self, world: World) -> str:
        return json.dumps({"adapter": str(world / self.name)})


COMPARE = ["--checkpoint_dir", w("ckpt"), "--data_dir", w("data"), "--out_dir", w("compared")]
OTHER_CASES = [
    ("compare", COMPARE + ["--methods", '["lora", "qlora"]'], ["--methods", "qlora"]),
    ("compare", COMPARE + ["--max_iters", 0], ["--max_iters"]),
    ("compare", COMPARE + ["--batch_size", 0], ["--batch_size"]),
    ("compare", COMPARE + ["--micro_batch_size", -2], ["--micro_batch_size"]),
    ("compare", COMPARE + ["--eval_iters", 0], ["--eval_iters"]),
    ("compare", COMPARE + ["--max_new_tokens", 0], ["--max_new_tokens"]),
    ("compare", COMPARE + ["--max_seq_length", 1], ["--max_seq_length"]),
    ("compare", COMPARE + ["--devices", 0], ["--devices"]),
    ("compare", COMPARE + ["--precision", "fp8"], ["--precision 'fp8'"]),
    ("compare", COMPARE[:4] + ["--out_dir", w("a_file")], ["--out_dir", "is a file"]),
    ("compare", COMPARE + ["--run_dirs", json.dumps({"lora": "/nonexistent/run"})], ["--run_dirs", "/nonexistent/run"]),
    ("compare", COMPARE + ["--methods", '["adapter"]', "--run_dirs", adapter_run("lora_run")],
     ["--run_dirs", "lora_run holds no finished adapter run"]),
    ("download", ["--out_dir", w("a_file")], ["--out_dir", "is a file"]),
    ("demo", ["--out_dir", w("a_file")], ["--out_dir", "is a file"]),
    ("demo", ["--out_dir", w("data")], ["already exists", "--overwrite"]),
    ("demo", ["--out_dir", w("data"), "--overwrite", "true"], ["has no demo_manifest.json", "not replacing it"]),
    ("demo", ["--out_dir", w("demo"), "--max_iters", 0], ["--max_iters"]),
    ("demo", ["--out_dir", w("demo"), "--model_size", "huge"], ["--model_size 'huge'"]),
]


@pytest.mark.parametrize("script, flags, fragments", OTHER_CASES,
                         ids=[f"{c[0]}:{' '.join(map(str, c[1][-2:]))[-40:]}" for c in OTHER_CASES])
def test_other_scripts(world, script, flags, fragments):
    check_case(world, f"scripts/{script}.py", flags, fragments)
    assert not (world / "compared").exists() and not (world / "demo").exists()


# --- serve.py: every flag and LoRA file is checked before the server starts ------------------------------

_busy_sockets: List[socket.socket] = []


def busy_port(world: World) -> int:
    """A port another program listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _busy_sockets.append(s)  # open until the tests end
    return s.getsockname()[1]


SERVE = ["--checkpoint_dir", w("ckpt"), "--lora_dir", w("serve_loras")]
SERVE_CASES = [
    ("serve.py", SERVE + ["--port", 80], ["--port must be in [1024, 65535]"]),
    ("serve.py", SERVE + ["--host", "example.com"], ["--host 'example.com'"]),
    ("serve.py", SERVE + ["--max_batch_size", 0], ["--max_batch_size"]),
    ("serve.py", SERVE + ["--batch_timeout", 0], ["--batch_timeout"]),
    ("serve.py", SERVE + ["--max_new_tokens", 0], ["--max_new_tokens"]),
    ("serve.py", SERVE + ["--max_new_tokens", 100000], ["--max_new_tokens 100000", "context"]),
    ("serve.py", SERVE + ["--top_k", 0], ["--top_k"]),
    ("serve.py", SERVE + ["--precision", "fp8"], ["--precision 'fp8'"]),
    ("serve.py", SERVE + ["--quantize", "int3"], ["--quantize 'int3'"]),
    ("serve.py", SERVE + ["--swap", "fused"], ["--swap 'fused' is not one of unmerged, merged"]),
    ("serve.py", SERVE + ["--swap", "merged", "--quantize", "int8"], ["--swap merged needs the base weights unquantized"]),
    ("serve.py", SERVE + ["--max_device_adapters", 2], ["--max_device_adapters 2 is less than --max_batch_size 8"]),
    ("serve.py", SERVE + ["--max_device_adapters", 8, "--max_host_adapters", 4], ["--max_host_adapters 4 is less"]),
    ("serve.py", ["--checkpoint_dir", w("ckpt"), "--lora_dir", w("missing")], ["--lora_dir", "missing is not a folder"]),
    ("serve.py", ["--checkpoint_dir", w("missing"), "--lora_dir", w("serve_loras")], ["missing"]),
    ("serve.py", ["--checkpoint_dir", w("ckpt"), "--lora_dir", w("serve_evil")], ["evil.pth", "could run code"]),
    ("serve.py", ["--checkpoint_dir", w("ckpt"), "--lora_dir", w("serve_dora")], ["dora.pth is a DoRA adapter"]),
    ("serve.py", ["--checkpoint_dir", w("ckpt_gqa"), "--lora_dir", w("serve_loras")], ["lora.pth"]),
    ("serve.py", ["--checkpoint_dir", w("ckpt"), "--lora_dir", w("serve_inf")], ["lora_inf.pth"]),
    ("serve.py", SERVE + ["--port", busy_port], ["--port", "cannot be used"]),
]


@pytest.mark.parametrize("script, flags, fragments", SERVE_CASES, ids=[case_id(c) for c in SERVE_CASES])
def test_serve(world, script, flags, fragments):
    check_case(world, script, flags, fragments)


def test_number_of_cases():
    """A sweep wide enough to trust: at least 80 bad inputs across the scripts."""
    cases = FINETUNE_CASES + GENERATE_CASES + PREPARE_CASES + CONVERT_CASES + OTHER_CASES
    assert len(cases) + 1 >= 80  # + test_finetune_lock


# --- LoRA and adapter files as they are read (generate, merge, generate/multi_lora.py, serve.py at start), and
# generate/multi_lora.py's --requests file ------------------------------------------------------------------


@pytest.fixture(scope="module")
def read_world(world) -> World:
    """LoRA and adapter files each wrong in one stored field, a LoRA file trained on another base of the same
    shape, serve.py folders of each, and bad --requests files; all under world/read."""
    from lit_llama.lora import base_fingerprint
    from lit_llama.model import LLaMA

    root, config = world / "read", Config.from_json(world.ckpt / "lit_config.json")
    root.mkdir()
    torch.manual_seed(1)  # another base model of the same shape (and the same tokenizer)
    shutil.copytree(world.ckpt, root / "other_base")
    torch.save(LLaMA(config).state_dict(), root / "other_base" / "lit-llama.pth")

    def lora_file(name: str, lora_config=None, base=world.ckpt / "lit-llama.pth", **fields) -> None:
        checkpoint = lora_state_dict(LoRALLaMA(config, lora=LoRAConfig()), base_model=base_fingerprint(base))
        checkpoint.update(fields)
        checkpoint["lora_config"].update(lora_config or {})
        torch.save(checkpoint, root / name)

    lora_file("float_rank.pth", {"r": 8.0})
    lora_file("string_alpha.pth", {"alpha": "16"})
    lora_file("int_bool.pth", {"query": 1})
    lora_file("list_style.pth", prompt_style=["alpaca"])
    lora_file("other_base.pth", base=root / "other_base" / "lit-llama.pth")
    lora_file("bad_base_model.pth", base_model=[1, 2])
    lora_file("good.pth")
    for name in ("float_rank", "list_style", "other_base"):
        (root / f"serve_{name}").mkdir()
        shutil.copy(root / f"{name}.pth", root / f"serve_{name}" / f"{name}.pth")
    for name, field, value in [("float_length", "adapter_prompt_length", 10.0), ("list_style", "prompt_style", ["a"]),
                               ("string_version", "adapter_version", "1")]:
        checkpoint = adapter_state_dict(AdapterLLaMA(config, adapter_start_layer=1))
        checkpoint["adapter_config"][field] = value
        torch.save(checkpoint, root / f"adapter_{name}.pth")

    good = json.dumps({"adapter": "qv", "instruction": "hi"})
    (root / "requests_latin1.jsonl").write_bytes(f'{good}\n{{"instruction": "caf\xe9"}}\n'.encode("latin-1"))
    (root / "requests_list_adapter.jsonl").write_text(json.dumps({"adapter": ["qv"], "instruction": "hi"}) + "\n")
    (root / "requests_deep.jsonl").write_text('{"instruction": "hi", "input": ' + "[" * 5000 + "]" * 5000 + "}\n")
    (root / "requests_nested.jsonl").write_text('{"instruction": "hi", "x": ' + "[" * 100 + "]" * 100 + "}\n")
    (root / "requests_surrogate.jsonl").write_text(f'{good}\n{{"instruction": "hi \\ud800 there"}}\n')
    (root / "requests_surrogate_key.jsonl").write_text('{"instruction": "hi", "\\udfff": 1}\n')
    (root / "requests_good.jsonl").write_text(good + "\n")
    return world


def r(name: str) -> w:
    return w(f"read/{name}")


class named(w):
    """generate/multi_lora.py's `--lora NAME=PATH`, PATH in the world folder."""

    def __init__(self, adapter: str, path: w) -> None:
        super().__init__(path.name)
        self.adapter = adapter

    def __call__(self, world: World) -> str:
        return f"{self.adapter}={world / self.name}"

    def __repr__(self) -> str:
        return f"{self.adapter}={self.name}"


def lora_cases(lora: w, *fragments: str) -> list:
    """The same bad LoRA file in every script that reads LoRA files."""
    return [
        ("generate/lora.py", ["--checkpoint_dir", w("ckpt"), "--lora_path", lora], [lora.name, *fragments]),
        ("scripts/merge_lora.py", ["--checkpoint_dir", w("ckpt"), "--lora_path", lora, "--out_dir", w("new_out")],
         [lora.name, *fragments]),
        ("generate/multi_lora.py", ["--checkpoint_dir", w("ckpt"), "--lora", named("good", r("good.pth")), "--lora",
                                    named("qv", lora), "--requests", r("requests_good.jsonl")],
         [lora.name, *fragments]),
    ]


READ_CASES = [
    *lora_cases(r("float_rank.pth"), "invalid lora_config: r must be a whole number, got 8.0"),
    *lora_cases(r("string_alpha.pth"), "alpha must be a number, got '16'"),
    *lora_cases(r("int_bool.pth"), "query must be true or false, got 1"),
    *lora_cases(r("list_style.pth"), "prompt_style ['alpaca'] is not one of"),
    *lora_cases(r("bad_base_model.pth"), "base_model must be"),
    *lora_cases(r("other_base.pth"), "was trained on the base model", "other_base/lit-llama.pth, not on",
                "ckpt/lit-llama.pth"),
    # finetune/lora.py's own file, on another base of its shape
    ("generate/lora.py",
     ["--checkpoint_dir", r("other_base"), "--lora_path", w("lora_run/lit-llama-lora-finetuned.pth")],
     ["lit-llama-lora-finetuned.pth was trained on the base model", "ckpt/lit-llama.pth, not on",
      "other_base/lit-llama.pth"]),
    ("generate/adapter.py", ["--checkpoint_dir", w("ckpt"), "--adapter_path", r("adapter_float_length.pth")],
     ["adapter_float_length.pth: adapter_config adapter_prompt_length must be a whole number, got 10.0"]),
    ("generate/adapter.py", ["--checkpoint_dir", w("ckpt"), "--adapter_path", r("adapter_list_style.pth")],
     ["adapter_list_style.pth: adapter_config prompt_style ['a'] is not one of"]),
    ("generate/adapter.py", ["--checkpoint_dir", w("ckpt"), "--adapter_path", r("adapter_string_version.pth")],
     ["adapter_version must be a whole number, got '1'"]),
    *[("serve.py", ["--checkpoint_dir", w("ckpt"), "--lora_dir", r(f"serve_{name}")], [f"{name}.pth", fragment])
      for name, fragment in [("float_rank", "r must be a whole number"), ("list_style", "prompt_style ['alpaca']"),
                             ("other_base", "was trained on the base model")]],
    *[("generate/multi_lora.py", ["--checkpoint_dir", w("ckpt"), "--lora", named("qv", r("good.pth")), "--requests",
                                  r(f"requests_{name}.jsonl")], [f"requests_{name}.jsonl line {line}", fragment])
      for name, line, fragment in [("latin1", 2, "is not UTF-8 text"), ("list_adapter", 1, '"adapter" must be a name'),
                                   ("deep", 1, "nests deeper than 32 levels"),
                                   ("nested", 1, "nests deeper than 32 levels"),
                                   ("surrogate", 2, "instruction holds a lone surrogate ('\\ud800')"),
                                   ("surrogate_key", 1, "a key holds a lone surrogate")]],
]


@pytest.mark.parametrize("script, flags, fragments", READ_CASES, ids=[case_id(c) for c in READ_CASES])
def test_reading_lora_and_adapter_files(read_world, script, flags, fragments):
    check_case(read_world, script, flags, fragments)


def test_lora_file_on_its_own_base_and_older_files(read_world, tmp_path):
    """The fingerprint lets a LoRA file through on the base it was trained on, also converted to another dtype,
    and a file without one (written before it was recorded) still loads."""
    base = read_world.ckpt
    run_script("generate/lora.py", "--checkpoint_dir", base, "--lora_path", read_world / "read" / "good.pth",
               "--max_new_tokens", 2, "--precision", "32-true")
    state = torch.load(base / "lit-llama.pth")["state_dict"]
    for dtype in (torch.bfloat16, torch.float16):  # convert_hf_checkpoint.py --dtype: the same base
        shutil.copytree(base, tmp_path / str(dtype))
        torch.save({k: v.to(dtype) for k, v in state.items()}, tmp_path / str(dtype) / "lit-llama.pth")
        run_script("generate/lora.py", "--checkpoint_dir", tmp_path / str(dtype), "--lora_path",
                   read_world / "read" / "good.pth", "--max_new_tokens", 2, "--precision", "32-true")
    run_script("generate/lora.py", "--checkpoint_dir", base, "--lora_path", read_world / "lora.pth",
               "--max_new_tokens", 2, "--precision", "32-true")
    finetuned = read_world.lora_run / "lit-llama-lora-finetuned.pth"
    assert torch.load(finetuned)["base_model"]["weights"] == str(base / "lit-llama.pth")
    run_script("generate/lora.py", "--checkpoint_dir", base, "--lora_path", finetuned, "--max_new_tokens", 2)
# --- conversion, config files and PEFT interop: files that name other files, wrong shapes and sizes ----------


@pytest.fixture(scope="module")
def interop(world) -> Path:
    """Hugging Face and Meta folders, lit configs and PEFT adapters made from the tiny checkpoint, each wrong in
    one way."""
    from safetensors.torch import save_file

    from lit_llama.convert import lit_to_hf

    root = world / "interop"
    config = Config.from_json(world.ckpt / "lit_config.json")
    hf_state = {name: t.clone() for name, t in lit_to_hf(torch.load(world.ckpt / "lit-llama.pth")["state_dict"].items(), config)}
    hf_config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 176}

    def hf_folder(name: str, config_text: str = json.dumps(hf_config)) -> Path:
        folder = root / "hf" / name
        folder.mkdir(parents=True)
        shutil.copy(world.ckpt / "tokenizer.model", folder / "tokenizer.model")
        (folder / "config.json").write_text(config_text)
        return folder

    # a complete model outside the folders whose index names it
    save_file(hf_state, hf_folder("outside") / "model.safetensors")
    index = lambda file: json.dumps({"weight_map": {name: file for name in hf_state}})  # noqa: E731
    (hf_folder("escape") / "model.safetensors.index.json").write_text(index("../outside/model.safetensors"))
    (hf_folder("escape_absolute") / "model.safetensors.index.json").write_text(
        index(str(root / "hf" / "outside" / "model.safetensors")))
    (hf_folder("escape_link") / "model.safetensors.index.json").write_text(index("link.safetensors"))
    (root / "hf" / "escape_link" / "link.safetensors").symlink_to(root / "hf" / "outside" / "model.safetensors")
    (hf_folder("index_latin1") / "model.safetensors.index.json").write_bytes(
        '{"weight_map": {"caf\xe9": "model.safetensors"}}'.encode("latin-1"))
    (hf_folder("index_list") / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
    (hf_folder("index_number") / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {name: 1 for name in hf_state}}))
    hf_folder("config_list", json.dumps([hf_config]))
    hf_folder("config_latin1").joinpath("config.json").write_bytes(b'{"model_type": "llama\xe9"}')
    hf_folder("huge", json.dumps({**hf_config, "num_hidden_layers": 3_000_000_000}))
    inf_state = {**hf_state, "model.layers.1.mlp.up_proj.weight": hf_state["model.layers.1.mlp.up_proj.weight"].clone()}
    inf_state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
    save_file(inf_state, hf_folder("inf") / "model.safetensors")
    big_state = {**hf_state, "model.norm.weight": torch.full((64,), 1e6)}
    save_file(big_state, hf_folder("float16_overflow") / "model.safetensors")

    # Meta's params.json, wrong in one field each (read before any weight)
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": -1, "norm_eps": 1e-5, "multiple_of": 16}
    for name, text in [("multiple_of_0", json.dumps({**params, "multiple_of": 0})),
                       ("str_dim", json.dumps({**params, "dim": "64"})),
                       ("list", json.dumps([params]))]:
        (root / "meta" / name).mkdir(parents=True)
        (root / "meta" / name / "params.json").write_text(text)
    (root / "meta" / "latin1").mkdir()
    (root / "meta" / "latin1" / "params.json").write_bytes(b'{"dim": 64, "note": "caf\xe9"}')

    # lit_config.json of another depth or an absurd context length beside the tiny weights
    for name, change in [("layers_3", {"n_layer": 3}), ("layers_3m", {"n_layer": 3_000_000}),
                         ("block_1e9", {"block_size": 1e9})]:
        shutil.copytree(world.ckpt, root / f"ckpt_{name}")
        (root / f"ckpt_{name}" / "lit_config.json").write_text(json.dumps({**asdict(config), **change}))

    # PEFT adapters exported from the tiny LoRA, then changed
    load_script("scripts/export_peft.py").main(checkpoint_dir=world.ckpt, lora_path=world / "lora.pth",
                                              out_dir=root / "peft")
    adapter_config = json.loads((root / "peft" / "adapter_config.json").read_text())

    def peft_folder(name: str, config_bytes: bytes = json.dumps(adapter_config).encode()) -> Path:
        shutil.copytree(root / "peft", root / name)
        (root / name / "adapter_config.json").write_bytes(config_bytes)
        return root / name

    peft_folder("peft_list", json.dumps([adapter_config]).encode())
    peft_folder("peft_latin1", b'{"peft_type": "LORA", "note": "caf\xe9"}')
    peft_folder("peft_float_rank", json.dumps({**adapter_config, "r": 8.5}).encode())
    from safetensors.torch import load_file
    tensors = load_file(peft_folder("peft_nan") / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, root / "peft_nan" / "adapter_model.safetensors")

    (root / "demo_link").symlink_to(world.data, target_is_directory=True)  # a demo --out_dir that is a link

    # a LoRA file whose lora_config gives another rank than its tensors have
    lora = torch.load(world / "lora.pth")
    torch.save({**lora, "lora_config": {**lora["lora_config"], "r": 4}}, root / "lora_rank_4.pth")
    return root


class i(w):
    """A path in the interop folder."""

    def __call__(self, world: World) -> Path:
        return world / "interop" / self.name


OUT = "new_out_interop"  # what no case may write (check_case allows "new_out" names)
PROMPT = ["--prompt", "Hello", "--max_new_tokens", 2]
BASE_WEIGHTS = w("ckpt/lit-llama.pth")
INTEROP_CASES = [
    # an index must not make the converter read a file outside --checkpoint_dir
    ("convert_hf_checkpoint", ["--checkpoint_dir", i("hf/escape"), "--out_dir", w(OUT)],
     ["model.safetensors.index.json", "'../outside/model.safetensors'", "not inside"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", i("hf/escape_absolute"), "--out_dir", w(OUT)],
     ["model.safetensors.index.json", "not inside"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", i("hf/escape_link"), "--out_dir", w(OUT)],
     ["'link.safetensors'", "not inside"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", i("hf/index_latin1"), "--out_dir", w(OUT)],
     ["model.safetensors.index.json", "UTF-8"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", i("hf/index_list"), "--out_dir", w(OUT)],
     ["model.safetensors.index.json", "'weight_map' must be an object"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", i("hf/index_number"), "--out_dir", w(OUT)],
     ["pytorch_model.bin.index.json", "1 is not a file name"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", i("hf/config_list"), "--out_dir", w(OUT)],
     ["config.json", "expected a JSON object", "list"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", i("hf/config_latin1"), "--out_dir", w(OUT)],
     ["config.json", "UTF-8"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", i("hf/huge"), "--out_dir", w(OUT)],
     ["config.json", "n_layer=3000000000", "more than"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", i("hf/inf"), "--out_dir", w(OUT)],
     ["model.safetensors", "'model.layers.1.mlp.up_proj.weight'", "NaN or infinite"]),
    ("convert_hf_checkpoint", ["--checkpoint_dir", i("hf/float16_overflow"), "--out_dir", w(OUT),
                               "--dtype", "float16"], ["'model.norm.weight'", "too large for float16"]),
    ("convert_meta_checkpoint", ["--checkpoint_dir", i("meta/multiple_of_0"), "--out_dir", w(OUT)],
     ["params.json", "'multiple_of' is 0", "positive integer"]),
    ("convert_meta_checkpoint", ["--checkpoint_dir", i("meta/str_dim"), "--out_dir", w(OUT)],
     ["params.json", "'dim' is '64'"]),
    ("convert_meta_checkpoint", ["--checkpoint_dir", i("meta/list"), "--out_dir", w(OUT)],
     ["params.json", "expected a JSON object"]),
    ("convert_meta_checkpoint", ["--checkpoint_dir", i("meta/latin1"), "--out_dir", w(OUT)], ["params.json", "UTF-8"]),
    # a lit_config.json that does not belong to the weights is refused before a model is built
    ("generate", [*PROMPT, "--checkpoint_dir", i("ckpt_layers_3")], ["lit_config.json", "n_layer is 3", "2 layers"]),
    ("generate", [*PROMPT, "--checkpoint_dir", i("ckpt_layers_3m")], ["lit_config.json", "n_layer", "3000000"]),
    ("generate", [*PROMPT, "--checkpoint_dir", i("ckpt_block_1e9")], ["lit_config.json", "'block_size'", "1000000000"]),
    ("export_hf", ["--checkpoint_dir", i("ckpt_layers_3m"), "--out_dir", w(OUT)],
     ["lit_config.json", "n_layer is 3000000", "2 layers"]),
    # PEFT import: never over the base weights; adapter_config.json of another shape; weights generation refuses
    ("convert_peft_checkpoint", ["--adapter_dir", i("peft"), "--checkpoint_dir", w("ckpt"), "--output_path", BASE_WEIGHTS],
     ["--output_path", "the base model's weights"]),
    ("convert_peft_checkpoint", ["--adapter_dir", i("peft"), "--checkpoint_dir", w("ckpt"), "--output_path", BASE_WEIGHTS,
                     "--overwrite", "true"], ["--output_path", "the base model's weights"]),
    ("convert_peft_checkpoint", ["--adapter_dir", i("peft"), "--checkpoint_dir", w("ckpt"), "--output_path", w("lora.pth")],
     ["--output_path", "already exists", "--overwrite"]),
    ("convert_peft_checkpoint", ["--adapter_dir", i("peft_list"), "--checkpoint_dir", w("ckpt"), "--output_path", w(OUT + ".pth")],
     ["adapter_config.json", "expected a JSON object", "list"]),
    ("convert_peft_checkpoint", ["--adapter_dir", i("peft_latin1"), "--checkpoint_dir", w("ckpt"), "--output_path",
                     w(OUT + ".pth")], ["adapter_config.json", "UTF-8"]),
    ("convert_peft_checkpoint", ["--adapter_dir", i("peft_float_rank"), "--checkpoint_dir", w("ckpt"), "--output_path",
                     w(OUT + ".pth")], ["adapter_config.json", "r is 8.5", "integer"]),
    ("convert_peft_checkpoint", ["--adapter_dir", i("peft_nan"), "--checkpoint_dir", w("ckpt"), "--output_path", w(OUT + ".pth")],
     ["adapter_model.safetensors", "NaN or infinite"]),
    # PEFT export: the rank written is the tensors'; the flag named is the script's own
    ("export_peft", ["--checkpoint_dir", w("ckpt"), "--lora_path", i("lora_rank_4.pth"), "--out_dir", w(OUT)],
     ["lora_rank_4.pth", "lora_A", "r=4"]),
    ("export_peft", ["--checkpoint_dir", w("ckpt"), "--lora_path", w("lora.pth"), "--output_dir", w("a_file")],
     ["--output_dir", "is a file"]),
    # the demo's --out_dir: a link is refused (replacing it would remove the folder it points to)
    ("demo", ["--out_dir", i("demo_link")], ["--out_dir", "demo_link is a symbolic link"]),
    ("demo", ["--overwrite", "true", "--out_dir", i("demo_link")], ["--out_dir", "demo_link is a symbolic link"]),
    # downloads: a repository id that is a path
    ("download", ["--repo_id", "../../..", "--out_dir", w(OUT)], ["--repo_id '../../..'", "owner/name"]),
]


def interop_id(case) -> str:
    """The script and the files it is given: each case's culprit."""
    return f"{case[0]}:{' '.join(repr(a) for a in case[1] if isinstance(a, w))}"


@pytest.mark.parametrize("script, flags, fragments", INTEROP_CASES, ids=[interop_id(c) for c in INTEROP_CASES])
def test_interop(world, interop, script, flags, fragments):
    check_case(world, "generate.py" if script == "generate" else f"scripts/{script}.py", flags, fragments)
    assert not (world / OUT).exists() and not (world / f"{OUT}.pth").exists()
# --- data preparation, training, generation sampling, scripts/compare.py, YAML configs ----------------------

import errno  # noqa: E402 - this section's own imports, kept with it
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

from lit_llama.cli import UserError

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out


@pytest.fixture(scope="module")
def bad_train(world) -> World:
    """Files of this section in the world folder: data files, broken prepared data, copies of the LoRA run."""
    root = world.root
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "deep.jsonl").write_text('{"instruction": "a", "context": "", "response": ' + "[" * 100_000 + "\n")
    (root / "surrogate.json").write_text('[{"instruction": "a", "input": "", "output": "x\\ud800y"}]')
    (root / "surrogate.jsonl").write_text('{"instruction": "a\\udfff", "context": "", "response": "b"}\n')

    def broken_data(name: str, change: Callable[[dict], None]) -> None:
        shutil.copytree(world.data, root / name)
        train = torch.load(root / name / "train.pt", weights_only=True)
        change(train[1])
        torch.save(train, root / name / "train.pt")

    broken_data("data_no_labels", lambda s: s.pop("labels"))
    broken_data("data_no_tokens", lambda s: s.update(input_ids=s["input_ids"][:0], labels=s["labels"][:0]))
    broken_data("data_float_ids", lambda s: s.update(input_ids=s["input_ids"].float()))
    broken_data("data_negative_ids", lambda s: s["input_ids"].__setitem__(0, -3))
    broken_data("data_labels_past_vocab", lambda s: s["labels"].__setitem__(-1, 10_000))
    broken_data("data_short_labels", lambda s: s.update(labels=s["labels"][:-1]))
    shutil.copytree(world.data, root / "data_copy")

    shutil.copytree(world.lora_run, root / "lora_run_metrics_latin1")
    (root / "lora_run_metrics_latin1" / "metrics.csv").write_bytes("iter,train_loss\n1,caf\xe9\n".encode("latin-1"))
    for name, summary in [("lora_run_summary_json", "{broken"), ("lora_run_summary_type", '{"val_loss": "low"}')]:
        shutil.copytree(world.lora_run, root / name)
        (root / name / "summary.json").write_text(summary)

    (root / "latin1.yaml").write_bytes("prompt: caf\xe9\n".encode("latin-1"))
    laughs = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    (root / "laughs.yaml").write_text("\n".join(laughs + ["prompt: *a9"]) + "\n")  # 10^10 strings
    return world


def run_dirs(name: str) -> Callable[[World], str]:
    return lambda world: json.dumps({"lora": str(world / name)})


BAD_TRAIN_CASES = [
    # prepare scripts: records the JSON parser or the tokenizer cannot take
    ("scripts/prepare_alpaca.py", PREPARE + ["--data_file", w("deep.json")], ["deep.json nests", "too deeply"]),
    ("scripts/prepare_dolly.py", PREPARE + ["--data_file", w("deep.jsonl")], ["deep.jsonl: record 0 (line 1) nests"]),
    ("scripts/prepare_alpaca.py", PREPARE + ["--data_file", w("surrogate.json")],
     ["surrogate.json: record 0: field 'output' is not valid Unicode text", "'\\ud800'"]),
    ("scripts/prepare_dolly.py", PREPARE + ["--data_file", w("surrogate.jsonl")],
     ["record 0 (line 1): field 'instruction' is not valid Unicode"]),
    # prepared data whose samples the training loop cannot take
    ("finetune/lora.py", BASE + NEW + ["--data_dir", w("data_no_labels")],
     ["data_no_labels/train.pt: sample 1 has no 'labels' tensor"]),
    ("finetune/adapter.py", BASE + NEW + ["--data_dir", w("data_no_tokens")],
     ["data_no_tokens/train.pt: sample 1: 'input_ids' has shape (0,)"]),
    ("finetune/full.py", BASE + NEW + ["--data_dir", w("data_float_ids")],
     ["data_float_ids/train.pt: sample 1: 'input_ids' holds torch.float32 values, expected integer token ids"]),
    ("finetune/lora.py", BASE + NEW + ["--data_dir", w("data_negative_ids")], ["sample 1 holds negative token ids"]),
    ("finetune/lora.py", BASE + NEW + ["--data_dir", w("data_labels_past_vocab")], ["holds token id 10000"]),
    ("finetune/lora.py", BASE + NEW + ["--data_dir", w("data_short_labels")], ["sample 1: 'labels' has"]),
    # every response cut away: the prompts alone are about 97 tokens
    ("finetune/lora.py", BASE + NEW + ["--max_seq_length", 50],
     ["--max_seq_length 50 cuts away the response of all 20 training examples", "raise it to at least"]),
    # --resume with settings that change the result
    ("finetune/lora.py", BASE + ["--out_dir", w("lora_run"), "--resume", "true", "--learning_rate", 0.001],
     ["--resume", "training learning_rate=0.0003", "learning_rate=0.001"]),
    ("finetune/lora.py", BASE + ["--out_dir", w("lora_run"), "--resume", "true", "--data_dir", w("data_copy")],
     ["--resume", "data_dir=", "/data_copy"]),
    ("finetune/lora.py", BASE + ["--out_dir", w("lora_run"), "--resume", "true", "--precision", "bf16-true"],
     ["--resume", "precision=32-true", "precision=bf16-true"]),
    ("finetune/lora.py", BASE + ["--out_dir", w("lora_run_metrics_latin1"), "--resume", "true"],
     ["--resume", "lora_run_metrics_latin1/metrics.csv is not a UTF-8 CSV file"]),
    # generation
    # how Python passes the byte 0xff; jsonargparse 4.27 refuses it itself ('Parser key "prompt": ... surrogates
    # not allowed'), newer releases pass it on to our check ("--prompt is not valid Unicode text: character 3 ...")
    ("generate.py", ["--checkpoint_dir", w("ckpt"), "--prompt", "caf\udcff"], ["prompt", "'\\udcff'"]),
    # scripts/compare.py
    ("scripts/compare.py", COMPARE + ["--methods", "[]"], ["--methods is empty"]),
    ("scripts/compare.py", COMPARE + ["--method_args", '{"lora": "--lora_r \\"8"}'],
     ["--method_args: the flags of lora", "cannot be split", "quotation"]),
    ("scripts/compare.py", COMPARE + ["--method_args", '{"qlora": "--lora_r 8"}'], ["--method_args", "'qlora'"]),
    ("scripts/compare.py",
     COMPARE + ["--methods", '["lora", "adapter"]', "--run_dirs", run_dirs("lora_run_summary_json")],
     ["lora_run_summary_json/summary.json is not valid JSON"]),
    ("scripts/compare.py", COMPARE + ["--methods", '["lora", "full"]', "--run_dirs", run_dirs("lora_run_summary_type")],
     ["lora_run_summary_type/summary.json: 'train_seconds' is None, expected a number"]),
    # YAML configs
    ("generate.py", ["--config", w("latin1.yaml")], ["--config", "latin1.yaml is not UTF-8 text (byte 0xe9"]),
    ("finetune/lora.py", BASE + NEW + ["--config", w("laughs.yaml")],
     ["--config", "laughs.yaml expands through YAML aliases into", "at most 100,000"]),
    ("generate.py", ["--prompt", lambda world: (world / "laughs.yaml").read_text()], ["--prompt expands"]),
]


@pytest.mark.parametrize("script, flags, fragments", BAD_TRAIN_CASES, ids=[case_id(c) for c in BAD_TRAIN_CASES])
def test_bad_train_input(bad_train, script, flags, fragments):
    check_case(bad_train, script, flags, fragments)
    assert not any((bad_train / "new_out").glob("*.pth")) and not (bad_train / "compared").exists()


def test_billion_laughs_is_refused_fast(bad_train):
    start = time.perf_counter()
    check_case(bad_train, "generate.py", ["--config", w("laughs.yaml")], ["laughs.yaml expands"])
    assert time.perf_counter() - start < 5


def test_compare_without_matplotlib_trains_nothing(bad_train, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` then raises: ImportError
    check_case(bad_train, "scripts/compare.py", COMPARE, ["matplotlib, which is not installed", "pip install"])
    assert not (bad_train / "compared").exists()


def test_full_disk_while_preparing_keeps_the_earlier_dataset(bad_train, monkeypatch):
    """The disk fills up at the second file: the dataset already in --out_dir stays whole (never a new
    train.pt beside the old test.pt), and no temporary file is left."""
    out_dir = bad_train / "data_replaced"
    shutil.copytree(bad_train.data, out_dir)
    real_save, saved = torch.save, []

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        saved.append(path)
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    check_case(bad_train, "scripts/prepare_alpaca.py", ["--checkpoint_dir", w("ckpt"), "--out_dir", out_dir,
                                                        "--data_file", w("tiny_data.json"), "--test_split_size", 1],
               ["could not write", "data_replaced/test.pt: the disk is full"])
    assert len(saved) == 2


def test_response_tokens_warning_when_some_examples_lose_them(capsys):
    from lit_llama.training import check_response_tokens

    fabric = types.SimpleNamespace(global_rank=0)
    short = {"labels": torch.tensor([-100, -100, 5, 6])}  # the response starts at position 2
    long = {"labels": torch.tensor([-100] * 10 + [7])}
    check_response_tokens(fabric, [short, long], "training", max_seq_length=4)
    assert "--max_seq_length 4 cuts away the response of 1 of 2 training examples" in capsys.readouterr().err
    check_response_tokens(fabric, [short, long], "training", max_seq_length=11)
    assert capsys.readouterr().err == ""
    with pytest.raises(UserError, match="all 2 training examples .* at least 3"):
        check_response_tokens(fabric, [short, long], "training", max_seq_length=2)


def test_resume_of_a_run_json_without_training_settings(bad_train):
    """run.json files written before it recorded the training settings still resume."""
    out_dir = bad_train / "lora_run_old_json"
    shutil.copytree(bad_train.lora_run, out_dir)
    run = json.loads((out_dir / "run.json").read_text())
    del run["training"]
    (out_dir / "run.json").write_text(json.dumps(run))
    base = [a(bad_train) if callable(a) else a for a in BASE]
    run_script("finetune/lora.py", *base, "--out_dir", out_dir, "--resume", "true", "--learning_rate", 0.001)
    assert json.loads((out_dir / "run.json").read_text())["training"]["learning_rate"] == 0.001


@pytest.mark.parametrize("kill_at", range(6))
def test_sharded_resume_state_survives_a_kill_at_any_step(tmp_path, monkeypatch, kill_at):
    """replace_checkpoint swaps a resume folder for a new one; a kill after any of its renames and deletions
    leaves find_resume_state a complete folder: the new one, or the old one under `.old`."""
    import lit_llama.disk as disk
    import lit_llama.run_dir as run_dir

    path, tmp = tmp_path / "resume.pth", tmp_path / "resume.pth.tmp"
    for folder, content in [(path, "old"), (tmp, "new")]:
        folder.mkdir()
        (folder / "a").write_text(content)
        (folder / "b").write_text(content)
    (tmp_path / "resume.pth.old").mkdir()  # a half-deleted .old of an earlier kill
    steps = []

    def counted(function):
        def step(*args, **kwargs):
            if len(steps) == kill_at:
                raise Interrupted
            steps.append(function.__name__)
            return function(*args, **kwargs)
        return step

    monkeypatch.setattr(disk.os, "replace", counted(os.replace))
    monkeypatch.setattr(disk.shutil, "rmtree", counted(shutil.rmtree))
    try:
        disk.replace_checkpoint(tmp, path)
    except Interrupted:
        pass
    found = run_dir.find_resume_state(path)
    contents = {(found / name).read_text() for name in ("a", "b")}
    assert contents in ({"old"}, {"new"}), (steps, contents)
    if kill_at >= 4:  # every step done
        assert steps == ["rmtree", "replace", "replace", "rmtree"] and contents == {"new"}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["resume.pth"]


class Interrupted(Exception):
    """A kill at a known instruction."""


def test_tiny_temperature_samples_greedily():
    """logits / 1e-45 overflow float32 (softmax NaN): such a temperature is greedy, as 0 is; float16 logits are
    divided in float32."""
    from lit_llama.generation import sample

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    assert sample(logits, 1e-45).tolist() == [[1], [0]]
    assert sample(logits, 1e-45, top_k=2).tolist() == [[1], [0]]
    assert sample(logits.half() * 30, 1e-3).tolist() == [[1], [0]]  # 90 / 0.001 is past float16's 65504
    torch.manual_seed(0)
    assert {sample(logits, 100.0)[0, 0].item() for _ in range(50)} == {0, 1, 2}  # a normal temperature samples


def test_generate_with_a_tiny_temperature(bad_train):
    proc = run_script("generate.py", "--checkpoint_dir", bad_train.ckpt, "--temperature", 1e-45, "--max_new_tokens", 3)
    assert "Traceback" not in proc.stderr
