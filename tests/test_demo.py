import json
import shutil

import pytest
from conftest import assert_clean_error, load_script, run_script

from lit_llama.cli import UserError

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out


def test_demo_runs_the_whole_pipeline_offline(tmp_path):
    out = tmp_path / "demo"
    proc = run_script("scripts/demo.py", "--out_dir", out, "--max_iters", 60)
    for step in ("prepare_alpaca.py", "finetune/lora.py", "generate/lora.py", "merge_lora.py"):
        assert step in proc.stdout
    assert "Validation loss:" in proc.stdout and "real weights" in proc.stdout
    assert (out / "lora" / "lit-llama-lora-finetuned.pth").is_file()
    assert (out / "checkpoint-lora" / "lit-llama.pth").is_file()
    # an earlier demo run is not replaced unless asked, and never with a file of the user's in it
    assert_clean_error(run_script("scripts/demo.py", "--out_dir", out, check=False), "--overwrite")
    (out / "data" / "mine.json").write_text("[]")
    proc = run_script("scripts/demo.py", "--out_dir", out, "--overwrite", "true", check=False)
    assert_clean_error(proc, "holds 'data/mine.json', which the demo did not write")
    assert (out / "data" / "mine.json").read_text() == "[]"
    assert (out / "lora" / "lit-llama-lora-finetuned.pth").is_file()


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
