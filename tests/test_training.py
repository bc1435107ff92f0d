"""lit_llama/training.py, the loop: the loss (chunked cross-entropy computes the plain loss and gradients), the
batches (--group_by_length shows every example once per epoch, deterministically, with less padding) and the
loop's config."""

import pytest
import torch
from conftest import assert_clean_error, interrupt_at_iteration, load_script, make_arithmetic_run, run_script

from lit_llama import training
from lit_llama.batches import grouped_epoch_order
from lit_llama.lora import LoRAConfig, LoRAFinetune, LoRALLaMA, mark_only_lora_as_trainable
from lit_llama.model import Config, LLaMA


def loss_and_grads(model, input_ids, labels, chunked_ce):
    model.zero_grad(set_to_none=True)
    loss = training.compute_loss(model, input_ids, labels, chunked_ce=chunked_ce)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["full", "lora_head"])
def test_chunked_cross_entropy_gives_the_plain_loss_and_gradients(kind, monkeypatch):
    """Several chunks (7 positions each), a prompt and padding that are not scored; every weight trains
    (full), or LoRA with dropout on every layer including the output layer (its recomputation must draw the
    same dropout mask)."""
    monkeypatch.setattr(training.chunked_cross_entropy, "__defaults__", (7,))  # chunk_rows
    torch.manual_seed(0)
    if kind == "full":
        model = LLaMA.from_name("tiny")
    else:
        model = LoRALLaMA(Config.from_name("tiny"), LoRAConfig(dropout=0.3, head=True, mlp=True))
        mark_only_lora_as_trainable(model)
        with torch.no_grad():
            for layer in model.lora_layers():
                layer.lora_B.normal_(std=0.1)  # B = 0 would give A no gradient to compare
    input_ids = torch.randint(0, 512, (3, 20))
    labels = input_ids.clone()
    labels[0, :6] = training.IGNORE_INDEX  # a prompt
    labels[2, 15:] = training.IGNORE_INDEX  # padding
    torch.manual_seed(1)
    plain_loss, plain_grads = loss_and_grads(model, input_ids, labels, chunked_ce=False)
    torch.manual_seed(1)
    chunked_loss, chunked_grads = loss_and_grads(model, input_ids, labels, chunked_ce=True)
    assert (labels[:, 1:] != training.IGNORE_INDEX).sum() > 3 * 7  # more than three chunks
    assert plain_grads.keys() == chunked_grads.keys() and len(plain_grads) > 0
    assert (chunked_loss - plain_loss).abs().item() <= 1e-6
    for name, grad in plain_grads.items():
        assert (chunked_grads[name] - grad).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_summed_cross_entropy_is_torchs_with_its_gradients(dtype, weighted):
    """The in-place loss of compute_loss against F.cross_entropy: the loss and the gradients of the output
    layer's input and weight, from logits of either dtype (bf16 ones are cast to float32 first), with and
    without per-position weights (several tasks at once). float32 rounding of sums over 512 logits: well under
    1e-6 of the values' scale."""
    torch.manual_seed(0)
    hidden = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(16, 512, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.mul_(8)  # logits of some magnitude: the row maximum matters
    targets = torch.randint(0, 512, (40,))
    weights = torch.rand(40) if weighted else None

    def grads(loss):
        hidden.grad = head.weight.grad = None
        loss.backward()
        return loss.detach(), hidden.grad.float(), head.weight.grad.float()

    expected_losses = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")
    expected = grads(expected_losses.sum() if weights is None else (expected_losses * weights).sum())
    ours = grads(training._summed_cross_entropy(head, hidden, targets, weights))
    for a, b in zip(ours, expected):
        assert (a - b).abs().max().item() <= 1e-6 * b.abs().max().item()


def epochs_of(n, batch, iters, world_size, lengths, seed=3):
    """The stream of examples all devices see, iteration by iteration, cut into epochs of n."""
    stream = []
    for iter_num in range(iters):
        for rank in range(world_size):
            stream += training.batch_indices(n, batch, iter_num, rank, world_size, seed, lengths)
    return [stream[e * n : (e + 1) * n] for e in range(len(stream) // n)]


@pytest.mark.parametrize("n, batch, world_size", [(103, 4, 1), (50, 3, 2), (300, 2, 1), (5, 4, 1)])
def test_grouped_batches_show_every_example_once_per_epoch(n, batch, world_size):
    lengths = tuple(torch.randint(5, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist())
    iters = 4 * n // (batch * world_size) + 1
    epochs = epochs_of(n, batch, iters, world_size, lengths)
    assert len(epochs) >= 4
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs_of(n, batch, iters, world_size, lengths) == epochs  # a pure function: resumable
    grouped_epoch_order.cache_clear()
    assert epochs_of(n, batch, iters, world_size, lengths) == epochs
    assert epochs_of(n, batch, iters, world_size, lengths, seed=4) != epochs


def padding(n, batch, lengths):
    batches = [training.batch_indices(n, batch, i, 0, 1, 3, lengths) for i in range(4 * n // batch)]
    real_lengths = [[all_lengths[i] for i in b] for b in batches]
    return sum(len(b) * max(b) - sum(b) for b in real_lengths)


all_lengths = tuple(torch.randint(20, 512, (1000,), generator=torch.Generator().manual_seed(0)).tolist())


def test_grouped_batches_have_less_padding_and_mix_lengths_within_a_step():
    n, batch = 1000, 4  # epochs do not end on a micro-batch boundary
    assert padding(n, batch, all_lengths) < 0.1 * padding(n, batch, None)
    # micro-batches in a row are not sorted: an optimizer step accumulating 8 of them mixes lengths
    longest = [max(all_lengths[i] for i in training.batch_indices(n, batch, k, 0, 1, 3, all_lengths)) for k in range(8)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    assert max(longest) - min(longest) > 100


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    return make_arithmetic_run(tmp_path_factory.mktemp("levers"))


def run_args(arithmetic_run, **extra):
    checkpoint_dir, data_dir = arithmetic_run
    return dict(checkpoint_dir=checkpoint_dir, data_dir=data_dir, precision="32-true", batch_size=4, micro_batch_size=2,
                eval_interval=0, eval_iters=1, warmup_iters=1, **extra)


def final_weights(out_dir, name):
    state = torch.load(out_dir / name)
    state = state.get("state_dict", state)  # LoRA files keep the tensors under "state_dict"
    return {key: t for key, t in state.items() if isinstance(t, torch.Tensor)}


def test_levers_resume_exactly(arithmetic_run, tmp_path, monkeypatch):
    """A LoRA run with both levers, interrupted between two saves and resumed, ends bit for bit where the
    uninterrupted run ends (the grouped batches are a function of the data, the seed and the iteration)."""
    finetune = load_script("finetune/lora.py")
    args = run_args(arithmetic_run, max_iters=24, save_interval=2, lora_dropout=0.1, chunked_ce=True,
                    group_by_length=True)
    finetune.setup(out_dir=tmp_path / "straight", **args)
    interrupt_at_iteration(monkeypatch, 14, finetune.setup, out_dir=tmp_path / "resumed", **args)  # saved at 12
    finetune.setup(out_dir=tmp_path / "resumed", resume=True, **args)
    straight = final_weights(tmp_path / "straight", LoRAFinetune.final_name)
    resumed = final_weights(tmp_path / "resumed", LoRAFinetune.final_name)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=0, rtol=0)


@pytest.mark.parametrize("script", ["lora", "adapter", "full"])
def test_chunked_ce_gives_the_same_run(script, arithmetic_run, tmp_path):
    """The same flag in every finetune script; with it a run ends where the plain one does (up to float rounding)."""
    finetune = load_script(f"finetune/{script}.py")
    args = run_args(arithmetic_run, max_iters=4, save_interval=0, group_by_length=True)
    finetune.setup(out_dir=tmp_path / "plain", **args)
    finetune.setup(out_dir=tmp_path / "chunked", chunked_ce=True, **args)
    plain = final_weights(tmp_path / "plain", f"lit-llama-{script}-finetuned.pth")
    chunked = final_weights(tmp_path / "chunked", f"lit-llama-{script}-finetuned.pth")
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("flag", ["--chunked_ce", "--group_by_length", "--packing", "--compile"])
def test_lever_flags_are_documented_and_checked(flag):
    for script in ("lora", "adapter", "full"):
        assert flag in run_script(f"finetune/{script}.py", "--help").stdout
    assert_clean_error(run_script("finetune/lora.py", flag, "maybe", check=False), flag.lstrip("-"))


def test_training_config_is_built_with_keywords():
    with pytest.raises(TypeError):
        training.TrainingConfig(3e-4, 4, 2, 8, 1.0, 1, 0.0, 64, 1, 1, 1)  # the positional form is gone
