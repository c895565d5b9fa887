"""LayerNorm over the last dimension, with an optional fused residual add.

Forward: each program normalizes a tile of ``ROWS`` rows held entirely in registers, so
x is read once and y written once; statistics are two-pass fp32 (mean, then centred
variance), which is exact enough for any width up to 8192. With ``residual`` the kernel
also writes ``x + residual`` (rounded to x's dtype: the value it then normalizes, as
eager PyTorch does): the pre-norm pattern ``h = x + f(x); LN(h)`` then costs one read of
each input and one write of each output.

Backward: each program owns a contiguous band of rows, recomputes x-hat from the saved
mean / rstd, writes dx, and accumulates dweight / dbias for its band in fp32 registers;
one small (programs x N) sum finishes them. No atomics, so results are deterministic.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._config import autocast_dtype, cast, check_device, check_float, device_guard, launching, precision, runs_kernels

MAX_WIDTH = 8192


@triton.jit
def _layer_norm_fwd(
    X, RES, W, B, Y, RES_OUT, MEAN, RSTD,
    M, N, stride_x, stride_res, stride_y, stride_res_out, eps,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < N)
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        # Normalize the sum as stored (rounded to the output dtype), like eager PyTorch: the backward
        # recomputes x-hat from the stored sum, and must see the values the statistics came from.
        x += tl.load(RES + r64 * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = cast(x, RES_OUT.dtype.element_ty, PRECISION)
        tl.store(RES_OUT + r64 * stride_res_out + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    # Rows whose squares overflow fp32 (|x| beyond ~1e19): the variance of the row over its largest entry,
    # rescaled, instead of rstd = 0 (which would return the bias as if the row were constant).
    big = tl.max(tl.abs(centred), axis=1)
    unit = centred / tl.where(big > 0, big, 1.0)[:, None]
    rescaled = (1.0 / big) / tl.sqrt(tl.sum(unit * unit, axis=1) / N + eps / big / big)
    rstd = tl.where(rstd > 0, rstd, rescaled)
    y = centred * rstd[:, None]
    if HAS_W:
        y *= tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r64 * stride_y + cols[None, :], cast(y, Y.dtype.element_ty, PRECISION), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd(
    X, W, DY, DX, DRES_OUT, MEAN, RSTD, DW_PART, DB_PART,
    M, N, stride_x, stride_dy, stride_dx, stride_dres, rows_per_program,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_DRES: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        w = tl.where(col_ok, 1.0, 0.0)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid * rows_per_program
    for offset in range(0, rows_per_program, ROWS):
        rows = first + offset + tl.arange(0, ROWS)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(DRES_OUT + r64 * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * stride_dx + cols[None, :], cast(dx, DX.dtype.element_ty, PRECISION), mask=mask)
    tl.store(DW_PART + pid * N + cols, dw, mask=col_ok)
    tl.store(DB_PART + pid * N + cols, db, mask=col_ok)


def launch_shape(n: int, rows: int | None, num_warps: int | None, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps); ``rows`` / ``num_warps`` override the defaults (for tuning).

    Defaults from the H100 sweep at 294k x 1024 bf16 (benchmarks/NOTES.md): forward 4 rows
    x 8 warps (16 elements per thread, 2.67-2.69 TB/s), backward 8 rows x 4 warps (64 per
    thread, 2.45 TB/s).
    """
    block_n = triton.next_power_of_2(n)
    if backward:
        rows = rows or max(1, min(16, 8192 // block_n))
        num_warps = num_warps or min(16, max(4, block_n * rows // 2048))
    else:
        rows = rows or max(1, min(16, 4096 // block_n))
        num_warps = num_warps or min(16, max(4, block_n * rows // 512))
    return block_n, rows, num_warps


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    rows = t.reshape(-1, n)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def layer_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    residual_out: torch.Tensor | None = None,
    rows: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """-> (y, x + residual or None, mean, rstd); x: (..., N), normalized over N.

    ``residual_out``: a contiguous buffer of x's shape for x + residual (it may be x or
    residual itself: each row is read before it is written), instead of a new tensor.
    """
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res2 = _as_rows(residual, n) if residual is not None else None
    if residual is None:
        res_out = None
    elif residual_out is not None:
        res_out = residual_out.view(m, n)
    else:
        res_out = torch.empty_like(y)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block_n, rows, num_warps = launch_shape(n, rows, num_warps, backward=False)
    with launching(x):
        wrap_triton(_layer_norm_fwd)[(triton.cdiv(m, rows),)](
            x2, res2, weight, bias, y, res_out, mean, rstd,
            m, n, x2.stride(0), res2.stride(0) if res2 is not None else 0, y.stride(0),
            res_out.stride(0) if res_out is not None else 0, eps,
            BLOCK_N=block_n, ROWS=rows, HAS_W=weight is not None, HAS_B=bias is not None,
            HAS_RES=residual is not None, PRECISION=precision(x.dtype), num_warps=num_warps,
        )
    shape = x.shape
    return y.view(shape), (res_out.view(shape) if res_out is not None else None), mean, rstd


def layer_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    d_residual_out: torch.Tensor | None = None,
    *,
    rows: int | None = None,
    num_warps: int | None = None,
    rows_per_program: int = 128,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """-> (dx, dweight or None, dbias); x is the normalized input (x + residual when fused).

    Each program owns ``rows_per_program`` rows; small bands keep enough programs in
    flight to hide load latency, at the price of a (programs x N) fp32 partial sum.
    """
    n = x.shape[-1]
    x2, dy2 = _as_rows(x, n), _as_rows(dy, n)
    dres2 = _as_rows(d_residual_out, n) if d_residual_out is not None else None
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, rows, num_warps = launch_shape(n, rows, num_warps, backward=True)
    rows_per_program = triton.cdiv(rows_per_program, rows) * rows
    programs = triton.cdiv(m, rows_per_program)
    dw_part = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part)
    with launching(x):
        wrap_triton(_layer_norm_bwd)[(programs,)](
            x2, weight, dy2, dx, dres2, mean, rstd, dw_part, db_part,
            m, n, x2.stride(0), dy2.stride(0), dx.stride(0), dres2.stride(0) if dres2 is not None else 0,
            rows_per_program, BLOCK_N=block_n, ROWS=rows,
            HAS_W=weight is not None, HAS_DRES=dres2 is not None, PRECISION=precision(x.dtype), num_warps=num_warps,
        )
    dweight = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    return dx.view(x.shape), dweight, db_part.sum(0)


# ------------------------------------------------------------ reference (PyTorch)
def reference_layer_norm_forward(x, weight, bias, eps: float, residual=None):
    """What ``layer_norm_forward`` computes, in PyTorch (fp32 statistics over the stored sum): the op's
    path on CPU tensors when no kernel can run there (``torch.compile`` on a CPU)."""
    total = (x.float() + residual.float()).to(x.dtype) if residual is not None else None
    rows = (total if total is not None else x).reshape(-1, x.shape[-1]).float()
    mean = rows.mean(-1)
    # fp64 variance: the kernels' rescaled variance for rows whose fp32 squares overflow
    rstd = ((rows - mean[:, None]).double().square().mean(-1) + eps).rsqrt().float()
    y = (rows - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(x.shape), total, mean, rstd


def reference_layer_norm_backward(dy, x, weight, mean, rstd, d_residual_out=None):
    """What ``layer_norm_backward`` computes, in fp32 PyTorch: (dx, dweight or None, dbias)."""
    n = x.shape[-1]
    rows, dy2 = x.reshape(-1, n).float(), dy.reshape(-1, n).float()
    xhat = (rows - mean[:, None]) * rstd[:, None]
    wdy = dy2 * weight.float() if weight is not None else dy2
    dx = (wdy - xhat * (xhat * wdy).mean(-1, keepdim=True) - wdy.mean(-1, keepdim=True)) * rstd[:, None]
    if d_residual_out is not None:
        dx = dx + d_residual_out.reshape(-1, n).float()
    dweight = (dy2 * xhat).sum(0).to(weight.dtype) if weight is not None else None
    return dx.to(x.dtype).view(x.shape), dweight, dy2.sum(0)


# ------------------------------------------------------------------ the ops
@triton_op("fast3r::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """-> (y, x + residual (empty without residual), mean, rstd): the op torch.compile and export see."""
    if runs_kernels(x):
        with device_guard(x.device):
            y, total, mean, rstd = layer_norm_forward(x, weight, bias, eps, residual)
    else:
        y, total, mean, rstd = reference_layer_norm_forward(x, weight, bias, eps, residual)
    return y, (total if total is not None else x.new_empty(0)), mean, rstd


@triton_op("fast3r::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                           rstd: torch.Tensor, d_residual_out: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dweight (empty without weight), dbias fp32)."""
    if runs_kernels(x):
        with device_guard(x.device):
            dx, dweight, dbias = layer_norm_backward(dy, x, weight, mean, rstd, d_residual_out)
    else:
        dx, dweight, dbias = reference_layer_norm_backward(dy, x, weight, mean, rstd, d_residual_out)
    return dx, (dweight if dweight is not None else x.new_empty(0)), dbias


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, residual, _ = inputs
    _, total, mean, rstd = output
    ctx.fused_residual = residual is not None
    ctx.has_weight = weight is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(total if ctx.fused_residual else x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_grad(ctx, dy, d_total, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = layer_norm_backward_op(dy, x, weight, mean, rstd, d_total if ctx.fused_residual else None)
    return (dx, dweight if ctx.has_weight else None, dbias.to(ctx.bias_dtype) if ctx.bias_dtype else None,
            dx if ctx.fused_residual else None, None)


layer_norm_op.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of x over its last dimension (width <= 8192), statistics in fp32.

    With ``residual``, returns ``(x + residual, layer_norm(x + residual))``, the two
    tensors a pre-norm block needs, in one pass. Outputs have x's dtype; under autocast,
    the dtype ``nn.LayerNorm`` gives there (fp32 on CUDA).
    """
    if autocast_dtype(x.device) is not None:
        dtype = _autocast_layer_norm_dtype(x.device, autocast_dtype(x.device))
        x, weight, bias, residual = (t.to(dtype) if t is not None else None for t in (x, weight, bias, residual))
    _check(x, weight, bias, residual)
    y, total, _, _ = layer_norm_op(x, weight, bias, residual, float(eps))
    return (total, y) if residual is not None else y


@functools.lru_cache(maxsize=8)
def _autocast_layer_norm_dtype(device: torch.device, autocast: torch.dtype) -> torch.dtype:
    """The dtype autocast's policy gives layer_norm on this device (asked once: the policy differs by device)."""
    with torch.autocast(device.type, dtype=autocast):
        return F.layer_norm(torch.ones(1, 2, device=device, dtype=autocast), (2,)).dtype


def _check(x, weight, bias, residual) -> None:
    check_float("x", x)
    check_device("x", x)
    n = x.shape[-1] if x.dim() else 0
    if not 1 <= n <= MAX_WIDTH:
        raise ValueError(f"x has width {n} in its last dimension; layer_norm supports 1..{MAX_WIDTH}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_device(name, t, x.device)
            check_float(name, t)
            if t.shape != (n,):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({n},) to match x's last dimension")
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous; pass {name}.contiguous()")
    if residual is not None:
        check_device("residual", residual, x.device)
        check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}; expected x's shape {tuple(x.shape)}")
