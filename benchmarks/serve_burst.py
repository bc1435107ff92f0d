"""serve.py under load: a burst of concurrent requests for several adapters against the same requests sent one
at a time, through HTTP, on one server.

    python benchmarks/serve_burst.py                  # CPU: a small LLaMA shape, 16 requests over 4 adapters
    python benchmarks/serve_burst.py --run_length 4 --max_batch_size 4 --swap merged   # vs --swap unmerged

It writes a random checkpoint of the shape (with the real LLaMA tokenizer from ../shared when it is there) and
k LoRA files (r 8 on query and value, random B: what a trained adapter costs) into a temporary folder, starts
`serve.py` on a free port of 127.0.0.1, and sends N chat requests, request i for adapter i mod (k + 1) (the
last one being "base"), greedy, `max_tokens` fixed: first one at a time, then all at once from N threads. A
request sent alone waits serve.py's --batch_timeout for company before it is decoded: part of the ratio.
Tokens/s counts the completion tokens the server reports. The answers of the burst must equal the ones sent
alone (greedy: batching changes nothing). Adds the row to benchmarks/RESULTS.md.

With --run_length r, consecutive requests share adapters: request i is for adapter (i // r) mod (k + 1); with
--swap merged (serve.py's flag) a batch of one adapter then runs with it merged. Such rows (or any --swap) go to
a table of their own, which has the two settings as columns.
"""

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows, write_random_checkpoint  # noqa: E402
from lit_llama.lora import LoRAConfig, LoRALLaMA, lora_state_dict  # noqa: E402
from lit_llama.model import Config  # noqa: E402
from lit_llama.checkpoint import load_model, resolve_checkpoint
from lit_llama.cli import UserError, run_cli

RESULTS_HEADER = """
## serve.py: a burst of requests for several adapters vs one at a time

`python benchmarks/serve_burst.py`: one server (serve.py, CPU or GPU as found), N chat requests over HTTP,
request i for adapter i mod (k + 1) (the last being the base model), greedy, fixed max_tokens; sent one at a
time, then all at once. Tokens/s: completion tokens reported by the server over wall time. The burst's
answers equal the one-at-a-time answers ("same answers").

| date | machine | model | adapters k | requests | max tokens | max batch size / batch timeout | one at a time tokens/s | burst tokens/s | ratio | burst latency median / max | same answers |
|---|---|---|---|---|---|---|---|---|---|---|---|
"""

SWAP_HEADER = """
## serve.py: a burst where consecutive requests share adapters, --swap merged vs unmerged

`python benchmarks/serve_burst.py --run_length R --swap MODE`: as "serve.py: a burst of requests", with request i for adapter
(i // R) mod (k + 1): runs of R consecutive requests for one adapter. With --swap merged a batch whose requests
all name one adapter runs with it merged into the base (lit_llama/multi_lora.py); mixed batches run unmerged.

| date | machine | model | swap | run length R | adapters k | requests | max tokens | max batch size / batch timeout | one at a time tokens/s | burst tokens/s | ratio | burst latency median / max | same answers |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""

# a LLaMA shape small enough for a CPU: 4 layers of width 512, the real 32k vocabulary
SMALL = dict(n_layer=4, n_head=8, n_embd=512, intermediate_size=1376, vocab_size=32000, block_size=512)
QUESTIONS = ["What food do llamas eat?", "Explain weight decay in one sentence.", "Name three prime numbers.",
             "Write a haiku about the sea.", "Why is the sky blue?", "Translate 'good morning' into French.",
             "What is LoRA?", "Give me a synonym of happy."]


def main(
    adapters: int = 4,
    requests: int = 16,
    max_tokens: int = 32,
    max_batch_size: int = 16,
    batch_timeout: float = 0.05,
    model_size: Optional[str] = None,
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
    swap: str = "unmerged",
    run_length: int = 1,
) -> None:
    """Measures a concurrent burst against one request at a time on one serve.py.

    Args:
        adapters: LoRA adapters k in the server's folder (requests also go to the base model).
        requests: Requests N, in each of the two measurements.
        max_tokens: max_tokens of every request.
        max_batch_size: serve.py's --max_batch_size.
        batch_timeout: serve.py's --batch_timeout: how long a free model waits for more requests to batch (a
            request sent alone waits it in full before decoding starts).
        model_size: A named size from lit_llama/model.py; default: a 4-layer, 512-wide LLaMA (32k vocabulary).
        results_file: Markdown file to add the row to ("" for none).
        swap: serve.py's --swap: unmerged, or merged (a batch of one adapter runs with it merged).
        run_length: Consecutive requests for one adapter (1: each request another adapter).
    """
    for name, value in (("adapters", adapters), ("requests", requests), ("max_tokens", max_tokens),
                        ("max_batch_size", max_batch_size), ("run_length", run_length)):
        if value < 1:
            raise UserError(f"--{name} {value}: expected at least 1")
    if swap not in ("unmerged", "merged"):
        raise UserError(f"--swap {swap!r} is not one of unmerged, merged")
    if not 0 < batch_timeout <= 60:
        raise UserError(f"--batch_timeout {batch_timeout}: expected more than 0 and at most 60 seconds")
    try:
        config = Config.from_name(model_size) if model_size else Config(**SMALL)
    except ValueError as e:
        raise UserError(f"--model_size: {e}")
    shape = model_size or "4x512 (32k vocab)"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = torch.cuda.get_device_name() if device == "cuda" else f"CPU {platform.machine()}, {os.cpu_count()} cores"
    with tempfile.TemporaryDirectory() as work:
        checkpoint_dir, lora_dir = Path(work) / "checkpoint", Path(work) / "adapters"
        write_random_checkpoint(config, checkpoint_dir, torch.device(device), SHARED / "tokenizers" / "llama")
        names = write_adapters(checkpoint_dir, lora_dir, adapters)
        bodies = [{"model": ([*names, "base"])[(i // run_length) % (adapters + 1)], "temperature": 0, "max_tokens": max_tokens,
                   "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]} for i in range(requests)]
        server, url = start_server(checkpoint_dir, lora_dir, Path(work) / "server.log", max_batch_size,
                                   batch_timeout, swap)
        try:
            ask(url, bodies[0])  # warm-up: the first batch's allocations
            t0 = time.perf_counter()
            alone = [ask(url, body) for body in bodies]
            alone_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=requests) as pool:
                burst = list(pool.map(lambda body: ask(url, body), bodies))
            burst_seconds = time.perf_counter() - t0
        finally:
            stop_server(server)

    tokens = sum(answer["tokens"] for answer in alone)
    alone_rate, burst_rate = tokens / alone_seconds, sum(a["tokens"] for a in burst) / burst_seconds
    latencies = [answer["seconds"] for answer in burst]
    same = "yes" if [a["text"] for a in alone] == [a["text"] for a in burst] else "no"
    print(f"{requests} requests over {adapters} adapters and base, {tokens} completion tokens: one at a time "
          f"{alone_rate:.1f} tokens/s, burst {burst_rate:.1f} tokens/s ({burst_rate / alone_rate:.2f}x); burst "
          f"latency median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s; same answers: {same}")
    row = (f"| {date.today()} | {machine} | {shape} | {adapters} | {requests} | {max_tokens} | {max_batch_size} / {batch_timeout} s | "
           f"{alone_rate:.1f} | {burst_rate:.1f} | {burst_rate / alone_rate:.2f}x | "
           f"{statistics.median(latencies):.2f} s / {max(latencies):.2f} s | {same} |")
    if swap != "unmerged" or run_length != 1:
        row = row.replace(f"| {shape} | ", f"| {shape} | {swap} | {run_length} | ", 1)
        add_rows(results_file, SWAP_HEADER, [row])
    else:
        add_rows(results_file, RESULTS_HEADER, [row])


def write_adapters(checkpoint_dir: Path, lora_dir: Path, k: int) -> List[str]:
    """k LoRA files as finetune/lora.py writes them (r 8, query and value), with random B."""
    lora_dir.mkdir()
    paths, names = resolve_checkpoint(checkpoint_dir), []
    for i in range(k):
        torch.manual_seed(100 + i)
        model = load_model(paths, torch.device("cpu"), torch.float32, LoRALLaMA, lora=LoRAConfig(r=8, alpha=16))
        with torch.no_grad():
            for layer in model.lora_layers():
                layer.lora_B.normal_(std=0.02)
        names.append(f"adapter{i}")
        torch.save(lora_state_dict(model), lora_dir / f"{names[-1]}.pth")
    return names


def ask(url: str, body: Dict[str, Any]) -> Dict[str, Any]:
    """One chat request: the answer's text, its completion tokens and the seconds it took."""
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    return dict(text=answer["choices"][0]["message"]["content"], tokens=answer["usage"]["completion_tokens"],
                seconds=time.perf_counter() - t0)


def start_server(checkpoint_dir: Path, lora_dir: Path, log: Path, max_batch_size: int,
                 batch_timeout: float, swap: str = "unmerged") -> Tuple[subprocess.Popen, str]:
    """serve.py on a free port, in a process group of its own (stopped as one); waits for /health."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(REPO / "serve.py"), "--checkpoint_dir", str(checkpoint_dir), "--lora_dir",
           str(lora_dir), "--port", str(port), "--max_batch_size", str(max_batch_size),
           "--batch_timeout", str(batch_timeout), "--swap", swap]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise UserError(f"serve.py did not start: {log.read_text()[-2000:]}")


def stop_server(server: subprocess.Popen) -> None:
    """Ctrl-C to the server's process group, then SIGKILL for any left."""
    try:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    time.sleep(1)  # the workers leave after the main process
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


if __name__ == "__main__":
    run_cli(main)
