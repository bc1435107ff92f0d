import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, assert_clean_error, run_script

from lit_llama.data import (
    IGNORE_INDEX,
    download_if_missing,
    generate_prompt,
    load_prepared,
    load_records,
    load_tokenizer,
    prepare_dataset,
    prepare_sample,
)
from lit_llama.tokenizer import Tokenizer
from lit_llama.cli import UserError

RECORD = {"instruction": "Add the two numbers.", "input": "3 and 4", "output": "3 plus 4 is 7."}


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_checkpoint_dir) -> Tokenizer:
    return Tokenizer(tiny_checkpoint_dir / "tokenizer.model")


@pytest.fixture(params=["tiny", "llama"])
def tokenizer(request) -> Tokenizer:
    if request.param == "tiny":
        return request.getfixturevalue("tiny_tokenizer")
    return Tokenizer(request.getfixturevalue("real_tokenizer_path"))


def demo_records(n: int):
    return json.loads((REPO_ROOT / "lit_llama" / "demo_instructions.json").read_text())[:n]


def test_prompt_template():
    assert generate_prompt("Name a color.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Response:"
    )
    assert generate_prompt("Add the two numbers.", "3 and 4") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd the two numbers.\n\n### Input:\n3 and 4\n\n### Response:"
    )


@pytest.mark.parametrize("record", [RECORD, {**RECORD, "input": ""}], ids=["with_input", "without_input"])
def test_mask_covers_exactly_the_prompt(tokenizer, record):
    sample = prepare_sample(record, tokenizer, max_example_tokens=512, mask_inputs=True)
    prompt_ids = tokenizer.encode(generate_prompt(record["instruction"], record["input"]), bos=True)
    n = len(prompt_ids)
    input_ids, labels = sample["input_ids"], sample["labels"]
    assert input_ids.dtype == labels.dtype == torch.long
    assert input_ids[0] == tokenizer.bos_id and input_ids[-1] == tokenizer.eos_id
    assert torch.equal(sample["input_ids_no_response"], prompt_ids)
    assert torch.equal(input_ids[:n], prompt_ids)
    assert (labels[:n] == IGNORE_INDEX).all()
    assert torch.equal(labels[n:], input_ids[n:]) and not (labels[n:] == IGNORE_INDEX).any()
    assert tokenizer.decode(input_ids[n:-1]).strip() == record["output"]
    assert not sample["truncated"] and sample["num_tokens"] == len(input_ids)
    assert {k: sample[k] for k in ("instruction", "input", "output")} == record

    unmasked = prepare_sample(record, tokenizer, max_example_tokens=512, mask_inputs=False)
    assert torch.equal(unmasked["labels"], input_ids) and torch.equal(unmasked["input_ids"], input_ids)


def test_truncation(tiny_tokenizer):
    full = prepare_sample(RECORD, tiny_tokenizer, max_example_tokens=512)
    n_prompt = len(full["input_ids_no_response"])
    sample = prepare_sample(RECORD, tiny_tokenizer, max_example_tokens=n_prompt + 2)
    assert sample["truncated"] and sample["num_tokens"] == len(full["input_ids"])
    assert torch.equal(sample["input_ids"], full["input_ids"][: n_prompt + 2])
    assert torch.equal(sample["labels"], full["labels"][: n_prompt + 2])
    assert sample["input_ids"][-1] != tiny_tokenizer.eos_id  # the eos was cut off with the end of the output

    short = prepare_sample(RECORD, tiny_tokenizer, max_example_tokens=5)
    assert len(short["input_ids"]) == len(short["input_ids_no_response"]) == 5
    assert (short["labels"] == IGNORE_INDEX).all()


def test_seeded_split_is_repeatable(tiny_tokenizer, tmp_path):
    records = load_records(write_json(tmp_path / "d.json", demo_records(40)))

    def split(seed, name):
        train, test = prepare_dataset(records, tiny_tokenizer, tmp_path / name, 8, seed, 256)
        return [s["instruction"] + s["input"] for s in train], [s["instruction"] + s["input"] for s in test]

    first, again, other = split(1, "a"), split(1, "b"), split(2, "c")
    assert first == again and first != other
    assert len(first[0]) == 32 and len(first[1]) == 8
    assert sorted(first[0] + first[1]) == sorted(r["instruction"] + r["input"] for r in records)
    train, test = load_prepared(tmp_path / "a")
    assert [s["instruction"] + s["input"] for s in test] == first[1]


def test_prepare_alpaca_real_sample(alpaca_sample_path, real_tokenizer_path, tmp_path):
    out = tmp_path / "alpaca"
    proc = run_script(
        "scripts/prepare_alpaca.py",
        "--data_file", alpaca_sample_path,
        "--tokenizer_path", real_tokenizer_path,
        "--out_dir", out,
    )  # fmt: skip
    assert "train: 92 samples, test: 10 samples" in proc.stdout, proc.stdout
    assert "test split is 10% (10)" in proc.stderr  # 102 records: too few for the default 2000
    train, test = load_prepared(out)
    assert len(train) == 92 and len(test) == 10
    assert all(len(s["input_ids"]) <= 256 for s in train + test)
    config = json.loads((out / "prepare_config.json").read_text())
    assert config["max_seq_length"] == 256 and config["mask_inputs"] is True and config["seed"] == 42
    assert config["num_records"] == 102 and config["num_train"] == 92 and config["num_test"] == 10
    assert Path(config["tokenizer_path"]) == real_tokenizer_path.resolve()
    with_input = next(s for s in train + test if s["input"])
    n = len(with_input["input_ids_no_response"])
    assert (with_input["labels"][:n] == IGNORE_INDEX).all() and (with_input["labels"][n:] != IGNORE_INDEX).all()


def test_prepare_alpaca_tiny_checkpoint(tiny_checkpoint_dir, tmp_path):
    records = demo_records(30)
    del records[0]["input"]  # "input" is optional
    data_file = write_json(tmp_path / "mine.json", records)
    out = tmp_path / "out"
    args = ["--data_file", data_file, "--checkpoint_dir", tiny_checkpoint_dir, "--out_dir", out]
    proc = run_script("scripts/prepare_alpaca.py", *args, "--test_split_size", 5, "--mask_inputs", "false")
    assert "train: 25 samples, test: 5 samples" in proc.stdout
    train, test = load_prepared(out)
    assert all(torch.equal(s["labels"], s["input_ids"]) for s in train + test)
    config = json.loads((out / "prepare_config.json").read_text())
    assert config["mask_inputs"] is False and Path(config["data_file"]) == data_file.resolve()


def test_prepare_dolly(tiny_checkpoint_dir, tmp_path):
    lines = [
        {"instruction": f"What is {i} plus 1?", "context": "Count up." if i % 2 else "", "response": f"{i + 1}.",
         "category": "open_qa"}
        for i in range(12)
    ]  # fmt: skip
    data_file = tmp_path / "dolly.jsonl"
    data_file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "dolly"
    args = ["--data_file", data_file, "--checkpoint_dir", tiny_checkpoint_dir, "--out_dir", out]
    proc = run_script("scripts/prepare_dolly.py", *args)
    assert "train: 11 samples, test: 1 samples" in proc.stdout  # 10% of 12 records
    train, test = load_prepared(out)
    by_instruction = {s["instruction"]: s for s in train + test}
    assert by_instruction["What is 3 plus 1?"]["input"] == "Count up."
    assert by_instruction["What is 3 plus 1?"]["output"] == "4."
    assert by_instruction["What is 4 plus 1?"]["input"] == ""


def test_load_records_maps_fields_and_reads_json_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "context": "b", "response": "c"}\n\n{"instruction": "d", "response": "e"}\n')
    records = load_records(path, {"input": "context", "output": "response"})
    assert records == [
        {"instruction": "a", "input": "b", "output": "c"},
        {"instruction": "d", "input": "", "output": "e"},  # "input" is optional
    ]
    path.write_text('{"instruction": "a", "response": "c"}\n\n{"instruction": "d", "response": 5}\n')
    with pytest.raises(UserError, match=r"d.jsonl: record 1 \(line 3\): field 'response' is a number"):
        load_records(path, {"output": "response"})
    path.write_text('{"instruction": "a", "output": "b"}')
    with pytest.raises(UserError, match="expected a JSON list of records, got an object"):
        load_records(path.rename(tmp_path / "d.json"))
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": " ", "output": "b"}]')
    with pytest.raises(UserError, match="d.json: record 0: field 'instruction' is empty"):
        load_records(path)


BAD_FILES = {
    "invalid_json": ('[{"instruction": "a", "output": "b"},', ["bad.json", "is not valid JSON"]),
    "missing_output": (
        json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}]),
        ["bad.json", "record 1", "'output'", "missing"],
    ),
    "empty_list": ("[]", ["bad.json", "holds no records"]),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_data_file_is_a_clean_error(case, tiny_checkpoint_dir, tmp_path):
    text, fragments = BAD_FILES[case]
    (tmp_path / "bad.json").write_text(text)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.pt").write_text("earlier output")
    args = ["--checkpoint_dir", tiny_checkpoint_dir, "--out_dir", out]
    proc = run_script("scripts/prepare_alpaca.py", "--data_file", tmp_path / "bad.json", *args, check=False)
    assert_clean_error(proc, *fragments)
    assert (out / "train.pt").read_text() == "earlier output"  # a failed run loses nothing


def test_missing_data_file_and_tokenizer_are_clean_errors(tiny_checkpoint_dir, tmp_path):
    args = ["--data_file", tmp_path / "nope.jsonl", "--checkpoint_dir", tiny_checkpoint_dir]
    # --destination_path: the deprecated name of --out_dir still works
    proc = run_script("scripts/prepare_dolly.py", *args, "--destination_path", tmp_path / "out", check=False)
    assert_clean_error(proc, "nope.jsonl", "not found")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="t.model not found"):
        load_tokenizer(tokenizer_path=tmp_path / "t.model")
    with pytest.raises(UserError, match="--checkpoint_dir .*absent does not exist"):
        load_tokenizer(tmp_path / "absent")


def test_download_failure_is_a_user_error(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(UserError, match="could not download http://127.0.0.1:9/x.json .*--data_file"):
        download_if_missing("http://127.0.0.1:9/x.json", target, timeout=5)
    assert list(tmp_path.iterdir()) == []  # no partial file is left to be taken for the data
    target.write_text("[]")
    assert download_if_missing("http://127.0.0.1:9/x.json", target) == target  # present: no download
    # a data folder the failed download would have created is not left behind, empty
    with pytest.raises(UserError, match="could not download"):
        download_if_missing("http://127.0.0.1:9/x.json", tmp_path / "data" / "alpaca" / "x.json", timeout=5)
    assert not (tmp_path / "data").exists()


def test_load_prepared_without_data_says_what_to_run(tmp_path):
    with pytest.raises(UserError, match="prepare_alpaca.py"):
        load_prepared(tmp_path / "absent")
    (tmp_path / "train.pt").write_text("")
    with pytest.raises(UserError, match="test.pt not found"):
        load_prepared(tmp_path)


def test_demo_dataset_is_valid():
    path = REPO_ROOT / "lit_llama" / "demo_instructions.json"
    records = load_records(path)
    assert 150 <= len(records) <= 300 and path.stat().st_size < 60_000
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# --- properties of record parsing (hypothesis): any file gives records or one UserError, never a crash ------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)  # no lone surrogates: not UTF-8
record = st.fixed_dictionaries(
    {"instruction": text.filter(str.strip), "output": text.filter(str.strip)}, optional={"input": text}
)
json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                          max_leaves=12)
# tmp_path is shared by a test's examples: each one writes its own file over the last one's
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY_SETTINGS
@given(records=st.lists(record, min_size=1, max_size=8), lines=st.booleans())
def test_valid_records_round_trip(records, lines, tmp_path):
    """Records written as a JSON list or as JSON Lines read back as they were (input "" when absent)."""
    path = tmp_path / ("d.jsonl" if lines else "d.json")
    path.write_text("\n".join(json.dumps(r) for r in records) if lines else json.dumps(records), encoding="utf-8")
    assert load_records(path) == [{"input": "", **r} for r in records]


@PROPERTY_SETTINGS
@given(content=st.binary(max_size=200) | json_value.map(lambda v: json.dumps(v).encode()), suffix=st.sampled_from(
    [".json", ".jsonl"]))
def test_any_file_gives_records_or_one_user_error(content, suffix, tmp_path):
    """Whatever bytes a data file holds, load_records returns checked records or raises a UserError naming the
    file: never another exception, never a record with a missing or non-string field."""
    path = tmp_path / f"d{suffix}"
    path.write_bytes(content)
    try:
        records = load_records(path)
    except UserError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    for r in records:
        assert set(r) == {"instruction", "input", "output"} and all(isinstance(v, str) for v in r.values())
        assert r["instruction"].strip() and r["output"].strip()
