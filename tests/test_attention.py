"""Fused attention against PyTorch in fp64: the case table on the interpreter and the GPU (real sizes: test_gpu.py)."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICES, DTYPES, assert_close_to_reference, poisoned_outputs, rel

from fast3r.backends import Rope, rotate_rope
from fast3r_kernels import attention, tuning

attention_module = importlib.import_module("fast3r_kernels.attention")

# (batch, heads, query tokens, key tokens, head dim, layout, RoPE, LSE): masked tails of 5, 6, 2 and
# 1 rows, a single token, query and key lengths that differ, every head dim (RoPE at 64 and 128 only:
# tests/test_attention.py::test_rope_at_head_dim_32_is_refused), both layouts with and without RoPE.
CASES = [
    (2, 2, 197, 197, 64, "BLHD", True, True),
    (1, 3, 70, 130, 32, "BHLD", False, True),
    (1, 2, 100, 100, 32, "BLHD", False, False),
    (1, 2, 1, 1, 128, "BLHD", True, False),
    (1, 2, 129, 129, 128, "BHLD", True, True),
    (2, 1, 66, 66, 64, "BLHD", False, False),
    (1, 2, 77, 77, 64, "BHLD", True, False),
]


def make_inputs(b, h, lq, lk, d, layout, dtype, device="cpu"):
    """q, k, v in the layout; BLHD q/k/v are strided views of packed projections, as in the model."""
    if layout == "BLHD":
        q = torch.randn(b, lq, 3, h, d, dtype=dtype, device=device)[:, :, 0]
        kv = torch.randn(b, lk, 3, h, d, dtype=dtype, device=device)
        k, v = kv[:, :, 1], kv[:, :, 2]
    else:
        q, k, v = (torch.randn(b, h, n, d, dtype=dtype, device=device) for n in (lq, lk, lk))
    return q, k, v


def reference(q, k, v, scale, layout, pos, dtype):
    """softmax(scale q k^T) v and its row LSE, through PyTorch in ``dtype`` (RoPE in fp32 as RoPE2D does)."""
    if layout == "BLHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if pos is not None:
        rope = Rope(pos, int(pos.max()) + 1, 100.0)
        q, k = rotate_rope(q, rope), rotate_rope(k, rope)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    lse = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * scale, -1)
    return (out.transpose(1, 2) if layout == "BLHD" else out), lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b, h, lq, lk, d, layout, rope, lse", CASES)
def test_forward_and_backward_match_pytorch(b, h, lq, lk, d, layout, rope, lse, dtype, device):
    q, k, v = make_inputs(b, h, lq, lk, d, layout, dtype, device)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    pos = torch.stack([torch.randint(0, 9, (b, lq)), torch.randint(0, 13, (b, lq))], -1).to(device) if rope else None
    scale = d**-0.5 * 1.09
    with poisoned_outputs():
        result = attention(q, k, v, scale=scale, layout=layout, rope_pos=pos, return_lse=lse)
        out, out_lse = result if lse else (result, None)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference(*leaves64, scale, layout, pos, torch.float64)
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double())
    stock, stock_grads = None, (None,) * 3
    if dtype != torch.float32:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        stock, _ = reference(*leaves, scale, layout, pos, dtype)
        stock_grads = torch.autograd.grad(stock, leaves, grad_out)

    assert out.shape == q.shape and out.dtype == dtype
    assert_close_to_reference(out, ref, stock, "output")
    for name, g, r, s in zip("qkv", grads, ref_grads, stock_grads):
        if lk == 1 and name in "qk":  # one key: the softmax is constant, so dq = dk = 0
            assert torch.isfinite(g).all() and g.abs().max() < 1e-5
        else:
            assert_close_to_reference(g, r, s, f"d{name}")
    if lse:
        assert out_lse.shape == (b, h, lq) and out_lse.dtype == torch.float32
        assert rel(out_lse, ref_lse) <= (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("block_n", [64, 128])
def test_long_sequence_tiles(block_n):
    """The 64x128 tiles used from 32k keys on, exercised on a short sequence (full tiles + a tail)."""
    q, k, v = make_inputs(1, 2, 200, 300, 64, "BHLD", torch.bfloat16)
    with poisoned_outputs():
        out, _ = attention_module.attention_forward(q, k, v, 0.125, "BHLD", BLOCK_N=block_n)
    ref, _ = reference(q.double(), k.double(), v.double(), 0.125, "BHLD", None, torch.float64)
    stock, _ = reference(q, k, v, 0.125, "BHLD", None, torch.bfloat16)
    assert_close_to_reference(out, ref, stock, f"BLOCK_N={block_n}")


def test_default_tiles_follow_sequence_length_rope_and_dtype():
    cfg = tuning.attention_forward_blocks
    assert cfg(196, True, torch.bfloat16)["BLOCK_M"] == 256
    assert cfg(196, False, torch.bfloat16)["BLOCK_N"] == 64
    assert cfg(294_000, False, torch.bfloat16)["BLOCK_N"] == 128
    assert cfg(294_000, False, torch.float32)["num_stages"] == 2  # fp32 tiles are twice the bytes


def test_backward_is_deterministic():
    q, k, v = (t.detach().requires_grad_() for t in make_inputs(1, 2, 150, 150, 64, "BLHD", torch.bfloat16))
    pos = torch.randint(0, 10, (1, 150, 2))
    grad_out = torch.randn(1, 150, 2, 64, dtype=torch.bfloat16)
    first = torch.autograd.grad(attention(q, k, v, rope_pos=pos), (q, k, v), grad_out)
    second = torch.autograd.grad(attention(q, k, v, rope_pos=pos), (q, k, v), grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_fusion_temperature_scale_and_default_scale():
    q, k, v = make_inputs(1, 2, 40, 40, 64, "BHLD", torch.float32)
    ref_default, _ = reference(q.double(), k.double(), v.double(), 64**-0.5, "BHLD", None, torch.float64)
    assert rel(attention(q, k, v, layout="BHLD"), ref_default) <= 1e-5
    sharper = attention(q, k, v, layout="BHLD", scale=64**-0.5 * 1.3)
    assert rel(sharper, ref_default) > 1e-3


@pytest.mark.parametrize(
    "change, error, message",
    [
        ("head_dim", ValueError, "head dim 48 is not supported"),
        ("length", ValueError, "do not match"),
        ("dtype", TypeError, "pass q, k, v in one dtype"),
        ("stride", ValueError, "contiguous in its last"),
        ("layout", ValueError, "layout="),
        ("rope_float", TypeError, "integer"),
        ("rope_shape", ValueError, "expected"),
        ("rope_negative", ValueError, ">= 0"),
        ("rope_cross", ValueError, "self-attention"),
        ("scale", ValueError, "positive finite"),
        ("rank", ValueError, "4-D"),
        ("rope_d32", ValueError, "RoPE at head dim 32 is not supported"),
        ("rope_num_pos", ValueError, "rope_num_pos="),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(change, error, message):
    q, k, v = make_inputs(1, 2, 16, 16, 64, "BLHD", torch.bfloat16)
    kwargs = {}
    if change == "head_dim":
        q, k, v = (torch.randn(1, 16, 2, 48, dtype=torch.bfloat16) for _ in range(3))
    elif change == "length":
        v = torch.randn(1, 17, 2, 64, dtype=torch.bfloat16)
    elif change == "dtype":
        k = k.float()
    elif change == "stride":
        q = torch.randn(1, 16, 2, 128, dtype=torch.bfloat16)[..., ::2]
    elif change == "layout":
        kwargs["layout"] = "LBHD"
    elif change == "rope_float":
        kwargs["rope_pos"] = torch.rand(1, 16, 2)
    elif change == "rope_shape":
        kwargs["rope_pos"] = torch.randint(0, 4, (1, 16, 3))
    elif change == "rope_negative":
        kwargs["rope_pos"] = -torch.randint(1, 4, (1, 16, 2))
    elif change == "rope_cross":
        k, v = (torch.randn(1, 20, 2, 64, dtype=torch.bfloat16) for _ in range(2))
        kwargs["rope_pos"] = torch.randint(0, 4, (1, 16, 2))
    elif change == "scale":
        kwargs["scale"] = -1.0
    elif change == "rank":
        q = q[0]
    elif change == "rope_d32":
        q, k, v = (torch.randn(1, 16, 2, 32, dtype=torch.bfloat16) for _ in range(3))
        kwargs["rope_pos"] = torch.randint(0, 4, (1, 16, 2))
    elif change == "rope_num_pos":
        kwargs.update(rope_pos=torch.randint(0, 4, (1, 16, 2)), rope_num_pos=0)
    with pytest.raises(error, match=message):
        attention(q, k, v, **kwargs)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_inputs(1, 2, 16, 16, 64, "BLHD", torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA GPUs, or on the CPU only under"):
        attention(q, k, v)


def test_unaligned_views_are_copied_once_and_still_correct():
    """A token stride that is not 16-byte aligned cannot feed TMA: the launcher copies the view."""
    base = torch.randn(1, 30, 2 * 64 + 1, dtype=torch.float32)
    q = base[:, :, :128].view(1, 30, 2, 64)  # token stride 129 floats
    k, v = (torch.randn(1, 30, 2, 64) for _ in range(2))
    ref, _ = reference(q.double(), k.double(), v.double(), 0.125, "BLHD", None, torch.float64)
    assert rel(attention(q, k, v, scale=0.125), ref) <= 1e-5


def test_incoming_gradient_with_a_non_unit_last_stride():
    """Regression: dO with last stride 2 was read as if packed (dq/dk/dv relative error 1.41)."""
    q, k, v = (t.detach().requires_grad_() for t in make_inputs(1, 2, 70, 70, 64, "BLHD", torch.float32))
    out = attention(q, k, v)
    grad_out = torch.randn(1, 70, 2, 128)[..., ::2]  # stride(-1) == 2
    assert grad_out.stride(-1) == 2
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference(*leaves64, 64**-0.5, "BLHD", None, torch.float64)
    for g, r in zip(grads, torch.autograd.grad(ref, leaves64, grad_out.double())):
        assert rel(g, r) <= 1e-5


def test_training_after_inference_reuses_rope_tables():
    """Regression: tables cached under inference_mode could not be saved for backward."""
    q, k, v = make_inputs(1, 2, 40, 40, 64, "BLHD", torch.float32)
    pos = torch.randint(0, 7, (1, 40, 2))
    with torch.inference_mode():
        attention(q, k, v, rope_pos=pos, rope_num_pos=7)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, rope_pos=pos, rope_num_pos=7)
    grads = torch.autograd.grad(out.sum(), leaves)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_known_position_count_matches_the_measured_one_and_clamps():
    """rope_num_pos (no device sync) gives the same result; positions past it are clamped to the table."""
    q, k, v = make_inputs(1, 2, 50, 50, 64, "BLHD", torch.float32)
    pos = torch.randint(0, 9, (1, 50, 2))
    measured = attention(q, k, v, rope_pos=pos)
    assert torch.equal(attention(q, k, v, rope_pos=pos, rope_num_pos=9), measured)
    assert torch.equal(attention(q, k, v, rope_pos=pos + 5, rope_num_pos=3),
                       attention(q, k, v, rope_pos=torch.full_like(pos, 2)))


def test_autocast_casts_inputs_like_sdpa():
    q, k, v = make_inputs(1, 2, 30, 30, 64, "BLHD", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    ref, _ = reference(q.double(), k.double(), v.double(), 64**-0.5, "BLHD", None, torch.float64)
    assert rel(out, ref) <= 1e-2
