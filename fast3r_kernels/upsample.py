"""Bilinear upsampling with ``align_corners=True`` (DPT's ``F.interpolate``), in either memory format.

Forward: a program owns one output row of one image and a (BLOCK_P pixels x BLOCK_C
channels) tile of it; each output pixel is the bilinear blend of four input pixels, computed
in fp32 from source coordinates ``dst * (in - 1) / (out - 1)`` exactly as PyTorch computes
them, and rounded once. Strides come from the tensor, so channels-last maps (what cuDNN's
convolutions hand DPT) are read and written in place, coalesced along channels; stock
PyTorch's channels-last kernel reaches a small fraction of the memory bandwidth.

Backward: a gather, no atomics (deterministic): each input pixel sums the output gradients
of the few output rows and columns whose blend reads it. Their indices are found by
recomputing the forward's source coordinates over a short window, so the weights are the
forward's own.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._config import (
    autocast_dtype,
    cast,
    check_device,
    check_float,
    device_guard,
    interpreting,
    launching,
    precision,
    runs_kernels,
)


def _blocks() -> tuple[int, int]:
    """(pixels, channels) per program; channels are the contiguous axis in channels-last. The interpreter
    takes larger tiles: its cost is per program, and the tails stay masked either way."""
    return (128, 256) if interpreting() else (32, 64)


@triton.jit
def _source(dst, scale, size_in):
    """Source index, its right neighbour and the neighbour's weight, as PyTorch computes them (fp32)."""
    src = (dst.to(tl.float32) * scale).to(tl.float32)  # Inductor passes Python floats as fp64
    i0 = src.to(tl.int32)  # src >= 0: truncation is floor
    i1 = tl.minimum(i0 + 1, size_in - 1)
    return i0, i1, src - i0.to(tl.float32)


@triton.jit
def _upsample_fwd(
    X, Y, C, H, W, OH, OW, scale_h, scale_w,
    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):
    row = tl.program_id(0)  # n * OH + oh
    n, oh = row // OH, row % OH
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (p < OW)[:, None] & (c < C)[None, :]
    h0, h1, lh = _source(oh, scale_h, H)
    w0, w1, lw = _source(p, scale_w, W)
    base = X + n.to(tl.int64) * sx_n + c[None, :].to(tl.int64) * sx_c
    col0, col1 = w0[:, None].to(tl.int64) * sx_w, w1[:, None].to(tl.int64) * sx_w
    top, bottom = base + h0.to(tl.int64) * sx_h, base + h1.to(tl.int64) * sx_h
    x00 = tl.load(top + col0, mask=mask, other=0.0).to(tl.float32)
    x01 = tl.load(top + col1, mask=mask, other=0.0).to(tl.float32)
    x10 = tl.load(bottom + col0, mask=mask, other=0.0).to(tl.float32)
    x11 = tl.load(bottom + col1, mask=mask, other=0.0).to(tl.float32)
    lw = lw[:, None]
    out = (1.0 - lh) * ((1.0 - lw) * x00 + lw * x01) + lh * ((1.0 - lw) * x10 + lw * x11)
    ptrs = (Y + n.to(tl.int64) * sy_n + oh.to(tl.int64) * sy_h + p[:, None].to(tl.int64) * sy_w
            + c[None, :].to(tl.int64) * sy_c)
    tl.store(ptrs, cast(out, Y.dtype.element_ty, PRECISION), mask=mask)


@triton.jit
def _weights_onto(i, dst, scale, size_in, size_out):
    """Weight with which output index ``dst`` reads input index ``i`` (0 where it does not)."""
    i0, i1, lam = _source(dst, scale, size_in)
    ok = (dst >= 0) & (dst < size_out)
    return (tl.where(ok & (i0 == i), 1.0 - lam, 0.0) + tl.where(ok & (i1 == i), lam, 0.0)).to(tl.float32)


@triton.jit
def _upsample_bwd(
    DY, DX, C, H, W, OH, OW, scale_h, scale_w, inv_h, inv_w, window_h, window_w,
    sd_n, sd_c, sd_h, sd_w, sx_n, sx_c, sx_h, sx_w,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):
    row = tl.program_id(0)  # n * H + i
    n, i = row // H, row % H
    j = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_ok, c_ok = j < W, c < C
    base = DY + n.to(tl.int64) * sd_n + c[None, :].to(tl.int64) * sd_c
    # Output rows / columns that may read input row i / column j start just before (i - 1) / scale.
    first_h = tl.maximum(((i - 1).to(tl.float32) * inv_h).to(tl.int32) - 1, 0)
    first_w = tl.maximum(((j - 1).to(tl.float32) * inv_w).to(tl.int32) - 1, 0)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for a in range(window_h):
        oh = first_h + a
        wh = _weights_onto(i, oh, scale_h, H, OH)
        if wh != 0.0:
            line = base + oh.to(tl.int64) * sd_h
            for b in range(window_w):
                ow = first_w + b
                ww = _weights_onto(j, ow, scale_w, W, OW)
                ok = (ww != 0.0) & j_ok
                dy = tl.load(line + ow[:, None].to(tl.int64) * sd_w, mask=ok[:, None] & c_ok[None, :], other=0.0)
                acc += (wh * ww)[:, None] * dy.to(tl.float32)
    ptrs = (DX + n.to(tl.int64) * sx_n + i.to(tl.int64) * sx_h + j[:, None].to(tl.int64) * sx_w
            + c[None, :].to(tl.int64) * sx_c)
    tl.store(ptrs, cast(acc, DX.dtype.element_ty, PRECISION), mask=j_ok[:, None] & c_ok[None, :])


# ------------------------------------------------------------------- launchers
def align_corners_scale(size_in: int, size_out: int) -> float:
    """PyTorch's source-coordinate step for align_corners=True: (in - 1) / (out - 1), 0 for one output."""
    return (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0


def _window(size_in: int, size_out: int) -> tuple[float, int]:
    """(1 / scale, how many consecutive outputs to scan) for the backward's gather of one input index."""
    scale = align_corners_scale(size_in, size_out)
    if scale == 0.0:
        return 0.0, size_out  # one input pixel: every output reads it
    return 1.0 / scale, min(size_out, math.ceil(2.0 / scale) + 4)


def upsample_forward(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, OH, OW) in x's memory format (channels-last stays channels-last)."""
    n, c, h, w = x.shape
    oh, ow = size
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    block_p, block_c = _blocks()
    grid = (n * oh, triton.cdiv(ow, block_p), triton.cdiv(c, block_c))
    with launching(x):
        wrap_triton(_upsample_fwd)[grid](
            x, y, c, h, w, oh, ow, align_corners_scale(h, oh), align_corners_scale(w, ow), *x.stride(), *y.stride(),
            BLOCK_P=block_p, BLOCK_C=block_c, PRECISION=precision(x.dtype), num_warps=4,
        )
    return y


def upsample_backward(dy: torch.Tensor, size_in: tuple[int, int]) -> torch.Tensor:
    """Gradient (N, C, H, W) of the input, in dy's memory format."""
    n, c, oh, ow = dy.shape
    h, w = size_in
    dx = torch.empty((n, c, h, w), dtype=dy.dtype, device=dy.device, memory_format=_memory_format(dy))
    (inv_h, window_h), (inv_w, window_w) = _window(h, oh), _window(w, ow)
    block_p, block_c = _blocks()
    grid = (n * h, triton.cdiv(w, block_p), triton.cdiv(c, block_c))
    with launching(dy):
        wrap_triton(_upsample_bwd)[grid](
            dy, dx, c, h, w, oh, ow, align_corners_scale(h, oh), align_corners_scale(w, ow), inv_h, inv_w,
            window_h, window_w, *dy.stride(), *dx.stride(),
            BLOCK_P=block_p, BLOCK_C=block_c, PRECISION=precision(dy.dtype), num_warps=4,
        )
    return dx


def scaled_size(x: torch.Tensor, scale_factor: float) -> tuple[int, int]:
    """The output size F.interpolate gives for ``scale_factor``: floor(H * s) x floor(W * s)."""
    return math.floor(x.shape[-2] * scale_factor), math.floor(x.shape[-1] * scale_factor)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


# ------------------------------------------------------------ reference (PyTorch)
def _blend_axis(size_in: int, size_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis, each output's two source indices and the second one's fp32 weight (align_corners=True)."""
    src = torch.arange(size_out, device=device, dtype=torch.float32) * align_corners_scale(size_in, size_out)
    i0 = src.floor().long().clamp(max=size_in - 1)
    return i0, (i0 + 1).clamp(max=size_in - 1), src - i0


def _interpolation_matrix(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """(out, in) fp32 matrix of the align_corners=True blend weights along one axis."""
    i0, i1, lam = _blend_axis(size_in, size_out, like.device)
    eye = torch.eye(size_in, device=like.device)
    return eye[i0] * (1 - lam)[:, None] + eye[i1] * lam[:, None]


def gathered_upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The same blend as gathers and lerps in fp32: the op's traced forward under symbolic sizes, which Inductor
    fuses into one pointwise kernel (ATen's bilinear there is an opaque fallback, 20x slower on the H200). In x's
    memory format, as the kernel: a channels-last head left NCHW here gained layout conversions around its
    convolutions (H200, 32 views: 4.8 against 2.5 ms)."""
    r0, r1, row_weight = _blend_axis(x.shape[-2], size[0], x.device)
    c0, c1, col_weight = _blend_axis(x.shape[-1], size[1], x.device)
    xf = x.float()
    rows = torch.lerp(xf[:, :, r0], xf[:, :, r1], row_weight[:, None])
    blended = torch.lerp(rows[..., c0], rows[..., c1], col_weight)
    return blended.to(x.dtype).contiguous(memory_format=_memory_format(x))


def reference_upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The same blend as two small matrix products in fp32: the op's path on traced CPU tensors
    (torch.compile on a CPU), and differentiable, so its gradient is the reference backward."""
    a_h, a_w = _interpolation_matrix(x.shape[-2], size[0], x), _interpolation_matrix(x.shape[-1], size[1], x)
    y = a_h @ x.float() @ a_w.T
    return y.to(x.dtype).contiguous(memory_format=_memory_format(x))


def reference_upsample_backward(dy: torch.Tensor, size_in: tuple[int, int]) -> torch.Tensor:
    a_h, a_w = _interpolation_matrix(size_in[0], dy.shape[-2], dy), _interpolation_matrix(size_in[1], dy.shape[-1], dy)
    dx = a_h.T @ dy.float() @ a_w
    return dx.to(dy.dtype).contiguous(memory_format=_memory_format(dy))


# ------------------------------------------------------------------ the ops
# Under torch.compile the ops' bodies are traced into the graph (triton_op); with symbolic sizes they trace the
# blend as gathers instead of the kernel. Inductor drops its channels-last layout for convolutions whose sizes are
# symbolic (pytorch issue 102670), so a DPT head hands this kernel NCHW maps there, where it ran 3.7x slower than
# Inductor's own fused bilinear (H200, 32 views: 2.96 vs 0.80 ms; benchmarks/NOTES.md). Not ATen's upsample: traced
# here it reaches Inductor undecomposed and runs as ATen's NCHW kernel (15.8 ms). The sizes decide, not the
# strides: when the body is traced, the tensors still carry eager's layout. The backward then takes the
# matrix-product reference (ATen's has no symbolic meta kernel; training compiles with static sizes anyway).
def _symbolic(t: torch.Tensor) -> bool:
    return any(isinstance(n, torch.SymInt) for n in t.shape)


@triton_op("fast3r::upsample_bilinear", mutates_args=())
def upsample_op(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    if _symbolic(x):
        return gathered_upsample(x, (out_h, out_w))
    if not runs_kernels(x):
        return reference_upsample(x, (out_h, out_w))
    with device_guard(x.device):
        return upsample_forward(x, (out_h, out_w))


@triton_op("fast3r::upsample_bilinear_backward", mutates_args=())
def upsample_backward_op(dy: torch.Tensor, in_h: int, in_w: int) -> torch.Tensor:
    if _symbolic(dy) or not runs_kernels(dy):  # ATen's backward has no symbolic meta; rare: training compiles static
        return reference_upsample_backward(dy, (in_h, in_w))
    with device_guard(dy.device):
        return upsample_backward(dy, (in_h, in_w))


def _upsample_setup(ctx, inputs, output):
    ctx.size_in = inputs[0].shape[-2:]


def _upsample_grad(ctx, dy):
    return upsample_backward_op(dy, ctx.size_in[0], ctx.size_in[1]), None, None


upsample_op.register_autograd(_upsample_grad, setup_context=_upsample_setup)


def upsample_bilinear(x: torch.Tensor, scale_factor: float | None = None,
                      size: tuple[int, int] | None = None) -> torch.Tensor:
    """``F.interpolate(x, size or scale_factor, mode="bilinear", align_corners=True)`` on the kernels.

    x: (N, C, H, W), contiguous or channels-last (the output keeps the format); bf16, fp16 or
    fp32; the output size is ``size`` or ``floor(H * scale_factor), floor(W * scale_factor)``.
    Differentiable. Not supported: align_corners=False, other modes, 3-D or 5-D inputs.
    """
    check_device("x", x)
    check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (N, C, H, W)")
    if (scale_factor is None) == (size is None):
        raise ValueError("pass exactly one of scale_factor and size")
    if size is None:
        if not scale_factor > 0:
            raise ValueError(f"scale_factor={scale_factor}; it must be positive")
        size = scaled_size(x, scale_factor)
    if min(size) < 1 or 0 in x.shape:
        raise ValueError(f"cannot upsample {tuple(x.shape)} to {tuple(size)}: every size must be positive")
    if _memory_format(x) == torch.contiguous_format and not x.is_contiguous():
        x = x.contiguous()
    if autocast_dtype(x.device) is not None:
        x = x.to(_autocast_upsample_dtype(x.device, autocast_dtype(x.device), x.dtype))
    return upsample_op(x, int(size[0]), int(size[1]))


@functools.lru_cache(maxsize=16)
def _autocast_upsample_dtype(device: torch.device, autocast: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast's policy gives bilinear upsampling of ``dtype`` inputs on this device (asked once)."""
    with torch.autocast(device.type, dtype=autocast):
        return torch_upsample_bilinear(torch.ones(1, 1, 2, 2, device=device, dtype=dtype), scale_factor=2).dtype


def torch_upsample_bilinear(x: torch.Tensor, scale_factor: float | None = None,
                            size: tuple[int, int] | None = None) -> torch.Tensor:
    """The stock op with the same arguments (the torch backend's, and the tests' reference)."""
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=True)
