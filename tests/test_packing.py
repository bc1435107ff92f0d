"""--packing (batches.pack_batch, packed_attention): each example in a packed row has the loss it has alone,
for the plain model, LoRA and the adapter; a packed run is the unpacked run (the same examples per micro-batch)
up to float rounding, and resumes bit for bit. --compile: compiled runs repeat themselves and resume bit for
bit. (Packed runs under FSDP: tests/test_fsdp.py.)"""

import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_at_iteration, load_script, make_arithmetic_run

from lit_llama import batches, training
from lit_llama.adapter import AdapterConfig, AdapterLLaMA
from lit_llama.lora import LoRAConfig, LoRAFinetune, LoRALLaMA
from lit_llama.model import Config, LLaMA

LOSS_ATOL = 1e-5  # float32 losses of about 6 (a 512-token vocabulary): a few ulps of rounding in the attention


def some_examples(lengths, vocab=512):
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length in lengths:
        input_ids = torch.randint(0, vocab, (length,), generator=generator)
        labels = input_ids.clone()
        labels[: length // 3] = training.IGNORE_INDEX  # a prompt that is not scored
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def example_loss(logits, labels):
    """One example's mean cross-entropy over its scored next tokens."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=training.IGNORE_INDEX)


def models():
    tiny = Config.from_name("tiny-gqa")
    lora = LoRALLaMA(tiny, LoRAConfig(r=4, alpha=8, dropout=0.0, mlp=True))
    adapter = AdapterLLaMA(AdapterConfig.from_config(tiny, adapter_prompt_length=5, adapter_start_layer=0))
    with torch.no_grad():  # the methods' layers away from their do-nothing start
        for name, p in list(lora.named_parameters()) + list(adapter.named_parameters()):
            if "lora_B" in name or "gating" in name:
                p.normal_(std=0.5)
    return {"plain": LLaMA(tiny), "lora": lora, "adapter": adapter}


@pytest.mark.parametrize("one_row", [True, False], ids=["one row", "rows"])
@pytest.mark.parametrize("kind", ["plain", "lora", "adapter"])
def test_each_packed_example_has_its_own_loss(kind, one_row):
    """Six examples in one row of 132 tokens, or in three rows of 48 and padding (compiled blocks' layout): each
    example's loss from its packed
    row equals its loss alone (so attention never crossed examples and positions restarted); the micro-batch's
    loss and gradients equal the padded batch's."""
    torch.manual_seed(0)
    model = models()[kind].eval()
    examples = some_examples([30, 12, 25, 7, 40, 18])
    input_ids, labels, positions = training.pack_batch(examples, max_seq_length=48, one_row=one_row)
    assert input_ids.shape == ((1, 132) if one_row else (3, 48)) and positions.shape == input_ids.shape
    with torch.no_grad():
        packed_logits = model(input_ids, positions=positions)
        packed = {}
        for row in range(len(input_ids)):
            starts = (positions[row] == 0).nonzero().flatten().tolist() + [input_ids.size(1)]
            for start, end in zip(starts, starts[1:]):
                packed[tuple(input_ids[row, start:end].tolist())] = (packed_logits[row, start:end], start, end, row)
        for example in examples:
            alone = model(example["input_ids"].unsqueeze(0))[0]
            logits, start, end, row = packed.pop(tuple(example["input_ids"].tolist()))
            assert (labels[row, start] == training.IGNORE_INDEX).item()  # nothing from the example before
            want, got = example_loss(alone, example["labels"]), example_loss(logits, example["labels"])
            assert abs(got.item() - want.item()) <= LOSS_ATOL
        # what is left: in rows, the padding ending two (40 + 7 and 25 + 12 tokens; 30 + 18 fills its row), unscored
        assert [len(tokens) for tokens in packed] == ([] if one_row else [1, 11])
        assert all(set(tokens) == {0} for tokens in packed)
        assert (labels != training.IGNORE_INDEX).sum() == sum((e["labels"][1:] != training.IGNORE_INDEX).sum()
                                                              for e in examples)
    model.train()
    grads = []
    for batch in (training.pad_batch(examples, 48), (input_ids, labels, positions)):
        model.zero_grad(set_to_none=True)
        loss = training.compute_loss(model, *batch[:2], positions=batch[2] if len(batch) == 3 else None)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = grads
    assert abs(packed_loss - padded_loss).item() <= LOSS_ATOL
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=LOSS_ATOL * grad.abs().max().item(), rtol=0)


def test_one_row_holds_every_example_in_order_without_padding():
    lengths = [100, 60, 200, 30, 256, 90, 300]  # the last is cut at 256
    examples = some_examples(lengths)
    input_ids, labels, positions = training.pack_batch(examples, max_seq_length=256)
    assert input_ids.shape == (1, 992) and (positions == 0).nonzero()[:, 1].tolist() == [0, 100, 160, 360, 390,
                                                                                          646, 736]
    assert torch.equal(input_ids[0, 736:], examples[-1]["input_ids"][:256])
    # the row is longer than the model's block_size (256): each example is a sequence of its own, and fits it
    model = LLaMA(Config.from_name("tiny-gqa")).eval()
    with torch.no_grad():
        row = model(input_ids, positions=positions)[0]
        alone = model(examples[2]["input_ids"].unsqueeze(0))[0]
    torch.testing.assert_close(row[160:360], alone, atol=1e-5 * alone.abs().max().item(), rtol=0)


def test_packed_rows_hold_every_example_once_first_fit_decreasing():
    lengths = [100, 60, 200, 30, 256, 90, 300]  # the last is cut at 256
    input_ids, labels, positions = training.pack_batch(some_examples(lengths), max_seq_length=256, one_row=False)
    starts = positions == 0
    real = [(positions[r] == 0).nonzero().flatten().tolist() for r in range(len(positions))]
    # first-fit decreasing: [256], [256], [200, 30], [100, 90, 60] (padded to the longest row, 256)
    assert input_ids.shape == (4, 256) and starts.sum().item() == 7 + 2  # two rows end in padding
    assert real[2][:2] == [0, 200] and real[3] == [0, 100, 190, 250]


def test_rows_are_as_long_as_the_least_padding_needs():
    """Rows of max_seq_length are not always best: 400, 150, 100 and 50 tokens make two rows of 500 positions at
    a capacity of 512 ([400, 100], [150, 50]), two of 400 at the longest example's ([400], [150, 100, 50])."""
    assert batches.pack_rows([400, 150, 100, 50], 512) == [[0], [1, 2, 3]]
    input_ids, labels, positions = batches.pack_batch(some_examples([150, 400, 50, 100]), max_seq_length=512,
                                                      one_row=False)
    assert input_ids.shape == (2, 400) and (positions == 0).sum().item() == 4 + 1  # one row ends in padding
    # as many positions either way (300): the shorter rows, whose attention is a third of one row's
    assert batches.pack_rows([100, 100, 100], 512) == [[0], [1], [2]]
    assert batches.pack_rows([100, 100, 90], 512) == [[0, 1, 2]]  # 290 positions, against 300
    assert batches.pack_rows([300, 300], 512) == [[0], [1]]


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    return make_arithmetic_run(tmp_path_factory.mktemp("packing"))


def run_args(arithmetic_run, **extra):
    checkpoint_dir, data_dir = arithmetic_run
    return dict(checkpoint_dir=checkpoint_dir, data_dir=data_dir, precision="32-true", batch_size=4, micro_batch_size=2,
                eval_interval=0, eval_iters=1, warmup_iters=1, **extra)


def final_weights(out_dir):
    state = torch.load(out_dir / LoRAFinetune.final_name)["state_dict"]
    return {key: t for key, t in state.items() if isinstance(t, torch.Tensor)}


def test_packed_run_is_the_unpacked_run_and_resumes_exactly(arithmetic_run, tmp_path, monkeypatch):
    """Two examples of about 100 tokens per micro-batch share one row of 256. Without dropout the packed run
    ends where the padded one does (up to float rounding); interrupted and resumed, bit for bit where it ends."""
    finetune = load_script("finetune/lora.py")
    args = run_args(arithmetic_run, max_iters=8, save_interval=1, lora_dropout=0.0, lora_mlp=True, packing=True)
    finetune.setup(out_dir=tmp_path / "packed", **args)
    interrupt_at_iteration(monkeypatch, 5, finetune.setup, out_dir=tmp_path / "resumed", **args)  # saved at 4
    finetune.setup(out_dir=tmp_path / "resumed", resume=True, **args)
    finetune.setup(out_dir=tmp_path / "padded", **{**args, "packing": False})
    packed, resumed, padded = (final_weights(tmp_path / name) for name in ("packed", "resumed", "padded"))
    for name, weight in packed.items():
        assert torch.equal(resumed[name], weight), name
        torch.testing.assert_close(weight, padded[name], atol=1e-5, rtol=0)


@pytest.mark.slow  # compiling on a CPU: about a minute on 2 shared cores
def test_compiled_runs_repeat_and_resume_exactly(arithmetic_run, tmp_path, monkeypatch):
    """With dropout, whose compiled draws are not eager's: two compiled runs are the same, and one interrupted
    and resumed ends bit for bit where the uninterrupted one does; without dropout it is the eager run."""
    finetune = load_script("finetune/lora.py")
    args = run_args(arithmetic_run, max_iters=6, save_interval=1, lora_dropout=0.1, compile=True, packing=True)
    finetune.setup(out_dir=tmp_path / "compiled", **args)
    finetune.setup(out_dir=tmp_path / "again", **args)
    interrupt_at_iteration(monkeypatch, 3, finetune.setup, out_dir=tmp_path / "resumed", **args)  # saved at 2
    finetune.setup(out_dir=tmp_path / "resumed", resume=True, **args)
    compiled, again, resumed = (final_weights(tmp_path / name) for name in ("compiled", "again", "resumed"))
    for name, weight in compiled.items():
        assert torch.equal(again[name], weight) and torch.equal(resumed[name], weight), name
    no_dropout = {**args, "lora_dropout": 0.0}
    finetune.setup(out_dir=tmp_path / "compiled-0", **no_dropout)
    finetune.setup(out_dir=tmp_path / "eager-0", **{**no_dropout, "compile": False})
    compiled, eager = final_weights(tmp_path / "compiled-0"), final_weights(tmp_path / "eager-0")
    for name, weight in eager.items():
        torch.testing.assert_close(compiled[name], weight, atol=1e-5, rtol=0)
