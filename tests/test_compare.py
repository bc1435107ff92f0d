import json

from conftest import assert_clean_error, run_script

from lit_llama.data import prepare_dataset
from lit_llama.tokenizer import Tokenizer


def test_compare_writes_table_and_plot(tiny_checkpoint_dir, tmp_path):
    records = [{"instruction": f"Add {i % 9} and {i // 9}.", "input": "", "output": f"{i % 9 + i // 9}"}
               for i in range(60)]
    prepare_dataset(records, Tokenizer(tiny_checkpoint_dir / "tokenizer.model"), tmp_path / "data", 8, 42, 128)
    out = tmp_path / "compare"
    args = ["--checkpoint_dir", tiny_checkpoint_dir, "--data_dir", tmp_path / "data", "--out_dir", out,
            "--max_iters", 8, "--batch_size", 8, "--micro_batch_size", 4, "--eval_iters", 1, "--precision", "32-true",
            "--prompts", '["Add 1 and 2.", "Add 3 and 3."]', "--max_new_tokens", 5]
    proc = run_script("scripts/compare.py", *args)

    table = (out / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split("|")[1].strip() for row in rows] == ["lora", "adapter", "adapter_v2", "full"]
    assert (out / "compare.png").stat().st_size > 10_000
    results = json.loads((out / "compare.json").read_text())
    # every method trained on exactly the same tokens; LoRA and adapters train far fewer parameters
    assert len({r["tokens"] for r in results.values()}) == 1
    assert results["adapter"]["trainable_params"] < results["lora"]["trainable_params"] < results["full"]["trainable_params"]
    for r in results.values():
        assert len(r["responses"]) == 2 and len(r["val_curve"]) >= 2

    # a second call reads the finished runs instead of training again
    again = run_script("scripts/compare.py", *args)
    assert again.stdout.count("reading the finished run") == 4
    assert "reading" not in proc.stdout

    proc = run_script("scripts/compare.py", *args[:6], "--methods", '["lora", "qlora"]', check=False)
    assert_clean_error(proc, "qlora")
