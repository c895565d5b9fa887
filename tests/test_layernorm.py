"""LayerNorm (and its fused residual add) against PyTorch in fp64, in the Triton interpreter."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICES, DTYPES, assert_close_to_reference, poisoned_outputs

from fast3r_kernels import FusedLayerNorm, layer_norm

layernorm_module = importlib.import_module("fast3r_kernels.layernorm")

# (rows, width, residual, affine): odd widths and row counts leave masked tails in both directions.
CASES = [(37, 1024, False, True), (5, 33, True, True), (3, 8192, True, True), (9, 1000, False, False), (1, 3, False, True)]


def reference(x, weight, bias, eps, residual):
    s = x + residual if residual is not None else x
    return s, F.layer_norm(s, (x.shape[-1],), weight, bias, eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, width, fused, affine", CASES)
def test_forward_and_backward_match_pytorch(rows, width, fused, affine, dtype, default_device):
    eps = 1e-5 if fused else 1e-6
    x = torch.randn(rows, width, dtype=dtype) * 3 + 1
    w = (1 + 0.3 * torch.randn(width, dtype=dtype)) if affine else None
    b = (0.5 * torch.randn(width, dtype=dtype)) if affine else None
    res = torch.randn(rows, width, dtype=dtype) if fused else None
    leaves = [t.requires_grad_() for t in (x, w, b, res) if t is not None]
    with poisoned_outputs():
        out = layer_norm(x, w, b, eps, residual=res)
        outs = out if fused else (None, out)
        grad_y = torch.randn(rows, width, dtype=dtype)
        grad_s = torch.randn(rows, width, dtype=dtype) if fused else None
        grads = torch.autograd.grad([o for o in outs if o is not None],
                                    leaves, [g for g in (grad_s, grad_y) if g is not None])

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    args64 = iter(leaves64)
    x64, w64, b64, r64 = (next(args64) if t is not None else None for t in (x, w, b, res))
    s64, y64 = reference(x64, w64, b64, eps, r64)
    ref_grads = torch.autograd.grad([s64, y64] if fused else [y64], leaves64,
                                    [grad_s.double(), grad_y.double()] if fused else [grad_y.double()])
    # PyTorch's own op in the same dtype; in fp32 it bounds ill-conditioned cases (width 3: dx nearly cancels).
    stock_leaves = [t.detach().requires_grad_() for t in leaves]
    it = iter(stock_leaves)
    xs, ws, bs, rs = (next(it) if t is not None else None for t in (x, w, b, res))
    stock_s, stock_y = reference(xs, ws, bs, eps, rs)
    stock_grads = torch.autograd.grad([stock_s, stock_y] if fused else [stock_y], stock_leaves,
                                      [grad_s, grad_y] if fused else [grad_y])

    y = outs[1]
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_to_reference(y, y64, None if dtype == torch.float32 else stock_y, "y")
    if fused:
        assert_close_to_reference(outs[0], s64, None if dtype == torch.float32 else (xs + rs), "x + residual")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close_to_reference(g, r, stock_grads[i] if stock_grads else None, f"gradient {i}")


def test_higher_rank_input_and_backward_bands():
    x = torch.randn(2, 3, 70, 64, requires_grad=True)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    y = layer_norm(x, w, b, 1e-6)
    ref = F.layer_norm(x.double(), (64,), w.double(), b.double(), 1e-6)
    assert y.shape == x.shape and (y.double() - ref).abs().max() < 1e-5
    _, _, mean, rstd = layernorm_module.layer_norm_forward(x.detach(), w.detach(), b.detach(), 1e-6)
    dy = torch.randn_like(x)
    bands = [layernorm_module.layer_norm_backward(dy, x.detach(), w.detach(), mean, rstd, rows_per_program=r)
             for r in (8, 64, 1000)]
    for dx, dw, db in bands[1:]:  # the band size changes only how partial sums are grouped
        torch.testing.assert_close(dx, bands[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dw, bands[0][1], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(db, bands[0][2], rtol=1e-5, atol=1e-4)


def test_module_is_a_state_dict_compatible_drop_in():
    ln = torch.nn.LayerNorm(96, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    fused = FusedLayerNorm.from_layer_norm(ln)
    assert fused.weight is ln.weight and fused.bias is ln.bias
    assert fused.state_dict().keys() == ln.state_dict().keys()
    x = torch.randn(4, 7, 96)
    torch.testing.assert_close(fused(x), ln(x), rtol=1e-5, atol=1e-5)
    res = torch.randn_like(x)
    s, y = fused(x, residual=res)
    torch.testing.assert_close(s, x + res)
    torch.testing.assert_close(y, ln(x + res), rtol=1e-5, atol=1e-5)
    reloaded = FusedLayerNorm(96, eps=1e-5)
    reloaded.load_state_dict(ln.state_dict())
    torch.testing.assert_close(reloaded(x), ln(x), rtol=1e-5, atol=1e-5)


def test_module_runs_the_pytorch_op_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ln = torch.nn.LayerNorm(32)
    x, res = torch.randn(3, 32), torch.randn(3, 32)
    fused = FusedLayerNorm.from_layer_norm(ln)
    torch.testing.assert_close(fused(x), ln(x))
    s, y = fused(x, residual=res)
    torch.testing.assert_close(s, x + res)
    torch.testing.assert_close(y, ln(x + res))


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: (torch.randn(4, 8193), None, None, None), ValueError, "1..8192"),
        (lambda: (torch.randn(4, 16), torch.randn(15), None, None), ValueError, "expected \\(16,\\)"),
        (lambda: (torch.randn(4, 16), None, None, torch.randn(4, 15)), ValueError, "residual has shape"),
        (lambda: (torch.randint(0, 3, (4, 16)), None, None, None), TypeError, "dtype"),
        (lambda: (torch.randn(4, 16), torch.randn(32)[::2], None, None), ValueError, "contiguous"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(make, error, message):
    x, w, b, res = make()
    with pytest.raises(error, match=message):
        layer_norm(x, w, b, residual=res)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_gives_the_dtype_nn_layer_norm_gives(device):
    """Regression: under bf16 autocast on CUDA FusedLayerNorm returned bf16 where nn.LayerNorm returns fp32."""
    ln = torch.nn.LayerNorm(64, device=device)
    fused = FusedLayerNorm.from_layer_norm(ln)
    x = torch.randn(5, 64, dtype=torch.bfloat16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        want, got = ln(x), fused(x)
        total, normed = layer_norm(x, ln.weight, ln.bias, 1e-5, residual=torch.randn_like(x))
    assert want.dtype == got.dtype == normed.dtype == total.dtype
    assert device == "cpu" or got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_fp32_rows_whose_squares_overflow_are_normalized(magnitude, default_device):
    """Such rows used to come back as zeros (the variance overflowed, so rstd was 0); torch gives NaN or inf.
    Decided: the right result (LayerNorm is scale-free but for eps), from the row's variance over its largest
    entry; fp64 is the reference."""
    x = (torch.randn(7, 1000) * magnitude).requires_grad_()
    w, b = 1 + 0.3 * torch.randn(1000), 0.5 * torch.randn(1000)
    with poisoned_outputs():
        y = layer_norm(x, w, b, 1e-6)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x64 = x.detach().double().requires_grad_()
    y64 = F.layer_norm(x64, (1000,), w.double(), b.double(), 1e-6)
    (dx64,) = torch.autograd.grad(y64, x64, torch.ones_like(y64))
    assert_close_to_reference(y, y64, None, "y")
    assert torch.isfinite(dx).all() and (dx.double() - dx64).abs().max() <= 1e-5 * dx64.abs().max() + 1e-30
