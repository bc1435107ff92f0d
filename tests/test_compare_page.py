"""serve.py's comparison page (lit_llama/web/) in a real browser: headless Chromium, driven through its DevTools
protocol (tests/chromium.py). The server serves a tiny base, two LoRA runs and an adapter run trained here (and a
LoRA run folder without metrics.csv, and a LoRA file that goes away); the page picks three models, asks one
prompt, and each column's final text must be the API's greedy answer for that model; the chart has one line per
run with curves. Then what goes wrong: an empty prompt, an unknown model, a model gone from the server, a
stopped server, each a message on the page and no spinner left. The screenshot stays in the test's temporary
folder (compare-page.png). Skips without Chromium (`apt-get install chromium`)."""

import json
import shutil
import time
import urllib.request

import pytest
from chromium import Browser, find_chromium
from conftest import assert_clean_error, make_arithmetic_run, run_script

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets.sync.client")  # the DevTools protocol's websocket
needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="no Chromium (apt-get install chromium)")

PROMPT = "Add 2 and 3."
MAX_TOKENS = 12
PICKED = ["lora_a", "lora_b", "adapter"]
WITH_CURVES = {"lora_a", "lora_b", "adapter"}  # lora_bare's folder has no metrics.csv


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """serve.py on a tiny base with --runs of two LoRA runs, an adapter run and a run folder without metrics.csv,
    and a --lora_dir holding one LoRA file (`gone`, removed by a test)."""
    from test_serve import start_server, stop_server

    root = tmp_path_factory.mktemp("compare-page")
    checkpoint_dir, data_dir = make_arithmetic_run(root)
    common = ["--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir, "--max_iters", 8, "--batch_size", 4,
              "--micro_batch_size", 2, "--eval_iters", 1, "--eval_interval", 1, "--warmup_iters", 1,
              "--precision", "32-true"]
    # learning rates high enough that two steps move the greedy answers away from the base's
    run_script("finetune/lora.py", *common, "--out_dir", root / "lora_a", "--lora_r", 4, "--learning_rate", 0.01)
    run_script("finetune/lora.py", *common, "--out_dir", root / "lora_b", "--lora_r", 8, "--learning_rate", 0.003)
    run_script("finetune/adapter.py", *common, "--out_dir", root / "adapter", "--adapter_start_layer", 1,
               "--learning_rate", 0.1)
    shutil.copytree(root / "lora_a", root / "lora_bare")
    (root / "lora_bare" / "metrics.csv").unlink()
    (root / "adapters").mkdir()
    shutil.copy(root / "lora_b" / "lit-llama-lora-finetuned.pth", root / "adapters" / "gone.pth")
    runs = json.dumps([str(root / name) for name in ("lora_a", "lora_b", "adapter", "lora_bare")])
    proc, url = start_server(checkpoint_dir, root / "adapters", root / "server.log", "--runs", runs,
                             "--max_new_tokens", "24")
    try:
        yield root, url, proc
    finally:
        stop_server(proc)


def greedy_answer(url: str, model: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
                       "max_tokens": MAX_TOKENS}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)["choices"][0]["message"]["content"]


COLUMNS = """[...document.querySelectorAll('#answers .column')].map(c => ({model: c.dataset.model,
    text: c.querySelector('.answer').textContent, speed: c.querySelector('.speed').textContent,
    busy: c.classList.contains('busy')}))"""


def ask(browser: Browser, models, prompt: str) -> None:
    """Picks the models by clicking their boxes, types the prompt and presses Compare."""
    browser.evaluate(f"""(() => {{
        for (const box of document.querySelectorAll('#models input'))
            if (box.checked !== {json.dumps(models)}.includes(box.value)) box.click();
        document.getElementById('prompt').value = {json.dumps(prompt)};
        document.getElementById('max-tokens').value = {MAX_TOKENS};
        document.getElementById('send').click();
    }})()""")


@pytest.mark.slow
@needs_chromium
def test_the_page_compares_models_side_by_side(served):
    root, url, proc = served
    start = time.monotonic()
    expected = {model: greedy_answer(url, model) for model in ["base", *PICKED]}
    assert len(set(expected.values())) == 4 and all(expected.values()), f"nothing to compare: {expected}"
    with Browser() as browser:
        browser.open(url + "/", "document.querySelectorAll('#models input').length > 0")
        assert browser.evaluate("[...document.querySelectorAll('#models input')].map(b => b.value)") == \
            ["base", "adapter", "gone", "lora_a", "lora_b", "lora_bare"]

        # the answers stream side by side, each the API's greedy answer, with tokens/s under each
        ask(browser, PICKED, PROMPT)
        browser.wait_for("document.getElementById('answers').dataset.state === 'done'", timeout=120)
        columns = browser.evaluate(COLUMNS)
        assert [c["model"] for c in columns] == sorted(PICKED)  # in the order of the list
        for column in columns:
            assert column["text"] == expected[column["model"]], column
            assert "tokens/s" in column["speed"] and not column["busy"], column

        # the training curves: one line per run with a metrics.csv, the others say so; the settings that differ
        lines = browser.evaluate("[...document.querySelectorAll('#chart .curve')].map(l => l.dataset.model)")
        assert sorted(lines) == sorted(WITH_CURVES)
        assert browser.evaluate("document.getElementById('no-curves').textContent") == \
            "lora_bare: no curves for this model (its run folder has no metrics.csv)"
        differing = browser.evaluate("[...document.querySelectorAll('#settings tr.differs td:first-child')]"
                                     ".map(td => td.textContent)")
        assert {"method", "rank", "learning rate", "trainable params"} <= set(differing)
        browser.evaluate("document.querySelector('input[name=curve][value=train]').click()")
        assert browser.evaluate("document.querySelectorAll('#chart .curve').length") == len(WITH_CURVES)

        # saved as Markdown: the answers table scripts/compare.py --prompts reads the prompts back from
        markdown = browser.evaluate("comparisonMarkdown()")
        (root / "comparison.md").write_text(markdown)
        from lit_llama.runs import answers_table, read_prompts

        assert "\n".join(answers_table([PROMPT], {m: [expected[m]] for m in sorted(PICKED)})) in markdown
        assert read_prompts(root / "comparison.md") == [PROMPT]
        browser.screenshot(root / "compare-page.png")
        assert (root / "compare-page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # bad input: each a message, and no spinner left
        message = "document.getElementById('message').textContent"
        ask(browser, PICKED, "   ")
        assert browser.evaluate(message) == "Type a prompt first: it is empty."
        ask(browser, ["lora_a"], PROMPT)
        assert browser.evaluate(message) == "Pick two to four models (1 picked)."
        browser.open(url + "/?models=lora_a,nope", "document.querySelectorAll('#models input').length > 0")
        assert browser.evaluate(message).startswith("Unknown model: nope. The server serves base, adapter")
        (root / "adapters" / "gone.pth").unlink()  # listed by the page, gone from the server
        ask(browser, ["gone", "lora_a"], PROMPT)
        browser.wait_for("document.getElementById('answers').dataset.state === 'done'", timeout=120)
        gone, lora_a = browser.evaluate(COLUMNS)
        assert gone["speed"].startswith("error: the model 'gone' does not exist") and not gone["busy"]
        assert lora_a["text"] == expected["lora_a"]
        from test_serve import stop_server

        stop_server(proc)
        ask(browser, PICKED, PROMPT)
        browser.wait_for("document.getElementById('answers').dataset.state === 'done'", timeout=60)
        for column in browser.evaluate(COLUMNS):
            assert column["speed"] == "error: the server did not answer: is serve.py still running?", column
            assert not column["busy"]
    print(f"\nthe browser part took {time.monotonic() - start:.1f} s")


def test_bad_runs_are_refused_before_serving(tiny_checkpoint_dir, tmp_path):
    """--runs: a missing folder, a folder without a finished run, two runs of one name, a run named as a LoRA file
    of --lora_dir: one line each, before anything loads."""
    from test_serve import save_lora

    from lit_llama.lora import LoRAConfig
    from lit_llama.checkpoint import resolve_checkpoint

    paths = resolve_checkpoint(tiny_checkpoint_dir)
    for folder in ("a/lora", "b/lora", "empty", "adapters"):
        (tmp_path / folder).mkdir(parents=True)
    for folder in ("a/lora", "b/lora"):
        save_lora(paths, tmp_path / folder / "lit-llama-lora-finetuned.pth", LoRAConfig(r=2), "alpaca", seed=1)
    save_lora(paths, tmp_path / "adapters" / "lora.pth", LoRAConfig(r=2), "alpaca", seed=2)

    def serve(*runs, lora_dir=None):
        flags = ["--lora_dir", lora_dir] if lora_dir else []
        return run_script("serve.py", "--checkpoint_dir", tiny_checkpoint_dir, *flags,
                          "--runs", json.dumps([str(tmp_path / run) for run in runs]), check=False)

    assert_clean_error(serve("missing"), "--runs", "missing is not a folder")
    assert_clean_error(serve("empty"), "empty holds no finished finetune run", "lit-llama-lora-finetuned.pth")
    assert_clean_error(serve("a/lora", "b/lora"), "--runs: two models would be named 'lora'")
    assert_clean_error(serve("a/lora", lora_dir=tmp_path / "adapters"), "--runs", "'lora' has the name of a LoRA file")
