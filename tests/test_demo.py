from conftest import assert_clean_error, run_script


def test_demo_runs_the_whole_pipeline_offline(tmp_path):
    out = tmp_path / "demo"
    proc = run_script("scripts/demo.py", "--out_dir", out, "--max_iters", 60)
    for step in ("prepare_alpaca.py", "finetune/lora.py", "generate/lora.py", "merge_lora.py"):
        assert step in proc.stdout
    assert "Validation loss:" in proc.stdout and "real weights" in proc.stdout
    assert (out / "lora" / "lit-llama-lora-finetuned.pth").is_file()
    assert (out / "checkpoint-lora" / "lit-llama.pth").is_file()
    # an earlier demo run is not replaced unless asked
    assert_clean_error(run_script("scripts/demo.py", "--out_dir", out, check=False), "--overwrite")
