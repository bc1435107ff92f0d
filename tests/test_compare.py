import json

import pytest
import torch

from conftest import assert_clean_error, run_script

from lit_llama.data import prepare_dataset
from lit_llama.runs import markdown_cell
from lit_llama.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out


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
    results_table = table.split("## Answers")[0]  # the table of figures, not the table of answers after it
    rows = [line for line in results_table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
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

    # --prompts FILE: one prompt a line, or a comparison the page saved; the answers as one table
    (tmp_path / "prompts.txt").write_text("Add 4 and 4.\n\nAdd 5 | 1.\n")
    run_script("scripts/compare.py", *args[:-4], "--prompts", tmp_path / "prompts.txt", "--max_new_tokens", 5)
    table = (out / "compare.md").read_text()
    assert "| prompt | lora | adapter | adapter_v2 | full |" in table
    answers = json.loads((out / "compare.json").read_text())
    for prompt, cell in (("Add 4 and 4.", "Add 4 and 4."), ("Add 5 | 1.", "Add 5 \\| 1.")):
        i = ["Add 4 and 4.", "Add 5 | 1."].index(prompt)
        row = "| " + " | ".join([cell, *(markdown_cell(answers[m]["responses"][i]) for m in answers)]) + " |"
        assert row in table
    (tmp_path / "saved.md").write_text("# Finetunes compared\n\n## Answers\n\n| prompt | lora | full |\n"
                                       "|---|---|---|\n| Add 1 and 1. | 2 | 3 |\n")
    run_script("scripts/compare.py", *args[:-4], "--prompts", tmp_path / "saved.md", "--max_new_tokens", 5)
    assert [len(r["responses"]) for r in json.loads((out / "compare.json").read_text()).values()] == [1] * 4
    (tmp_path / "empty.txt").write_text("\n  \n")
    proc = run_script("scripts/compare.py", *args[:-4], "--prompts", tmp_path / "empty.txt", check=False)
    assert_clean_error(proc, "--prompts", "empty.txt holds no prompt")

    # the held-out split's instructions, answered by the base model too; the loss before training in the table
    heldout = [r["instruction"] for r in torch.load(tmp_path / "data" / "test.pt")[:2]]
    run_script("scripts/compare.py", *args, "--methods", '["lora", "full"]', "--heldout_prompts", 2,
               "--base_answers", "true")
    table = (out / "compare.md").read_text()
    assert "| prompt | base | lora | full |" in table
    assert all(f"| {instruction} |" in table for instruction in heldout)
    lora_row = next(line for line in table.splitlines() if line.startswith("| lora |")).split("|")
    before, after = float(lora_row[-3]), float(lora_row[-2].split()[0])
    assert before != after  # the loss before training is the base model's, not the final one
    proc = run_script("scripts/compare.py", *args, "--heldout_prompts", 99, check=False)
    assert_clean_error(proc, "--heldout_prompts 99", "holds 8 records")

    proc = run_script("scripts/compare.py", *args[:6], "--methods", '["lora", "qlora"]', check=False)
    assert_clean_error(proc, "qlora")

    # a finished run is reused only with the settings it was trained with: never a table under a wrong header
    table_before = (out / "compare.md").read_text()
    assert "Each row was trained with:" in table_before and "--max_iters 8" in table_before
    changed = [*args, "--max_iters", 16]
    proc = run_script("scripts/compare.py", *changed, check=False)
    assert_clean_error(proc, "holds a lora run trained with --max_iters 8 (now 16)", "--retrain true")
    other_data = tmp_path / "other_data"
    prepare_dataset(records[:40], Tokenizer(tiny_checkpoint_dir / "tokenizer.model"), other_data, 8, 42, 128)
    proc = run_script("scripts/compare.py", *args[:3], other_data, *args[4:], check=False)
    assert_clean_error(proc, "other data")
    assert (out / "compare.md").read_text() == table_before  # nothing rewritten

    retrained = run_script("scripts/compare.py", *changed, "--methods", '["lora"]', "--retrain", "true")
    assert "reading" not in retrained.stdout
    assert "--max_iters 16" in (out / "compare.md").read_text()
    flags = json.loads((out / "lora" / "compare_settings.json").read_text())["flags"]
    assert flags[flags.index("--max_iters") + 1] == "16"
