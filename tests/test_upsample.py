"""Bilinear upsampling (align_corners=True) against PyTorch in fp64: interpreter and GPU instances."""

import importlib

import pytest
import torch
from kernel_checks import DEVICES, DTYPES, assert_close_to_reference, poisoned_outputs

from fast3r_kernels import upsample_bilinear

upsample_module = importlib.import_module("fast3r_kernels.upsample")

# (N, C, H, W, channels_last, output size or None for x2): 1-pixel maps (DPT's coarsest level), odd sizes,
# channel counts that leave masked tails, and a non-doubling size.
CASES = [(2, 5, 1, 2, False, None), (2, 70, 3, 5, True, None), (1, 3, 7, 9, False, None), (3, 130, 4, 6, True, None),
         (1, 2, 1, 1, False, None), (2, 17, 5, 4, True, (11, 9)), (1, 72, 12, 14, True, None)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, c, h, w, channels_last, size", CASES)
def test_forward_and_backward_match_pytorch(n, c, h, w, channels_last, size, dtype, default_device):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    kwargs = {"size": size} if size else {"scale_factor": 2}
    with poisoned_outputs():
        y = upsample_bilinear(x, **kwargs)
        dy = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = upsample_module.torch_upsample_bilinear(x64, **kwargs)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    xs = x.detach().requires_grad_()
    stock = upsample_module.torch_upsample_bilinear(xs, **kwargs)
    (stock_dx,) = torch.autograd.grad(stock, xs, dy)

    assert y.shape == y64.shape and y.dtype == dtype and dx.dtype == dtype
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    half = dtype != torch.float32
    assert_close_to_reference(y, y64, stock if half else None, "y")
    assert_close_to_reference(dx, dx64, stock_dx if half else None, "dx")


@pytest.mark.parametrize("device", DEVICES)
def test_reference_path_matches_the_kernel(default_device):
    """The op's PyTorch reference (what torch.compile runs on a CPU) computes the same blend."""
    x = torch.randn(2, 9, 3, 5)
    dy = torch.randn(2, 9, 6, 10)
    torch.testing.assert_close(upsample_module.reference_upsample(x, (6, 10)),
                               upsample_module.upsample_forward(x, (6, 10)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(upsample_module.reference_upsample_backward(dy, (3, 5)),
                               upsample_module.upsample_backward(dy, (3, 5)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, c, h, w, channels_last, size", CASES)
def test_the_gathered_blend_matches_pytorch(n, c, h, w, channels_last, size, dtype):
    """The op's traced forward under symbolic sizes (gathers and lerps, fused by Inductor) against fp64."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
    out = size or (2 * h, 2 * w)
    y = upsample_module.gathered_upsample(x, out)
    y64 = upsample_module.torch_upsample_bilinear(x.double(), size=out)
    stock = upsample_module.torch_upsample_bilinear(x, size=out) if dtype != torch.float32 else None
    assert y.shape == y64.shape and y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    assert_close_to_reference(y, y64, stock, "y")


@pytest.mark.parametrize("bad, kwargs, message", [
    (torch.randn(2, 3, 4), {"scale_factor": 2}, "expected \\(N, C, H, W\\)"),
    (torch.randn(1, 2, 3, 4), {}, "exactly one"),
    (torch.randn(1, 2, 3, 4), {"scale_factor": -1}, "positive"),
    (torch.randint(0, 9, (1, 2, 3, 4)), {"scale_factor": 2}, "dtype"),
])
def test_bad_input_is_named(bad, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        upsample_bilinear(bad, **kwargs)
