"""Training speed levers (issue 10, point 5): chunked cross-entropy computes the plain loss and gradients, and
--group_by_length batches show every example once per epoch, deterministically, with less padding."""

import pytest
import torch

from lit_llama import training
from lit_llama.lora import LoRAConfig, LoRALLaMA, mark_only_lora_as_trainable
from lit_llama.model import LLaMA


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
    monkeypatch.setattr(training, "CE_CHUNK_ROWS", 7)
    monkeypatch.setattr(training.chunked_cross_entropy, "__defaults__", (7,))
    torch.manual_seed(0)
    if kind == "full":
        model = LLaMA.from_name("tiny")
    else:
        model = LoRALLaMA.from_name("tiny", lora=LoRAConfig(dropout=0.3, head=True, mlp=True))
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
    training.grouped_epoch_order.cache_clear()
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
