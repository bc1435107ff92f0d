"""Every finetuning and serving method on every model family (tests/test_families.py's tiny random Llama 3,
tied-embedding Llama, Qwen2 and Mistral models with their tokenizer.json files), through the scripts: prepare in
the family's chat style, LoRA with rsLoRA + DoRA on every target, merge, PEFT export and import, generate; then
(slow) adapter v1/v2, full finetuning, QLoRA, several adapters on one base and the server."""

import json

import lightning  # noqa: F401 - imported here, its log handler writes to the test's stderr, not a script's
import pytest
import torch
from conftest import assert_clean_error, load_script, run_script
from test_families import FAMILIES, make_family_dir

from lit_llama.generation import generate, stop_ids
from lit_llama.lora import load_lora_model
from lit_llama.prompts import get_prompt_style
from lit_llama.tokenizer import Tokenizer
from lit_llama.checkpoint import load_model, resolve_checkpoint

pytestmark = pytest.mark.slow  # runs scripts end to end: `pytest -m "not slow"` leaves it out

transformers = pytest.importorskip("transformers")

STYLES = {"llama3": "llama3", "llama-tied": "chatml", "qwen2": "chatml", "mistral": "llama2-chat"}
TRAIN = dict(precision="32-true", batch_size=4, micro_batch_size=4, max_iters=2, eval_interval=0, eval_iters=1,
             save_interval=0, warmup_iters=1)


@pytest.fixture(scope="module", params=list(FAMILIES))
def world(request, tmp_path_factory):
    """A family's HF folder, our float32 conversion and data prepared in its chat style."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf_model = make_family_dir(root / "hf", family)
    run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", root / "hf", "--out_dir", root / "lit",
               "--dtype", "float32")
    records = [{"instruction": f"Add {i % 7} and {i // 7}.", "input": "", "output": str(i % 7 + i // 7)}
               for i in range(24)]
    (root / "records.json").write_text(json.dumps(records))
    run_script("scripts/prepare_alpaca.py", "--data_file", root / "records.json", "--out_dir", root / "data",
               "--checkpoint_dir", root / "lit", "--test_split_size", 4, "--max_seq_length", 96,
               "--prompt_style", STYLES[family])
    return {"family": family, "root": root, "hf": root / "hf", "lit": root / "lit", "data": root / "data",
            "hf_model": hf_model}


def tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_prepared_data_records_the_tokenizer_json(world):
    config = json.loads((world["data"] / "prepare_config.json").read_text())
    assert config["tokenizer_sha256"] == Tokenizer(world["lit"] / "tokenizer.json").sha256
    sample = torch.load(world["data"] / "train.pt")[0]
    tokenizer = Tokenizer(world["lit"] / "tokenizer.json")
    style = get_prompt_style(STYLES[world["family"]])
    ids = sample["input_ids"].tolist()
    # the style's special tokens are single tokens in the data, and the answer ends with a stop token
    if tokenizer.token_id(style.stop_strings[0] if style.stop_strings else "") is not None:
        assert tokenizer.token_id(style.stop_strings[0]) in ids
    assert ids[-1] in stop_ids(tokenizer, [style])


def test_lora_every_target_merge_peft_generate(world, tmp_path, capsys):
    """LoRA with rsLoRA and DoRA on q, k, v, the projection, the MLP (and the head unless it is tied): merged
    equals unmerged; PEFT on transformers' own model gives our logits; importing PEFT's files back is exact."""
    lit, config = world["lit"], resolve_checkpoint(world["lit"]).config
    out = tmp_path / "lora"
    load_script("finetune/lora.py").setup(
        checkpoint_dir=lit, data_dir=world["data"], out_dir=out, learning_rate=1e-2, lora_key=True,
        lora_projection=True, lora_mlp=True, lora_head=not config.tie_embeddings, lora_rslora=True, lora_dora=True,
        **TRAIN)
    lora_path = out / "lit-llama-lora-finetuned.pth"
    paths = resolve_checkpoint(lit)
    base = load_model(paths, torch.device("cpu"), torch.float32).eval()
    unmerged = load_lora_model(paths, lora_path, torch.device("cpu"), torch.float32, merge=False).eval()
    x = tokens(config.vocab_size)
    with torch.no_grad():
        ours = unmerged(x)
        assert rel_diff(base(x), ours) > 1e-4  # it trained

    run_script("scripts/merge_lora.py", "--lora_path", lora_path, "--checkpoint_dir", lit, "--out_dir", tmp_path / "m")
    merged = load_model(resolve_checkpoint(tmp_path / "m"), torch.device("cpu"), torch.float32).eval()
    if config.tie_embeddings:
        assert merged.lm_head.weight is merged.transformer.wte.weight
    with torch.no_grad():
        assert rel_diff(merged(x), ours) < 1e-5

    peft = pytest.importorskip("peft")
    run_script("scripts/export_peft.py", "--checkpoint_dir", lit, "--lora_path", lora_path,
               "--output_dir", tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(world["hf_model"], tmp_path / "peft").eval()
    with torch.no_grad():
        assert rel_diff(ours, theirs(x).logits) < 1e-5
    theirs.unload()  # leaves the shared HF model as it was
    run_script("scripts/convert_peft_checkpoint.py", "--adapter_dir", tmp_path / "peft", "--checkpoint_dir", lit,
               "--output_path", tmp_path / "imported.pth")
    imported = load_lora_model(paths, tmp_path / "imported.pth", torch.device("cpu"), torch.float32, merge=False)
    with torch.no_grad():
        assert rel_diff(imported.eval()(x), ours) < 1e-6

    proc = run_script("generate/lora.py", "--lora_path", lora_path, "--checkpoint_dir", lit, "--prompt", "Add 1 and 2.",
                      "--temperature", 0, "--max_new_tokens", 6, "--precision", "32-true")
    assert "tokens/s" in proc.stderr


def test_generation_stops_on_every_stop_id(world):
    """Rig the output layer so that one stop token always wins: generation ends right after it, for each of the
    checkpoint's stop ids (Llama 3: <|eot_id|> and <|end_of_text|>)."""
    paths = resolve_checkpoint(world["lit"])
    tokenizer = Tokenizer(paths.tokenizer)
    style = get_prompt_style(STYLES[world["family"]])
    model = load_model(paths, torch.device("cpu"), torch.float32).eval()
    prompt = tokenizer.encode(style.prompt("Add 1 and 2."), bos=True)
    ids = stop_ids(tokenizer, [style])
    assert {tokenizer.token_id(t) for t in FAMILIES[world["family"]]["stops"]} <= set(ids)
    for stop_id in ids:
        bump = torch.zeros(model.config.vocab_size)
        bump[stop_id] = 1e4
        handle = model.lm_head.register_forward_hook(lambda module, args, output: output + bump)
        try:
            output = generate(model, prompt, 8, temperature=0.0, eos_id=ids)
        finally:
            handle.remove()
        assert output.tolist() == prompt.tolist() + [stop_id]


def test_a_lora_file_is_refused_on_another_family(world, tmp_path):
    """A LoRA file trained on this family, given with a base of another family of the same sizes."""
    other = "qwen2" if world["family"] != "qwen2" else "llama3"
    spec = FAMILIES[other]
    other_dir = tmp_path / "other"
    make_family_dir(other_dir / "hf", other)
    run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", other_dir / "hf", "--out_dir", other_dir / "lit",
               "--dtype", "float32")
    assert spec["cls"]
    out = tmp_path / "lora"
    load_script("finetune/lora.py").setup(checkpoint_dir=world["lit"], data_dir=world["data"], out_dir=out, **TRAIN)
    proc = run_script("generate/lora.py", "--lora_path", out / "lit-llama-lora-finetuned.pth", "--checkpoint_dir",
                      other_dir / "lit", "--prompt", "hi", "--max_new_tokens", 2, check=False)
    assert_clean_error(proc, "another model family")


def test_lora_head_on_tied_embeddings_is_refused(world, tmp_path):
    if not resolve_checkpoint(world["lit"]).config.tie_embeddings:
        pytest.skip("the output layer of this family is its own")
    proc = run_script("finetune/lora.py", "--checkpoint_dir", world["lit"], "--data_dir", world["data"], "--out_dir",
                      tmp_path / "out", "--lora_head", "true", "--max_iters", 1, "--precision", "32-true", check=False)
    assert_clean_error(proc, "--lora_head", "tied")
    assert not (tmp_path / "out" / "lit-llama-lora-finetuned.pth").exists()


@pytest.mark.slow
def test_adapters_full_qlora_multi_lora_and_serve(world, tmp_path):
    lit, data = world["lit"], world["data"]
    paths = resolve_checkpoint(lit)
    x = tokens(paths.config.vocab_size)
    for version in (1, 2):
        out = tmp_path / f"adapter-v{version}"
        load_script("finetune/adapter.py").setup(checkpoint_dir=lit, data_dir=data, out_dir=out,
                                                 adapter_version=version, adapter_start_layer=1, **TRAIN)
        run_script("generate/adapter.py", "--adapter_path", out / "lit-llama-adapter-finetuned.pth", "--checkpoint_dir",
                   lit, "--prompt", "Add 1 and 2.", "--temperature", 0, "--max_new_tokens", 4, "--precision", "32-true")

    load_script("finetune/full.py").setup(checkpoint_dir=lit, data_dir=data, out_dir=tmp_path / "full",
                                          learning_rate=1e-3, **TRAIN)
    full = torch.load(tmp_path / "full" / "lit-llama-full-finetuned.pth", mmap=True)
    full = full.get("state_dict", full) if "state_dict" in full else full
    if paths.config.tie_embeddings:  # trained as one matrix, saved as one
        assert torch.equal(full["lm_head.weight"], full["transformer.wte.weight"])
    run_script("generate/full.py", "--checkpoint_path", tmp_path / "full" / "lit-llama-full-finetuned.pth",
               "--prompt", "Add 1 and 2.", "--temperature", 0, "--max_new_tokens", 4, "--precision", "32-true",
               "--prompt_style", STYLES[world["family"]])

    pytest.importorskip("torchao")
    load_script("finetune/lora.py").setup(checkpoint_dir=lit, data_dir=data, out_dir=tmp_path / "qlora",
                                          quantize="nf4", **TRAIN)
    qlora = tmp_path / "qlora" / "lit-llama-lora-finetuned.pth"
    assert qlora.is_file()

    # several adapters on one base: the QLoRA file and a plain LoRA file, each answered in its own style
    load_script("finetune/lora.py").setup(checkpoint_dir=lit, data_dir=data, out_dir=tmp_path / "lora2",
                                          lora_r=4, **TRAIN)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps({"adapter": a, "instruction": "Add 1 and 2.", "input": ""})
                                  for a in ("one", "two", "one")))
    proc = run_script("generate/multi_lora.py", "--checkpoint_dir", lit, "--lora", f"one={qlora}", "--lora",
                      f"two={tmp_path / 'lora2' / 'lit-llama-lora-finetuned.pth'}", "--requests", requests,
                      "--temperature", 0, "--max_new_tokens", 4, "--precision", "32-true")
    answers = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [a["adapter"] for a in answers] == ["one", "two", "one"]

    # the server, in this process: a chat request in the adapter's style answers and ends
    serve = load_script("serve.py")
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "chat.pth").write_bytes(qlora.read_bytes())
    folder = serve.AdapterFolder(adapters, paths)
    api = serve.LoRAServer(paths, folder, "32-true", None, False)  # the worker's model, in this process
    api.setup("cpu")
    style = get_prompt_style(STYLES[world["family"]])
    prompt = api.tokenizer.encode(style.prompt("Add 1 and 2."), bos=True).tolist()
    jobs = [{"adapter": "chat", "path": str(adapters / "chat.pth"), "version": folder.version("chat"),
             "prompt": prompt, "max_tokens": 5, "temperature": 0.0, "top_k": None, "stops": list(style.stop_strings),
             "strip": True}]
    outputs = [step[0] for step in api.predict(jobs) if step[0]]
    assert outputs[-1]["finish_reason"] in ("stop", "length")
    with torch.no_grad():
        assert torch.isfinite(load_model(paths, torch.device("cpu"), torch.float32)(x)).all()


def test_sequences_past_the_sliding_window_are_refused_up_front(world, tmp_path):
    config = resolve_checkpoint(world["lit"]).config
    if config.sliding_window is None:
        pytest.skip("no sliding window in this family")
    too_long = config.sliding_window + 1  # within block_size: only the window refuses it
    assert too_long <= config.block_size
    proc = run_script("finetune/lora.py", "--checkpoint_dir", world["lit"], "--data_dir", world["data"], "--out_dir",
                      tmp_path / "out", "--max_seq_length", too_long, "--max_iters", 1, "--precision", "32-true",
                      check=False)
    assert_clean_error(proc, f"--max_seq_length {too_long}", "sliding_window")
    proc = run_script("generate/full.py", "--checkpoint_path", world["lit"] / "lit-llama.pth", "--prompt", "Add",
                      "--max_new_tokens", too_long, check=False)
    assert_clean_error(proc, "--max_new_tokens")


def test_server_rows_end_at_every_stop_id(world):
    """serve.py's rows: an answer ends at any of the checkpoint's stop tokens, which are not in its text."""
    serve = load_script("serve.py")
    tokenizer = Tokenizer(resolve_checkpoint(world["lit"]).tokenizer)
    style = get_prompt_style(STYLES[world["family"]])
    words = tokenizer.encode(" the model", bos=False).tolist()
    for stop_id in stop_ids(tokenizer, [style]):
        row = serve.Row({"prompt": tokenizer.encode("Add", bos=True).tolist(), "max_tokens": 20, "stops": [],
                         "strip": False}, tokenizer, stop_ids(tokenizer, [style]))
        row.add(words + [stop_id] + words)
        output = row.take()
        assert output["finish_reason"] == "stop" and output["text"] == " the model"
