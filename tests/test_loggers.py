"""--logger_name: csv (default), tensorboard (the event file read back) and wandb (offline, its files read back)."""

import json

import pytest
from conftest import assert_clean_error, load_script, run_script

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out

RUN = dict(precision="32-true", batch_size=4, micro_batch_size=4, max_iters=4, eval_interval=2, eval_iters=1,
           save_interval=0, warmup_iters=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_checkpoint_dir):
    root = tmp_path_factory.mktemp("logger-data")
    records = [{"instruction": f"Add {i % 11} and {i // 11}.", "input": "", "output": f"{i % 11 + i // 11}"}
               for i in range(24)]
    (root / "records.json").write_text(json.dumps(records))
    load_script("scripts/prepare_alpaca.py").prepare(data_file=root / "records.json", destination_path=root / "data",
                                                     checkpoint_dir=tiny_checkpoint_dir, test_split_size=4,
                                                     max_example_tokens=128)
    return root / "data"


def test_tensorboard_event_file_holds_the_run(tiny_checkpoint_dir, data_dir, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "out"
    load_script("finetune/lora.py").setup(checkpoint_dir=tiny_checkpoint_dir, data_dir=data_dir, out_dir=out,
                                          logger_name="tensorboard", **RUN)
    (event_file,) = out.glob("logs/version_0/events.out.tfevents.*")
    events = event_accumulator.EventAccumulator(str(event_file))
    events.Reload()
    assert {"train_loss", "val_loss", "lr"} <= set(events.Tags()["scalars"])
    train_losses = events.Scalars("train_loss")
    assert [e.step for e in train_losses] == [1, 2, 3, 4]  # one row per iteration (--log_interval 1)
    summary = json.loads((out / "summary.json").read_text())
    assert events.Scalars("val_loss")[-1].value == pytest.approx(summary["val_loss"], rel=1e-6)
    assert train_losses[-1].value == pytest.approx(summary["final_train_loss"], rel=1e-6)
    assert not list(out.glob("logs/version_*/metrics.csv"))  # the one logger asked for


def wandb_history(run_file) -> list:
    """The logged rows of an offline W&B run file (run-*.wandb): W&B's header, then LevelDB-log records (32 KiB
    blocks; each chunk: crc 4 bytes, length 2, type 1 = full / 2 first / 3 middle / 4 last) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, rows = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a chunk header: the block is padded
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_run(tiny_checkpoint_dir, data_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    load_script("finetune/adapter.py").setup(checkpoint_dir=tiny_checkpoint_dir, data_dir=data_dir, out_dir=out,
                                             logger_name="wandb", adapter_start_layer=1, **RUN)
    wandb.teardown()  # the run is finished; W&B's service process writes the file: wait for it to be done
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    train_losses = [row["train_loss"] for row in rows if "train_loss" in row]
    val_losses = [row["val_loss"] for row in rows if "val_loss" in row]
    summary = json.loads((out / "summary.json").read_text())
    assert len(train_losses) == 4  # one row per iteration (--log_interval 1)
    assert train_losses[-1] == pytest.approx(summary["final_train_loss"], rel=1e-6)
    assert val_losses[-1] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_unknown_logger_is_refused(tiny_checkpoint_dir, data_dir, tmp_path):
    proc = run_script("finetune/full.py", "--checkpoint_dir", tiny_checkpoint_dir, "--data_dir", data_dir,
                      "--out_dir", tmp_path / "out", "--logger_name", "mlflow", check=False)
    assert_clean_error(proc, "--logger_name 'mlflow'", "csv, tensorboard, wandb")
