"""LoRA trees (lit_llama/lora_tree.py): finetune/lora.py --parent_lora trains a node on the base with its ancestors
merged; a leaf composes its whole path, exactly, in generation, mixed batches, the merged swap, the node cache
and a flattened PEFT export; bad trees are refused in one line."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, load_script, make_checkpoint_dir, run_script

from lit_llama.checkpoint import load_model, resolve_checkpoint
from lit_llama.cli import UserError
from lit_llama.lora import LoRAConfig, LoRALLaMA, base_fingerprint, load_lora_model, lora_state_dict
from lit_llama.lora_tree import PARENTS, TreeLoRAFinetune, file_sha256, load_leaf_model
from lit_llama.model import LLaMA
from lit_llama.multi_lora import MultiLoRALLaMA

CPU, FP32 = torch.device("cpu"), torch.float32
FAST = ["--precision", "32-true", "--batch_size", 2, "--micro_batch_size", 2, "--eval_iters", 1, "--max_iters", 2,
        "--learning_rate", 3e-2, "--warmup_iters", 1, "--eval_interval", 100, "--save_interval", 100]
FINAL = "lit-llama-lora-finetuned.pth"


@pytest.fixture(scope="module")
def tree(tmp_path_factory, tiny_checkpoint_dir):
    """language (r 8, q/v and the MLP) -> domain (r 4, q/v) -> task (r 2, q/k/v), trained by finetune/lora.py,
    and a second leaf task2 under domain (task's file with other tensors: same parents)."""
    root = tmp_path_factory.mktemp("tree")
    records = [{"instruction": f"Add {i % 11} and {i // 11}.", "input": "", "output": f"{i % 11 + i // 11}"}
               for i in range(24)]
    (root / "records.json").write_text(json.dumps(records))
    load_script("scripts/prepare_alpaca.py").prepare(data_file=root / "records.json", destination_path=root / "data",
                                                     checkpoint_dir=tiny_checkpoint_dir, test_split_size=4,
                                                     max_seq_length=128)
    common = ["--checkpoint_dir", tiny_checkpoint_dir, "--data_dir", root / "data", "--lora_dropout", 0, *FAST]
    files, parents = {}, []
    for name, flags in (("language", ["--lora_r", 8, "--lora_mlp", "true"]), ("domain", ["--lora_r", 4]),
                        ("task", ["--lora_r", 2, "--lora_key", "true"])):
        parent_flags = [x for p in parents for x in ("--parent_lora", p)]
        run_script("finetune/lora.py", *common, "--out_dir", root / name, *flags, *parent_flags)
        files[name] = root / name / FINAL
        parents.append(files[name])
    checkpoint = torch.load(files["task"], weights_only=True)
    g = torch.Generator().manual_seed(5)
    checkpoint["state_dict"] = {k: t + 0.1 * torch.randn(t.shape, generator=g)
                                for k, t in checkpoint["state_dict"].items()}
    files["task2"] = root / "task2.pth"
    torch.save(checkpoint, files["task2"])
    return files


def expected_logits(checkpoint_dir: Path, nodes, x: torch.Tensor) -> torch.Tensor:
    """The base plus each node's update, each computed on its own by lit_llama/lora.py (merged, minus the base)."""
    paths = resolve_checkpoint(checkpoint_dir)
    base = load_model(paths, CPU, FP32).eval()
    weights = {k: t.clone() for k, t in base.state_dict().items()}
    for node in nodes:
        merged = load_lora_model(paths, node, CPU, FP32, merge=True).state_dict()
        for k in weights:
            weights[k] += merged[k] - base.state_dict()[k]
    base.load_state_dict(weights)
    with torch.no_grad():
        return base(x)


def test_a_leaf_composes_its_path_exactly(tiny_checkpoint_dir, tree, tmp_path):
    """The leaf's file records its parents; generation's model, mixed batches of leaves sharing ancestors, the
    merged swap, and the flattened PEFT export all compute the base plus the sum of the path's updates; and the
    child trained on the base with its ancestors merged."""
    recorded = torch.load(tree["task"], weights_only=True)[PARENTS]
    assert [(r["name"], r["sha256"]) for r in recorded] == [(str(tree[n]), file_sha256(tree[n]))
                                                            for n in ("language", "domain")]
    x = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    path = [tree["language"], tree["domain"], tree["task"]]
    expected = expected_logits(tiny_checkpoint_dir, path, x)
    parent_only = expected_logits(tiny_checkpoint_dir, path[:2], x)
    base = expected_logits(tiny_checkpoint_dir, [], x)
    assert (expected - parent_only).abs().max() > 1e-3 and (parent_only - base).abs().max() > 1e-3, "updates too small"
    atol = 1e-5 * expected.abs().max().item()  # float32: sums in another order, eps times the logits' scale

    paths = resolve_checkpoint(tiny_checkpoint_dir)
    with torch.no_grad():
        for merge in (True, False):  # generate/lora.py and scripts/merge_lora.py build this model
            model = load_leaf_model(paths, tree["task"], CPU, FP32, merge=merge).eval()
            torch.testing.assert_close(model(x), expected, atol=atol, rtol=0)

        # several leaves in one batch, sharing language and domain; and each alone, merged into the base
        rows = {"task": expected, "task2": expected_logits(tiny_checkpoint_dir, [*path[:2], tree["task2"]], x),
                "domain": parent_only, "base": base}
        for swap in ("unmerged", "merged"):
            multi = load_model(paths, CPU, FP32, MultiLoRALLaMA, swap=swap).eval()
            loaded = {k: t.clone() for k, t in multi.state_dict().items()}
            for name in ("task", "task2", "domain"):
                multi.add_adapter(name, tree[name], paths.weights)
            multi.select(list(rows))
            torch.testing.assert_close(multi(x.expand(4, -1)), torch.cat(list(rows.values())), atol=atol, rtol=0)
            for name in ("task", "task2"):
                multi.select([name])
                assert multi.merged == (name if swap == "merged" else None)
                torch.testing.assert_close(multi(x), rows[name], atol=atol, rtol=0)
            multi.select(None)
            assert all(torch.equal(t, loaded[k]) for k, t in multi.state_dict().items()), "base not bit-identical"
            # host memory holds the 4 nodes once, not 2 x 3 + 2
            assert multi.memory()["host_adapters"] == 4

        # the child was trained on the base with its ancestors merged: a fresh child (B = 0) is base + ancestors
        import lightning as L

        method = TreeLoRAFinetune(LoRAConfig(r=2, key=True), None, path[:2])
        method.records = [{"sha256": file_sha256(p)} for p in path[:2]]
        child = method.load(L.Fabric(accelerator="cpu", devices=1), paths, FP32).eval()
        torch.testing.assert_close(child(x), parent_only, atol=atol, rtol=0)

    # one flattened PEFT adapter (rank 8 + 4 + 2) on the Hugging Face base gives the same logits
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    load_script("scripts/export_hf.py").convert(checkpoint_dir=tiny_checkpoint_dir, output_dir=tmp_path / "hf")
    run_script("scripts/export_peft.py", "--checkpoint_dir", tiny_checkpoint_dir, "--lora_path", tree["task"],
               "--out_dir", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 14 and config["lora_alpha"] == 14 and "gate_proj" in config["target_modules"]
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").float()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, expected, atol=5e-5 * expected.abs().max().item(), rtol=0)


def test_switching_leaves_reads_only_the_nodes_that_differ(tiny_checkpoint_dir, tree, monkeypatch):
    """1 device slot, 3 nodes in host memory: task and task2 share language and domain; a switch back to task
    after task2 reads task's own file alone."""
    import lit_llama.multi_lora as multi_lora

    paths = resolve_checkpoint(tiny_checkpoint_dir)
    model = load_model(paths, CPU, FP32, MultiLoRALLaMA, max_device_adapters=1, max_host_adapters=3).eval()
    model.add_adapter("task", tree["task"])
    model.add_adapter("task2", tree["task2"])  # its ancestors are in host memory already: task leaves it
    assert [model.node_files[k].resolve() for k in model.host] == [tree[n].resolve() for n in
                                                                     ("language", "domain", "task2")]
    reads = []
    read_node = multi_lora.read_node
    monkeypatch.setattr(multi_lora, "read_node", lambda path: reads.append(path) or read_node(path))
    model.select(["task2"])  # host -> device: nothing read
    assert reads == []
    model.select(["task"])  # task's node left host memory: its file alone is read; the ancestors are there
    assert reads == [tree["task"]]


def test_bad_trees_are_refused_in_one_line(tiny_checkpoint_dir, tree, tmp_path):
    args = ["--checkpoint_dir", tiny_checkpoint_dir, "--data_dir", tmp_path / "unused", "--out_dir", tmp_path / "out"]
    # a cycle: a node twice in the path, or an ancestor after its descendant
    proc = run_script("finetune/lora.py", *args, "--parent_lora", tree["language"], "--parent_lora", tree["language"],
                      check=False)
    assert_clean_error(proc, "--parent_lora", "given twice", "cycle")
    proc = run_script("finetune/lora.py", *args, "--parent_lora", tree["domain"], "--parent_lora", tree["language"],
                      check=False)
    assert_clean_error(proc, "--parent_lora", "trained on top of it", "cycle")
    proc = run_script("finetune/lora.py", *args, "--parent_lora", tree["domain"], check=False)
    assert_clean_error(proc, "was trained on top of", "root first")
    proc = run_script("finetune/lora.py", *args, "--parent_lora", tree["language"], "--lora_dora", "true", check=False)
    assert_clean_error(proc, "--lora_dora with --parent_lora")

    # a parent made for another base of the same shape
    other = make_checkpoint_dir(tmp_path / "other", seed=1)
    model = LoRALLaMA(resolve_checkpoint(other).config, LoRAConfig())
    torch.save(lora_state_dict(model, base_model=base_fingerprint(other / "lit-llama.pth")), tmp_path / "other.pth")
    proc = run_script("finetune/lora.py", *args, "--parent_lora", tmp_path / "other.pth", check=False)
    assert_clean_error(proc, "other.pth was trained on the base model")
    assert not (tmp_path / "out").exists()

    # a leaf whose parent file changed since it was trained: refused by every tool that composes it
    shutil.copy(tree["language"], tmp_path / "saved.pth")
    language = torch.load(tree["language"], weights_only=True)
    language["state_dict"] = {k: t * 1.01 for k, t in language["state_dict"].items()}
    torch.save(language, tree["language"])  # the file the leaf records, changed
    try:
        proc = run_script("generate/lora.py", "--checkpoint_dir", tiny_checkpoint_dir, "--lora_path", tree["task"],
                          "--max_new_tokens", 2, check=False)
        assert_clean_error(proc, str(tree["task"]), "whose file has changed since")
        proc = run_script("scripts/export_peft.py", "--checkpoint_dir", tiny_checkpoint_dir, "--lora_path",
                          tree["task"], "--out_dir", tmp_path / "peft", check=False)
        assert_clean_error(proc, "whose file has changed since")
        model = load_model(resolve_checkpoint(tiny_checkpoint_dir), CPU, FP32, MultiLoRALLaMA, swap="merged")
        with pytest.raises(UserError, match="whose file has changed since"):
            model.add_adapter("task", tree["task"])
    finally:
        shutil.copy(tmp_path / "saved.pth", tree["language"])
