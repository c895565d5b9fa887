"""Patch embedding against conv2d in fp64, in the Triton interpreter."""

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICES, DTYPES, assert_close_to_reference, poisoned_outputs

from fast3r_kernels import FusedPatchEmbed, patch_embed

# (images, height, width, patch, channels out): a token count that leaves a masked tail, patch 14,
# non-square and portrait images, and output widths that are not a multiple of the channel tile.
CASES = [(2, 32, 48, 16, 40), (1, 28, 42, 14, 24), (3, 64, 16, 16, 300)]


def reference(images, weight, bias, p):
    pixels = images.double() / 127.5 - 1 if images.dtype == torch.uint8 else images
    return F.conv2d(pixels.to(weight.dtype), weight, bias, stride=p).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, h, w, p, d", CASES)
def test_forward_and_weight_gradients_match_conv2d(n, h, w, p, d, dtype, uint8, default_device):
    images = (torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8) if uint8
              else (torch.rand(n, 3, h, w) * 2 - 1).to(dtype))
    weight = (torch.randn(d, 3, p, p) / (3 * p)).to(dtype).requires_grad_()
    bias = torch.randn(d, dtype=dtype, requires_grad=True)
    with poisoned_outputs():
        out = patch_embed(images, weight, bias, p)
        grad = torch.randn_like(out)
        dw, db = torch.autograd.grad(out, (weight, bias), grad)

    w64, b64 = (t.detach().double().requires_grad_() for t in (weight, bias))
    ref = reference(images, w64, b64, p)
    ref_dw, ref_db = torch.autograd.grad(ref, (w64, b64), grad.double())
    stock = stock_dw = stock_db = None
    if dtype != torch.float32:
        ws, bs = (t.detach().requires_grad_() for t in (weight, bias))
        stock = reference(images, ws, bs, p)
        stock_dw, stock_db = torch.autograd.grad(stock, (ws, bs), grad)
    assert out.shape == (n, (h // p) * (w // p), d) and out.dtype == dtype
    assert_close_to_reference(out, ref, stock, "tokens")
    assert_close_to_reference(dw, ref_dw, stock_dw, "dweight")
    assert_close_to_reference(db, ref_db, stock_db, "dbias")


def test_module_is_a_state_dict_compatible_drop_in_for_the_official_conv():
    conv = torch.nn.Conv2d(3, 64, 16, stride=16)
    holder = torch.nn.Module()
    holder.proj = conv
    fused = FusedPatchEmbed.from_module(holder)
    assert fused.state_dict().keys() == holder.state_dict().keys()
    images = torch.rand(2, 3, 32, 64) * 2 - 1
    tokens, pos = fused(images)
    torch.testing.assert_close(tokens, conv(images).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert pos.shape == (2, 8, 2) and pos[0, 5].tolist() == [1, 1]


def test_official_true_shape_convention_for_portrait_views():
    """ManyAR: a portrait view is stored transposed in a landscape batch; its tokens follow the true shape."""
    conv = torch.nn.Conv2d(3, 32, 16, stride=16)
    holder = torch.nn.Module()
    holder.proj = conv
    fused = FusedPatchEmbed.from_module(holder)
    stored = torch.rand(2, 3, 32, 48) * 2 - 1  # view 1 is really a 48x32 portrait image
    true_shape = torch.tensor([[32, 48], [48, 32]])
    tokens, pos = fused(stored, true_shape=true_shape)
    portrait = stored[1:].transpose(-1, -2)
    torch.testing.assert_close(tokens[1:], conv(portrait).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:1], conv(stored[:1]).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert pos[1].max(0).values.tolist() == [2, 1] and pos[0].max(0).values.tolist() == [1, 2]


def test_module_runs_the_pytorch_op_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    holder = torch.nn.Module()
    holder.proj = torch.nn.Conv2d(3, 16, 16, stride=16)
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    tokens, _ = FusedPatchEmbed.from_module(holder)(images)
    expected = holder.proj(images / 127.5 - 1).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, expected)


@pytest.mark.parametrize(
    "images, weight, message",
    [
        (torch.rand(1, 3, 30, 32), torch.randn(8, 3, 16, 16), "not a positive multiple of patch_size=16"),
        (torch.rand(1, 3, 32, 32), torch.randn(8, 4, 16, 16), "expected \\(D, 3, 16, 16\\)"),
        (torch.rand(3, 32, 32), torch.randn(8, 3, 16, 16), "expected \\(N, C, H, W\\)"),
        (torch.randint(0, 9, (1, 3, 32, 32), dtype=torch.int32), torch.randn(8, 3, 16, 16), "dtype"),
        (torch.rand(1, 3, 32, 32, requires_grad=True), torch.randn(8, 3, 16, 16), "images.detach"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(images, weight, message):
    with pytest.raises((ValueError, TypeError), match=message):
        patch_embed(images, weight, torch.randn(weight.shape[0]), 16)
