"""serve.py, the OpenAI-compatible server, started as a user would on 127.0.0.1 with the tiny model and LoRA
files of different ranks and prompt styles, and spoken to with the `openai` client: answers as the batch path
gives them, streaming and whole answers alike, concurrent requests for several adapters batched together
with every answer what it is alone, adapters added while serving, and bad requests answered 4xx while the
server goes on serving. One server for the module; its processes are always killed."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, load_script

from lit_llama.generation import generate_responses
from lit_llama.lora import LoRAConfig, LoRALLaMA, base_fingerprint, lora_state_dict
from lit_llama.model import LLaMA
from lit_llama.multi_lora import MultiLoRALLaMA
from lit_llama.tokenizer import Tokenizer
from lit_llama.checkpoint import load_model, resolve_checkpoint

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CPU, FP32 = torch.device("cpu"), torch.float32
ADAPTERS = {  # name: (config, prompt style it was trained with)
    "qv": (LoRAConfig(r=4, alpha=8), "alpaca"),
    "wide": (LoRAConfig(r=8, alpha=32, key=True, mlp=True, head=True), "alpaca"),
    "chat": (LoRAConfig(r=2, alpha=4, rslora=True), "chatml"),
}
START_TIMEOUT = 180  # seconds for the server to load (Python and torch on a busy CPU)


def save_lora(paths, path: Path, lora: LoRAConfig, style, seed: int, base_model=None, **fields) -> None:
    """A LoRA file as finetune/lora.py writes it, with random (not zero) B: a trained adapter. `fields`: stored
    fields to change (a bad file)."""
    torch.manual_seed(seed)
    model = load_model(paths, CPU, FP32, LoRALLaMA, lora=lora)
    with torch.no_grad():
        for layer in model.lora_layers():
            layer.lora_B.normal_(std=0.2)
    checkpoint = lora_state_dict(model, prompt_style=style, base_model=base_model)
    checkpoint["lora_config"].update(fields)
    torch.save(checkpoint, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except (urllib.error.URLError, OSError):
        return 0


def start_server(checkpoint_dir: Path, lora_dir: Path, log: Path, *flags: str):
    """Starts serve.py in a session of its own (so that it and every process it starts can be killed as one
    group); a port another process took meanwhile is replaced by another. Returns (process, base URL)."""
    for _ in range(5):
        port = free_port()
        cmd = [sys.executable, str(REPO_ROOT / "serve.py"), "--checkpoint_dir", str(checkpoint_dir),
               "--lora_dir", str(lora_dir), "--port", str(port), *flags]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=lora_dir.parent, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if get(f"http://127.0.0.1:{port}/health") == 200:
                return proc, f"http://127.0.0.1:{port}"
            time.sleep(0.5)
        stop_server(proc)
        if "cannot be used" not in log.read_text():  # not a port taken meanwhile: a real failure
            raise AssertionError(f"serve.py did not start:\n{log.read_text()[-4000:]}")
    raise AssertionError("no free port found")


def stop_server(proc: subprocess.Popen) -> None:
    """Ctrl-C to the server's whole process group, then SIGKILL for
    anything left."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(proc.pid):
            time.sleep(0.2)
        if not group_alive(proc.pid):
            break
    proc.wait(10)


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (not counting zombies: exited, waiting to be reaped)."""
    rows = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True, check=True).stdout.split("\n")
    return any(row.split()[0] == str(pgid) and not row.split()[1].startswith("Z") for row in rows if row.strip())


@pytest.fixture(scope="module")
def world(tiny_checkpoint_dir, tmp_path_factory):
    root, paths = tmp_path_factory.mktemp("serve"), resolve_checkpoint(tiny_checkpoint_dir)
    (root / "adapters").mkdir()
    for i, (name, (lora, style)) in enumerate(ADAPTERS.items()):
        save_lora(paths, root / "adapters" / f"{name}.pth", lora, style, seed=10 + i)
    (root / "later").mkdir()  # files copied into the folder while the server runs
    save_lora(paths, root / "later" / "late.pth", LoRAConfig(r=6, alpha=12, projection=True), "alpaca", seed=20)
    save_lora(paths, root / "later" / "late2.pth", LoRAConfig(r=3, alpha=3), "alpaca", seed=21)
    save_lora(paths, root / "later" / "dora.pth", LoRAConfig(r=4, dora=True), "alpaca", seed=22)
    # bad files, and two adapters whose files have the same size
    torch.manual_seed(1)
    torch.save(LLaMA(paths.config).state_dict(), root / "other_base.pth")  # another base of the same shape
    save_lora(paths, root / "later" / "float_rank.pth", LoRAConfig(r=4), "alpaca", seed=23, r=4.0)
    save_lora(paths, root / "later" / "list_style.pth", LoRAConfig(r=4), ["alpaca"], seed=24)
    save_lora(paths, root / "later" / "other_base.pth", LoRAConfig(r=4), "alpaca", seed=25,
              base_model=base_fingerprint(root / "other_base.pth"))
    for i, name in enumerate(["same_a", "same_b"]):
        save_lora(paths, root / "later" / f"{name}.pth", LoRAConfig(r=4), "alpaca", seed=26 + i,
                  base_model=base_fingerprint(paths.weights))
    proc, url = start_server(tiny_checkpoint_dir, root / "adapters", root / "server.log",
                             "--max_batch_size", "8", "--batch_timeout", "0.3", "--max_new_tokens", "24")
    try:
        yield root, url
    finally:
        stop_server(proc)
        assert not group_alive(proc.pid), "processes left"


@pytest.fixture(scope="module")
def client(world):
    return openai.OpenAI(base_url=world[1] + "/v1", api_key="not needed", max_retries=0, timeout=120)


def chat(client, model, content, **kwargs):
    response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                              temperature=0, **kwargs)
    return response.choices[0].message.content, response.choices[0].finish_reason, response.usage


def complete(client, model, prompt, **kwargs):
    response = client.completions.create(model=model, prompt=prompt, temperature=0, **kwargs)
    return response.choices[0].text, response.choices[0].finish_reason, response.usage


def test_health_and_models(world, client):
    assert get(world[1] + "/health") == 200
    assert [m.id for m in client.models.list().data] == ["base", "chat", "qv", "wide"]


def test_chat_answers_are_the_batch_paths(world, client, tiny_checkpoint_dir):
    """Each adapter's greedy chat answer is what generate_responses gives for that instruction with that
    adapter, in the style it was trained with (ChatML for "chat"), and the adapters do change it."""
    paths = resolve_checkpoint(tiny_checkpoint_dir)
    model = load_model(paths, CPU, FP32, MultiLoRALLaMA).eval()
    for name in ADAPTERS:
        model.add_adapter(name, world[0] / "adapters" / f"{name}.pth")
    tokenizer = Tokenizer(paths.tokenizer)
    answers = {}
    for name in ["base", *ADAPTERS]:
        model.select([name])
        expected = generate_responses(model, tokenizer, [("Give three tips.", "")], CPU, 16, 0.0,
                                      prompt_styles=[model.prompt_styles[name]])[0]
        answers[name], finish, usage = chat(client, name, "Give three tips.", max_tokens=16)
        assert answers[name] == expected, name
        assert finish in ("stop", "length") and usage.completion_tokens <= 16
        style = "chatml" if name == "chat" else "alpaca"
        from lit_llama.prompts import get_prompt_style

        assert usage.prompt_tokens == len(tokenizer.encode(get_prompt_style(style).prompt("Give three tips.")))
    assert len(set(answers.values())) == len(answers), answers


def test_streaming_gives_the_whole_answer(client):
    for model in ("qv", "chat"):
        text, finish, usage = chat(client, model, "What is the sky?", max_tokens=20)
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the sky?"}],
                                                temperature=0, max_tokens=20, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert len(chunks) >= 4  # the role, text in several pieces, the finish reason, the usage
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
        assert chunks[-1].usage.completion_tokens == usage.completion_tokens
        assert len({c.id for c in chunks}) == 1

    text, finish, _ = complete(client, "wide", "the model weight", max_tokens=20)
    pieces = list(client.completions.create(model="wide", prompt="the model weight", temperature=0, max_tokens=20,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == text
    assert pieces[-1].choices[0].finish_reason == finish == "length"


def test_completion_limits_and_stop(client):
    text, finish, usage = complete(client, "base", "the sky is", max_tokens=5)
    assert finish == "length" and usage.completion_tokens == 5
    longer, _, _ = complete(client, "base", "the sky is", max_tokens=12)
    assert longer.startswith(text)
    stop = longer[len(text):][2:5]  # text that does come later: the answer ends just before it
    if stop.strip():
        cut, finish, _ = complete(client, "base", "the sky is", max_tokens=12, stop=[stop])
        assert finish == "stop" and longer.startswith(cut) and stop not in cut and len(cut) < len(longer)


def test_concurrent_burst_for_several_adapters(world, client):
    """12 requests at once over four models, chat and completions, prompts of different lengths and different
    max_tokens: each answer is its one-request answer, and requests of different adapters shared batches."""
    requests = [(kind, model, prompt, max_tokens)
                for i, (kind, prompt) in enumerate([("chat", "Give three tips."), ("complete", "the water"),
                                                    ("chat", "Write a python function to sum a list of numbers.")])
                for j, model in enumerate(["base", "qv", "wide", "chat"])
                for max_tokens in [8 + 5 * ((i + j) % 3)]]

    def ask(request):
        kind, model, prompt, max_tokens = request
        return (chat if kind == "chat" else complete)(client, model, prompt, max_tokens=max_tokens)[:2]

    alone = [ask(r) for r in requests]
    log = world[0] / "server.log"
    batches_before = log.read_text().count("batch of")
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone
    batches = [line.split(": ", 1)[1].split(", ") for line in log.read_text().splitlines()
               if line.startswith("batch of")][batches_before:]
    assert sum(len(b) for b in batches) == len(requests)
    assert any(len(set(b)) >= 2 for b in batches), batches  # different adapters in one batch
    assert len(batches) < len(requests)


def test_adapter_added_while_serving(world, client):
    folder = world[0] / "adapters"
    with pytest.raises(openai.NotFoundError):
        chat(client, "late", "Give three tips.", max_tokens=8)
    shutil.copy(world[0] / "later" / "late.pth", folder / "late.pth")
    assert "late" in [m.id for m in client.models.list().data]
    first = chat(client, "late", "Give three tips.", max_tokens=12)[0]
    assert first != chat(client, "base", "Give three tips.", max_tokens=12)[0]
    # the file replaced by another adapter: loaded again
    shutil.copy(world[0] / "later" / "late2.pth", folder / "late.pth")
    os.utime(folder / "late.pth", ns=(time.time_ns(), time.time_ns() + 10**9))  # a new version even on coarse clocks
    second = chat(client, "late", "Give three tips.", max_tokens=12)[0]
    assert second != first


def error_of(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body["message"] if isinstance(info.value.body, dict) else ""


def test_bad_requests_get_4xx_and_the_server_goes_on(world, client):
    good = chat(client, "qv", "Give three tips.", max_tokens=8)
    messages = [{"role": "user", "content": "hi"}]
    create = client.chat.completions.create
    cases = [
        (lambda: create(model="nope", messages=messages), 404, "'nope' does not exist"),
        (lambda: create(model="../adapters/qv", messages=messages), 404, "does not exist"),
        (lambda: create(model="qv", messages=messages, max_tokens=-5), 400, "max_tokens must be at least 1"),
        (lambda: create(model="qv", messages=messages, max_tokens=0), 400, "max_tokens"),
        (lambda: create(model="qv", messages=[{"role": "user", "content": "the " * 300}]), 400, "context"),
        (lambda: client.completions.create(model="base", prompt="sky " * 300), 400, "context"),
        (lambda: create(model="qv", messages=messages, stream=True, max_tokens=-1), 400, "max_tokens"),
        (lambda: create(model="nope", messages=messages, stream=True), 404, "does not exist"),
        (lambda: create(model="qv", messages=[]), 400, "no user message"),
        (lambda: create(model="qv", messages=messages, n=2), 400, "n must be 1"),
        (lambda: create(model="qv", messages=messages, temperature=5), 400, "temperature"),
        (lambda: create(model="qv", messages=[{"role": "robot", "content": "hi"}]), 400, "role"),
    ]
    for call, status, fragment in cases:
        code, message = error_of(call)
        assert code == status and fragment in message, (code, message)
    # a DoRA file dropped into the folder: refused with the reason, the other adapters unaffected
    shutil.copy(world[0] / "later" / "dora.pth", world[0] / "adapters" / "dora.pth")
    code, message = error_of(lambda: create(model="dora", messages=messages))
    assert code == 400 and "DoRA" in message
    # bodies the client would not send: not JSON, not an object, a field missing or of the wrong type
    for body, fragment in [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
                           (b'{"model": "qv"}', "messages"), (b'{"model": "qv", "messages": "hi"}', "messages"),
                           (b'{"model": "qv", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "x"}',
                            "max_tokens")]:
        request = urllib.request.Request(world[1] + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)
        assert info.value.code == 400
        assert fragment in json.loads(info.value.read())["error"]["message"]
    assert chat(client, "qv", "Give three tips.", max_tokens=8) == good


# --- bad inputs: each answered 4xx with its reason, the server serving the others all along ------------------


def post(url: str, body: bytes, timeout: float = 60):
    """(status, parsed body) of a POST sent as raw bytes (what the openai client would never send)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_adapter_files_added_while_serving(world, client):
    good = chat(client, "qv", "Give three tips.", max_tokens=8)
    for name, fragment in [("float_rank", "r must be a whole number, got 4.0"),
                           ("list_style", "prompt_style ['alpaca'] is not one of"),
                           ("other_base", "was trained on the base model")]:
        shutil.copy(world[0] / "later" / f"{name}.pth", world[0] / "adapters" / f"{name}.pth")
        code, message = error_of(lambda: chat(client, name, "Give three tips.", max_tokens=8))
        assert code == 400 and f"{name}.pth" in message and fragment in message, (code, message)
        (world[0] / "adapters" / f"{name}.pth").unlink()
    assert chat(client, "qv", "Give three tips.", max_tokens=8) == good


def test_adapter_replaced_by_one_of_the_same_size_and_time(world, client):
    """A file replaced by another adapter of the same size, its modification time set back: the new adapter
    answers (the version is the content's hash, not size and time)."""
    later, folder = world[0] / "later", world[0] / "adapters"
    assert (later / "same_a.pth").stat().st_size == (later / "same_b.pth").stat().st_size
    shutil.copy(later / "same_b.pth", folder / "same_b.pth")
    expected = chat(client, "same_b", "Give three tips.", max_tokens=12)[0]
    shutil.copy(later / "same_a.pth", folder / "same.pth")
    first = chat(client, "same", "Give three tips.", max_tokens=12)[0]
    assert first != expected
    stat = (folder / "same.pth").stat()
    shutil.copy(later / "same_b.pth", folder / "same.pth")
    os.utime(folder / "same.pth", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (folder / "same.pth").stat().st_mtime_ns == stat.st_mtime_ns
    assert chat(client, "same", "Give three tips.", max_tokens=12)[0] == expected


def test_bad_bodies_get_400(world, client):
    url = world[1] + "/v1/chat/completions"
    chat_body = '{"model": "qv", "max_tokens": 4, "messages": [{"role": "user", "content": %s}]}'
    cases = [
        (chat_body % ("[" * 100000 + "]" * 100000), "nests deeper than 32 levels"),
        (chat_body % ("[" * 40 + "]" * 40), "nests deeper than 32 levels"),
        (chat_body % '"hi \\ud800"', "messages[0].content holds a lone surrogate"),
        (chat_body % '[{"type": "text", "text": "\\udfff"}]', "messages[0].content[0].text holds a lone surrogate"),
        ('{"model": "base", "prompt": "the sky \\ud800"}', "prompt holds a lone surrogate"),
        ('{"model": "\\ud800", "prompt": "the sky"}', "model holds a lone surrogate"),
        (chat_body % '"hi"' + "x", "not valid JSON"),
        ('{"model": "base", "prompt": "the sky", "max_tokens": ' + "9" * 5000 + "}", "not valid JSON"),
    ]
    for body, fragment in cases:
        endpoint = url if "messages" in body else world[1] + "/v1/completions"
        status, answer = post(endpoint, body.encode())
        assert status == 400 and fragment in answer["error"]["message"], (fragment, status, answer)
    assert post(url, b"\xff\xfe{}")[0] == 400  # not UTF-8


def test_tiny_temperature_is_greedy_and_shares_a_batch(world, client):
    """A request with temperature 1e-45 (whose logits / temperature would be infinite) and another client's
    greedy request in the same batch: both answered, the tiny temperature as greedy."""
    greedy = complete(client, "qv", "the water", max_tokens=10)[:2]
    with ThreadPoolExecutor(2) as pool:
        tiny = pool.submit(lambda: client.completions.create(model="qv", prompt="the water", temperature=1e-45,
                                                             max_tokens=10))
        other = pool.submit(complete, client, "wide", "the sky", max_tokens=6)
        assert (tiny.result().choices[0].text, tiny.result().choices[0].finish_reason) == greedy
        assert other.result()[1] in ("stop", "length")


def test_a_failing_group_fails_alone(world, tiny_checkpoint_dir, monkeypatch):
    """Should decoding fail for the rows of one sampling setting, those requests get a 500 and the other rows of
    the batch their answers (the worker's predict, in this process)."""
    serve = load_script("serve.py")
    paths = resolve_checkpoint(tiny_checkpoint_dir)
    folder = serve.AdapterFolder(world[0] / "later", paths)
    api = serve.LoRAServer(paths, folder, "32-true", None, False)
    api.setup("cpu")
    decode = api.decode

    def failing_decode(group, temperature, top_k):
        if temperature == 0.5:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        yield from decode(group, temperature, top_k)

    monkeypatch.setattr(api, "decode", failing_decode)
    prompt = api.tokenizer.encode("the sky", bos=True).tolist()
    jobs = [{"adapter": "late", "path": str(folder.folder / "late.pth"), "version": folder.version("late"),
             "prompt": prompt, "max_tokens": 5, "temperature": temperature, "top_k": None, "stops": [],
             "strip": False} for temperature in (0.5, 0.0, 0.5)]
    outputs = list(api.predict(jobs))
    failed = [[step[i] for step in outputs if step[i]] for i in (0, 2)]
    assert failed == [[{"error": "the model failed on this request: see the server's log", "status": 500}]] * 2
    answered = [step[1] for step in outputs if step[1]]
    assert answered[-1]["finish_reason"] == "length" and answered[-1]["completion_tokens"] == 5


def test_stop_strings_are_bounded(world, client):
    """A stop string of a million characters is refused at once; one of the longest allowed does not hold up
    another client's short request in the same batch."""
    start = time.monotonic()
    code, message = error_of(lambda: complete(client, "base", "the sky", max_tokens=4, stop=["x" * 1_000_000]))
    assert code == 400 and "256 characters" in message and time.monotonic() - start < 30
    short = complete(client, "qv", "the sky", max_tokens=4)
    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        long_stop = pool.submit(complete, client, "base", "the water", max_tokens=24, stop=["é" * 256] * 4)
        assert pool.submit(complete, client, "qv", "the sky", max_tokens=4).result() == short
        assert long_stop.result()[1] == "length"
    assert time.monotonic() - start < 60


def test_oversized_bodies_are_refused_before_they_are_read(world):
    """Twelve clients announcing 60 MB bodies each get a 413 without sending them, and /health stays fast; a
    body sent in chunks without a length is cut off past 1 MiB."""
    port = int(world[1].rsplit(":", 1)[1])

    def announce(length: int, chunked: bool = False) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            head = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}\r\n\r\n"
                      .encode())
            try:
                if chunked:  # 20 chunks of 64 KiB
                    for _ in range(20):
                        s.sendall(b"10000\r\n" + b"a" * 65536 + b"\r\n")
                else:  # the start of the body only
                    s.sendall(b'{"model": "base", "prompt": "')
            except OSError:  # the server answered and closed before the rest was sent
                pass
            answer = b""
            while b"}}" not in answer:  # the end of the JSON error body
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
            return answer

    with ThreadPoolExecutor(12) as pool:
        answers = [pool.submit(announce, 60_000_000) for _ in range(12)]
        start = time.monotonic()
        assert get(world[1] + "/health") == 200 and time.monotonic() - start < 5
        for answer in answers:
            assert answer.result().startswith(b"HTTP/1.1 413") and b"larger than 1048576 bytes" in answer.result()
    assert announce(0, chunked=True).startswith(b"HTTP/1.1 413")


def test_merged_swap_and_a_small_cache_give_the_same_answers(tiny_checkpoint_dir, tmp_path):
    """The worker with --swap merged, one device slot and one adapter in host memory answers every batch as the
    default worker does (greedy): batches of one adapter merged, a mixed one unmerged, adapters evicted and read
    again from their files; and the base weights are back bit for bit afterwards."""
    serve = load_script("serve.py")
    paths = resolve_checkpoint(tiny_checkpoint_dir)
    (tmp_path / "adapters").mkdir()
    for i, (name, (lora, style)) in enumerate(ADAPTERS.items()):
        save_lora(paths, tmp_path / "adapters" / f"{name}.pth", lora, style, seed=10 + i)
    folder = serve.AdapterFolder(tmp_path / "adapters", paths)
    default = serve.LoRAServer(paths, folder, "32-true", None, False)
    merged = serve.LoRAServer(paths, folder, "32-true", None, False,
                              cache=dict(swap="merged", max_device_adapters=2, max_host_adapters=2))
    default.setup("cpu")
    merged.setup("cpu")
    loaded = {name: t.clone() for name, t in merged.model.state_dict().items()}
    prompt = default.tokenizer.encode("the sky", bos=True).tolist()

    def job(adapter):
        return {"adapter": adapter, "path": str(folder.path(adapter)) if adapter != "base" else None,
                "version": folder.version(adapter) if adapter != "base" else None, "prompt": prompt, "max_tokens": 6,
                "temperature": 0.0, "top_k": None, "stops": [], "strip": False}

    for batch in (["qv", "qv"], ["wide"], ["chat", "qv"], ["chat"], ["base", "base"], ["wide", "wide"]):
        answers = [list(api.predict([job(a) for a in batch])) for api in (default, merged)]
        assert answers[0] == answers[1], batch
    assert merged.model.merged == "wide" and len(merged.model.device_slots) == 2
    merged.model.select(None)
    assert all(torch.equal(t, loaded[name]) for name, t in merged.model.state_dict().items())
