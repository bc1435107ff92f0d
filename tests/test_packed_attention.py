"""lit_llama.packed_attention: the three ways of attending within each packed example agree: SDPA example by
example (CPUs), SDPA with the block mask (GPUs, compiled blocks) and the variable-length kernel's call (its
flattening and offsets, here through a reference kernel; on a CUDA GPU through flash attention itself); and
each device gets the way measured fastest there."""

import pytest
import torch
import torch.nn.functional as F

from lit_llama import packed_attention as pa

ROWS = [[(0, 3), (3, 9), (9, 10), (10, 16)], [(0, 16)], [(0, 7), (7, 12), (12, 16)]]  # three rows of 16 tokens


def qkv(dtype=torch.float32, device="cpu", heads=4, head_size=8):
    generator = torch.Generator().manual_seed(0)
    shape = (len(ROWS), heads, 16, head_size)
    return [torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(3)]


def spans_of(rows, length=16):
    positions = torch.tensor([[t - s for s, e in row for t in range(s, e)] for row in rows])
    assert positions.size(1) == length
    return pa.packed_spans(positions)


def test_spans_and_offsets_from_positions():
    spans = spans_of(ROWS)
    assert spans == ROWS and spans.longest == 16
    assert spans.offsets(torch.device("cpu")).tolist() == [0, 3, 9, 10, 16, 32, 39, 44, 48]
    assert spans.offsets(torch.device("cpu")) is spans.offsets(torch.device("cpu"))  # made once per forward
    assert spans.mask(torch.device("cpu")) is spans.mask(torch.device("cpu"))
    assert spans.mask(torch.device("cpu")).shape == (3, 1, 16, 16)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """What flash attention's variable-length kernel computes, in plain PyTorch: (total, heads, hs) tensors,
    each [cu[i], cu[i+1]) a sequence of its own, causal."""
    assert cu_q is cu_k and cu_q.dtype == torch.int32 and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        out[s:e] = F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)),
                                                  is_causal=True).transpose(0, 1)
    return out


def test_the_variable_length_call_equals_attention_example_by_example(monkeypatch):
    """The GPU path's flattening to (B * T, heads, hs), its offsets and its way back, run here through a
    reference of the kernel: the same values as SDPA example by example (the same per-example products; only
    the memory layout differs, so within float32 rounding)."""
    q, k, v = qkv()
    spans = spans_of(ROWS)
    by_example = pa.attend_example_by_example(q, k, v, spans)
    monkeypatch.setattr(pa, "variable_length_kernel", lambda: reference_varlen)
    flat = pa.attend_variable_length(q, k, v, spans)
    assert flat.shape == by_example.shape
    torch.testing.assert_close(flat, by_example, rtol=1e-6, atol=1e-6)


def test_the_mask_is_the_same_attention():
    q, k, v = qkv()
    spans = spans_of(ROWS)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=spans.mask(q.device))
    torch.testing.assert_close(masked, pa.attend_example_by_example(q, k, v, spans), rtol=1e-5, atol=1e-6)


def test_each_device_gets_its_way():
    """CPUs: example by example; GPUs: the mask for rows shorter than VARIABLE_LENGTH_FROM; from there the
    variable-length kernel in half precision where this PyTorch has it, else example by example."""
    long = pa.VARIABLE_LENGTH_FROM
    assert pa.way_for("cpu", torch.bfloat16, 4 * long, True) == "example by example"
    assert pa.way_for("cuda", torch.bfloat16, long - 1, True) == "mask"
    assert pa.way_for("cuda", torch.float32, long - 1, True) == "mask"
    assert pa.way_for("cuda", torch.bfloat16, long, True) == "variable length"
    assert pa.way_for("cuda", torch.float16, long, True) == "variable length"
    assert pa.way_for("cuda", torch.float32, long, True) == "example by example"  # no float32 flash kernel
    assert pa.way_for("cuda", torch.bfloat16, long, False) == "example by example"  # PyTorch before 2.9
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) >= (2, 9):  # the kernel's causal flag found in this PyTorch's signature
        assert pa.variable_length_kernel() is not None
    q, k, v = qkv()  # on this CPU packed_attention attends example by example: bit for bit the same
    spans = spans_of(ROWS)
    assert torch.equal(pa.packed_attention(q, k, v, spans), pa.attend_example_by_example(q, k, v, spans))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's variable-length kernel needs CUDA")
@pytest.mark.parametrize("way", ["variable length", "mask"])
def test_the_gpu_ways_on_cuda(way):
    """On a GPU in bf16: each GPU way against SDPA example by example, forward and gradients, within bf16
    rounding of values of about 1."""
    q, k, v = (t.requires_grad_() for t in qkv(torch.bfloat16, "cuda", heads=8, head_size=64))
    spans = spans_of(ROWS)
    if way == "variable length":
        assert pa.variable_length_kernel() is not None
        out = pa.attend_variable_length(q, k, v, spans)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=spans.mask(q.device))
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    reference_inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    want = pa.attend_example_by_example(*reference_inputs, spans)
    want_grads = torch.autograd.grad(want.float().square().sum(), reference_inputs)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)
