"""Several LoRA adapters on one base (lit_llama/multi_lora.py), mixed-adapter batches, batched generation
(lit_llama/generation.py) and generate/multi_lora.py, against the one-adapter, one-prompt paths."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_clean_error, load_script

from lit_llama.generation import generate, generate_batch
from lit_llama.lora import LoRAConfig, LoRALinear, LoRALLaMA, load_lora_model, lora_state_dict
from lit_llama.model import LLaMA
from lit_llama.multi_lora import MultiLoRALLaMA
from lit_llama.checkpoint import load_model, resolve_checkpoint
from lit_llama.cli import UserError

CPU, FP32 = torch.device("cpu"), torch.float32
ADAPTERS = {  # different ranks and targets, in one batch
    "qv": LoRAConfig(r=4, alpha=8),
    "wide": LoRAConfig(r=8, alpha=32, key=True, projection=True, mlp=True, head=True),
    "keys": LoRAConfig(r=2, alpha=2, query=False, key=True, value=False),
    "chat": LoRAConfig(r=4, alpha=4, rslora=True, mlp=True),  # trained in the ChatML prompt style
}


@pytest.fixture(scope="module")
def lora_files(tiny_checkpoint_dir, tmp_path_factory):
    """LoRA files as finetune/lora.py writes them, with random (not zero) B: a trained adapter."""
    root, paths = tmp_path_factory.mktemp("loras"), resolve_checkpoint(tiny_checkpoint_dir)
    files = {}
    for i, (name, lora) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        model = load_model(paths, CPU, FP32, LoRALLaMA, lora=lora)
        with torch.no_grad():
            for layer in model.lora_layers():
                layer.lora_B.normal_(std=0.2)
        files[name] = root / f"{name}.pth"
        torch.save(lora_state_dict(model, prompt_style="chatml" if name == "chat" else "alpaca"), files[name])
    return files


def multi_model(tiny_checkpoint_dir, lora_files) -> MultiLoRALLaMA:
    model = load_model(resolve_checkpoint(tiny_checkpoint_dir), CPU, FP32, MultiLoRALLaMA).eval()
    for name, path in lora_files.items():
        model.add_adapter(name, path)
    return model


def merged_model(tiny_checkpoint_dir, lora_files, name) -> LLaMA:
    paths = resolve_checkpoint(tiny_checkpoint_dir)
    if name == "base":
        return load_model(paths, CPU, FP32).eval()
    return load_lora_model(paths, lora_files[name], CPU, FP32, merge=True).eval()


def test_factors_give_the_whole_update():
    torch.manual_seed(0)
    layer = LoRALinear(16, 24, r=2, alpha=6, parts=[(8, True), (8, False), (8, True)])
    torch.nn.init.normal_(layer.lora_B)
    A, B = layer.factors()
    assert A.shape == (4, 16) and B.shape == (24, 4)
    torch.testing.assert_close(B @ A, layer.delta_weight(), atol=1e-6, rtol=0)


def test_mixed_batch_equals_each_adapter_merged(tiny_checkpoint_dir, lora_files):
    model = multi_model(tiny_checkpoint_dir, lora_files)
    rows = ["wide", "base", "qv", "keys", "qv", None, "chat"]
    x = torch.randint(0, 512, (len(rows), 12), generator=torch.Generator().manual_seed(0))
    model.select(rows)
    with torch.no_grad():
        mixed = model(x)
        references = {name: merged_model(tiny_checkpoint_dir, lora_files, name) for name in {*ADAPTERS, "base"}}
        for i, name in enumerate(rows):
            expected = references[name or "base"](x[i : i + 1])[0]
            torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=0)
        # the adapters do change the output: a test that could not fail otherwise
        assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)


@pytest.mark.slow
def test_swapping_never_touches_the_base_weights(tiny_checkpoint_dir, lora_files):
    model = multi_model(tiny_checkpoint_dir, lora_files)
    digest = lambda: hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
    before = digest()
    x = torch.randint(0, 512, (3, 8))
    with torch.no_grad():
        for rows in (["qv"] * 3, ["wide", "keys", "base"], None, ["keys"] * 3):
            model.select(rows)
            model(x)
    model.add_adapter("qv", lora_files["wide"])  # hot reload under an existing name
    model.select(["qv"])
    with torch.no_grad():
        reloaded = model(x[:1])
        model.select(["wide"])
        torch.testing.assert_close(reloaded, model(x[:1]), atol=0, rtol=0)
    assert digest() == before
    assert set(model.state_dict()) == set(LLaMA(model.config).state_dict())  # adapters are not base weights
    with pytest.raises(UserError, match="unknown adapter 'nope'"):
        model.select(["qv", "nope"])


@pytest.mark.slow
def test_batched_generation_equals_one_prompt_at_a_time(tiny_checkpoint_dir, lora_files):
    model = multi_model(tiny_checkpoint_dir, lora_files)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=g) for n in (5, 17, 1, 9)]
    rows = ["wide", "qv", "base", "keys"]
    model.select(rows)
    batched = generate_batch(model, prompts, max_new_tokens=12, temperature=0)
    for prompt, name, output in zip(prompts, rows, batched):
        alone = generate(merged_model(tiny_checkpoint_dir, lora_files, name), prompt, 12, temperature=0)
        assert torch.equal(output, alone), name
    # each row stops at its own end-of-text token: make row 1's 4th new token the stop token
    eos = int(batched[1][prompts[1].size(0) + 3])
    stopped = generate_batch(model, prompts, max_new_tokens=12, temperature=0, eos_id=eos)
    assert torch.equal(stopped[1], batched[1][: prompts[1].size(0) + 4])
    for prompt, full, cut in zip(prompts, batched, stopped):
        new = full[prompt.size(0) :].tolist()
        expected = new[: new.index(eos) + 1] if eos in new else new
        assert cut[prompt.size(0) :].tolist() == expected


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    dict(batch_size=3),
    # one request per batch: each merged; one device slot and two in host memory: evictions and file reads
    dict(batch_size=1, swap="merged", max_device_adapters=1, max_host_adapters=2),
])
def test_generate_multi_lora_script(tiny_checkpoint_dir, lora_files, tmp_path, capsys, options):
    requests = tmp_path / "requests.jsonl"
    lines = [{"adapter": "chat", "instruction": "Name a color."},
             {"adapter": "wide", "instruction": "Explain the sky."},
             {"adapter": "base", "instruction": "Give three tips.", "input": "healthy sleep"},
             {"adapter": "qv", "instruction": "Write a python function."},
             {"instruction": "What is a token?"}]  # no adapter: the base model
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    script = load_script("generate/multi_lora.py")
    lora = [f"{name}={path}" for name, path in lora_files.items()]
    script.main(checkpoint_dir=tiny_checkpoint_dir, lora=lora, requests=requests, max_new_tokens=8, temperature=0,
                precision="32-true", **options)
    captured = capsys.readouterr()
    out = [json.loads(line) for line in captured.out.splitlines()]
    device_adapters = options.get("max_device_adapters", len(lora_files))
    assert f"adapter cache: {device_adapters} adapters on the device" in captured.err
    assert [(o["adapter"], o["instruction"]) for o in out] == [
        (line.get("adapter", "base"), line["instruction"]) for line in lines]

    # each response is what generate/lora.py prints for it (merged LoRA, greedy)
    from lit_llama.generation import generate_response
    from lit_llama.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_checkpoint_dir / "tokenizer.model")
    for line, answer in zip(lines, out):  # each in the prompt style its adapter was trained with
        model = merged_model(tiny_checkpoint_dir, lora_files, line.get("adapter", "base"))
        style = "chatml" if line.get("adapter") == "chat" else "alpaca"
        expected = generate_response(model, tokenizer, line["instruction"], line.get("input", ""), CPU, 8, 0.0,
                                     prompt_style=style)
        assert answer["response"] == expected


@pytest.mark.parametrize("swap", ["unmerged", "merged"])  # merged too: a mixed batch could not fall back
def test_dora_adapters_are_refused(tiny_checkpoint_dir, tmp_path, swap):
    paths = resolve_checkpoint(tiny_checkpoint_dir)
    dora = load_model(paths, CPU, FP32, LoRALLaMA, lora=LoRAConfig(dora=True))
    torch.save(lora_state_dict(dora), tmp_path / "dora.pth")
    model = load_model(paths, CPU, FP32, MultiLoRALLaMA, swap=swap)
    with pytest.raises(UserError, match="dora.pth is a DoRA adapter"):
        model.add_adapter("d", tmp_path / "dora.pth")


@pytest.mark.parametrize("args, message", [
    (["--lora", "qv"], "--lora 'qv': expected NAME=PATH"),
    (["--lora", "base=x.pth"], "the name 'base' means no adapter"),
    (["--lora", "other=missing.pth"], "missing.pth does not exist"),
    (["--requests", "BAD_JSON"], "line 2 is not valid JSON"),
    (["--requests", "UNKNOWN_ADAPTER"], "line 1: unknown adapter 'other'"),
    (["--batch_size", "0"], "--batch_size must be in [1, inf], got 0"),
    (["--swap", "fused"], "--swap 'fused' is not one of unmerged, merged"),
    (["--swap", "merged", "--quantize", "int8"], "--swap merged needs the base weights unquantized"),
    (["--max_device_adapters", "2", "--max_host_adapters", "1"], "--max_host_adapters 1 is less than"),
    (["--lora", "WIDE", "--requests", "TWO_ADAPTERS", "--max_device_adapters", "1"],
     "requests 1 to 2 (one batch) name 2 adapters, more than --max_device_adapters 1 holds"),
])
def test_generate_multi_lora_bad_input(tiny_checkpoint_dir, lora_files, tmp_path, args, message, capsys,
                                       monkeypatch):
    files = {"GOOD": [{"adapter": "qv", "instruction": "hi"}], "BAD_JSON": [{"instruction": "hi"}, "{not json"],
             "UNKNOWN_ADAPTER": [{"adapter": "other", "instruction": "hi"}],
             "TWO_ADAPTERS": [{"adapter": "qv", "instruction": "hi"}, {"adapter": "wide", "instruction": "ho"}]}
    for name, lines in files.items():
        (tmp_path / name).write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    args = [str(tmp_path / a) if a in files else f"wide={lora_files['wide']}" if a == "WIDE" else a for a in args]
    argv = ["--checkpoint_dir", str(tiny_checkpoint_dir), "--lora", f"qv={lora_files['qv']}",
            "--requests", str(tmp_path / "GOOD"), *args]
    script = load_script("generate/multi_lora.py")
    monkeypatch.setattr(sys, "argv", ["generate/multi_lora.py", *script.normalize_repeated_flag(argv, "--lora")])
    with pytest.raises(SystemExit) as exit_info:
        script.run_cli(script.main)
    out, err = capsys.readouterr()
    assert_clean_error(subprocess.CompletedProcess(argv, exit_info.value.code, out, err), message)
    assert out == ""


def state_digest(model) -> str:
    """A hash of every base weight's bytes (the adapters' stacks are buffers outside the state dict)."""
    return hashlib.sha256(b"".join(t.view(torch.uint8).numpy().tobytes() for t in model.state_dict().values())).hexdigest()


@pytest.mark.slow  # 10-35 s each on a busy 2-core CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merged_swaps_give_back_the_base_bit_for_bit(tiny_checkpoint_dir, lora_files, dtype):
    """1,000 random switches between merged adapters, mixed batches and the base: the base weights hash as loaded,
    and an adapter merged late is bit for bit the same merge as the first time (no drift)."""
    model = load_model(resolve_checkpoint(tiny_checkpoint_dir), CPU, dtype, MultiLoRALLaMA, swap="merged").eval()
    for name, path in lora_files.items():
        model.add_adapter(name, path)
    loaded = state_digest(model)
    model.select(["wide"])
    first_wide = state_digest(model)
    assert first_wide != loaded  # merging does change the weights: the test could fail
    g = torch.Generator().manual_seed(0)
    names = [*ADAPTERS, "base"]
    merges = 0
    for _ in range(1000):
        if torch.rand((), generator=g) < 0.8:  # one adapter for the batch: merged
            rows = [names[int(torch.randint(len(names), (), generator=g))]] * 2
            merges += rows[0] != "base"
        else:  # a mixed batch: the unmerged path, the base as loaded
            rows = [names[int(i)] for i in torch.randint(len(names), (3,), generator=g)]
            rows[0], rows[1] = "qv", "keys"
        model.select(rows)
        if len(set(rows)) > 1:
            assert model.merged is None
    assert merges > 500
    model.select(["wide"])
    assert state_digest(model) == first_wide
    model.select(None)
    assert state_digest(model) == loaded


def test_merged_batches_compute_the_unmerged_outputs(tiny_checkpoint_dir, lora_files):
    unmerged = multi_model(tiny_checkpoint_dir, lora_files)
    merged = load_model(resolve_checkpoint(tiny_checkpoint_dir), CPU, FP32, MultiLoRALLaMA, swap="merged").eval()
    for name, path in lora_files.items():
        merged.add_adapter(name, path)
    x = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for rows in (["wide", "wide"], ["qv", "qv"], ["base", None], ["chat", "qv"], ["keys", "keys"]):
            unmerged.select(rows)
            merged.select(rows)
            expected, got = unmerged(x), merged(x)
            # float32: the merged product sums in another order; error ~ eps times the logits' scale
            atol = 1e-5 * expected.abs().max().item()
            torch.testing.assert_close(got, expected, atol=atol, rtol=0)
            one = len({r or "base" for r in rows}) == 1
            layers = merged.multi_lora_layers().values()
            assert all(layer.row_slots is None for layer in layers) == (one or rows == ["base", None])
            assert merged.merged == (rows[0] if one and rows[0] != "base" else None)


def test_adapter_cache_evicts_least_recently_used(tiny_checkpoint_dir, lora_files, monkeypatch):
    """2 device slots over 3 adapters in host memory, 4 adapters: every selection computes what the model
    holding all of them does; the levels hold what they should; a batch of 3 adapters is refused."""
    import lit_llama.multi_lora as multi_lora

    reads = []  # files read again after add_adapter: the nodes (here each adapter is one) that left host memory
    read_node, read = multi_lora.read_node, multi_lora.read_lora_factors
    monkeypatch.setattr(multi_lora, "read_node", lambda path: reads.append(path.stem) or read_node(path))
    everything = multi_model(tiny_checkpoint_dir, lora_files)
    cached = load_model(resolve_checkpoint(tiny_checkpoint_dir), CPU, FP32, MultiLoRALLaMA, max_device_adapters=2,
                        max_host_adapters=3).eval()
    for name, path in lora_files.items():  # qv, wide, keys, chat
        cached.add_adapter(name, path)

    def host() -> list:  # host memory holds nodes, by the SHA-256 of their files
        return [cached.node_files[key].stem for key in cached.host]

    assert list(cached.device_slots) == ["qv", "wide"] and host() == ["wide", "keys", "chat"]
    x = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(4))
    reads.clear()
    with torch.no_grad():
        for rows in (["chat", "keys"], ["qv", "chat"], ["wide", "wide"], ["keys", "base"], ["chat", "qv"]):
            everything.select(rows)
            cached.select(rows)
            torch.testing.assert_close(cached(x), everything(x), atol=1e-5, rtol=0)
    # traced by hand: device hits refresh the host's order too; host misses are read from their files again
    assert reads == ["qv", "wide", "keys", "qv"]
    assert list(cached.device_slots) == ["chat", "qv"] and host() == ["keys", "chat", "qv"]
    memory = cached.memory()
    assert memory["device_adapters"] == 2 and memory["host_adapters"] == 3
    config = resolve_checkpoint(tiny_checkpoint_dir).config
    sizes = {name: sum(t.numel() * 4 for A, B in read(lora_files[name], config)[0].values() for t in (A, B))
             for name in ("keys", "chat", "qv")}  # float32 factors
    assert memory["host_bytes"] == sum(sizes.values()) and memory["device_bytes"] > 0
    assert "2 adapters on the device" in cached.describe_memory()
    with pytest.raises(UserError, match="a batch names 3 adapters, more than the 2 the device holds"):
        cached.select(["qv", "wide", "keys"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(swap="fused"), "--swap 'fused' is not one of unmerged, merged"),
    (dict(max_device_adapters=0), "--max_device_adapters must be a whole number of at least 1"),
    (dict(max_device_adapters=4, max_host_adapters=2), "--max_host_adapters 2 is less than --max_device_adapters 4"),
])
def test_cache_flags_are_checked(kwargs, message):
    from lit_llama.multi_lora import check_cache_flags

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_cache_flags(**{"swap": "unmerged", "max_device_adapters": None, "max_host_adapters": None, **kwargs})
