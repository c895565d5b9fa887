"""Patch embedding (conv with kernel = stride = p) as one implicit-im2col GEMM.

Each program computes a (BLOCK_M tokens x BLOCK_D channels) tile of
``tokens = patches @ W^T + b``. The K loop walks the 3*p*p patch pixels in (channel,
row, column) order, the conv weight's own order, so the weight is used as stored and
the A tile is gathered straight from the (N, 3, H, W) image: p contiguous pixels per
patch row, consecutive tokens reading consecutive runs of an image row. No unfolded
copy of the images is ever written, and tokens land in (N, T, D) order for the encoder.

uint8 input: the [-1, 1] normalization ``x / 127.5 - 1`` is folded into the epilogue,
``(u8 @ W^T) / 127.5 + (b - W.sum(k))``. The integers 0..255 are exact in bf16/fp16, so
the GEMM itself is exact-input, and the kernel reads 1 byte per pixel instead of 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import tuning
from ._config import (
    autocast_dtype,
    cast,
    check_device,
    check_float,
    device_guard,
    launching,
    mma,
    precision,
    runs_kernels,
)

# uint8 RGB -> [-1, 1]: x / 127.5 - 1, the normalization Fast3R was trained with; one definition,
# used by the kernels (folded into the epilogue) and by the PyTorch path (``normalize_uint8``).
UINT8_HALF_RANGE = 127.5
_INV_HALF_RANGE = tl.constexpr(1.0 / UINT8_HALF_RANGE)


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (any shape) -> floats in [-1, 1], as Fast3R's preprocessing gives them."""
    return images / UINT8_HALF_RANGE - 1


def patch_positions(grid_h: int, grid_w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(grid_h * grid_w, 2) int64 (y, x) positions of the patch tokens, row-major: the RoPE-2D positions."""
    ys = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    xs = torch.arange(grid_w, device=device).repeat(grid_h)
    return torch.stack([ys, xs], dim=-1)


@triton.jit
def _patch_rows(IMG, tokens, k_offs, T, GRID_W, stride_n, stride_c, stride_h, stride_w, P: tl.constexpr):
    """Pointers of the im2col matrix A[token, k] for a (tokens x k) tile."""
    n = tokens // T
    t = tokens % T
    ty, tx = t // GRID_W, t % GRID_W
    c = k_offs // (P * P)
    ky = (k_offs // P) % P
    kx = k_offs % P
    row = ty[:, None] * P + ky[None, :]
    col = tx[:, None] * P + kx[None, :]
    return (IMG + n.to(tl.int64)[:, None] * stride_n + c[None, :] * stride_c
            + row.to(tl.int64) * stride_h + col * stride_w)


@triton.jit
def _patch_embed_fwd(
    IMG, W, B, W_ROWSUM, OUT,
    M, T, GRID_W, D, K,
    stride_n, stride_c, stride_h, stride_w,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    UINT8: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_d = tl.program_id(0), tl.program_id(1)
    tokens = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = tokens < M
    chan_ok = chans < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_ok = k_offs < K
        a_ptrs = _patch_rows(IMG, tokens, k_offs, T, GRID_W, stride_n, stride_c, stride_h, stride_w, P)
        a = tl.load(a_ptrs, mask=tok_ok[:, None] & k_ok[None, :], other=0)
        w = tl.load(W + chans[None, :] * K + k_offs[:, None], mask=chan_ok[None, :] & k_ok[:, None], other=0.0)
        if UINT8:  # widen first: integer -> bf16 directly is not supported by the interpreter
            a = a.to(tl.float32)
        acc = mma(cast(a, w.dtype, PRECISION), w, acc, PRECISION)
    if UINT8:
        acc = acc * _INV_HALF_RANGE - tl.load(W_ROWSUM + chans, mask=chan_ok, other=0.0)[None, :]
    acc += tl.load(B + chans, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = OUT + tokens.to(tl.int64)[:, None] * D + chans[None, :]
    tl.store(out_ptrs, cast(acc, OUT.dtype.element_ty, PRECISION), mask=tok_ok[:, None] & chan_ok[None, :])


@triton.jit
def _patch_embed_bwd_weight(
    IMG, DOUT, DW_PART, DB_PART,
    M, T, GRID_W, D, K, tokens_per_split,
    stride_n, stride_c, stride_h, stride_w,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    UINT8: tl.constexpr, PRECISION: tl.constexpr,
):
    """dW[d, k] = sum_tokens dOut[token, d] * A[token, k], one token band (split) per program row."""
    pid_dk, split = tl.program_id(0), tl.program_id(1)
    k_tiles = tl.cdiv(K, BLOCK_K)
    pid_d, pid_k = pid_dk // k_tiles, pid_dk % k_tiles
    chans = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    chan_ok, k_ok = chans < D, k_offs < K
    dw = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = split * tokens_per_split
    for m0 in range(0, tokens_per_split, BLOCK_M):
        tokens = first + m0 + tl.arange(0, BLOCK_M)
        tok_ok = tokens < M
        a = tl.load(_patch_rows(IMG, tokens, k_offs, T, GRID_W, stride_n, stride_c, stride_h, stride_w, P),
                    mask=tok_ok[:, None] & k_ok[None, :], other=0)
        dout = tl.load(DOUT + tokens.to(tl.int64)[:, None] * D + chans[None, :],
                       mask=tok_ok[:, None] & chan_ok[None, :], other=0.0)
        a = a.to(tl.float32)
        if UINT8:
            a = tl.where(tok_ok[:, None], a * _INV_HALF_RANGE - 1.0, 0.0)
        dw = mma(tl.trans(dout), cast(a, dout.dtype, PRECISION), dw, PRECISION)
        db += tl.sum(dout.to(tl.float32), axis=0)
    base = split.to(tl.int64) * D * K
    tl.store(DW_PART + base + chans[:, None] * K + k_offs[None, :], dw, mask=chan_ok[:, None] & k_ok[None, :])
    if pid_k == 0:
        tl.store(DB_PART + split * D + chans, db, mask=chan_ok)


def patch_embed_forward(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, patch_size: int,
                        **blocks) -> torch.Tensor:
    n, c, h, w = images.shape
    d = weight.shape[0]
    grid_w, t = w // patch_size, (h // patch_size) * (w // patch_size)
    m, k = n * t, c * patch_size * patch_size
    cfg = {**tuning.patch_embed_forward_blocks(weight.dtype), **blocks}
    out = torch.empty((n, t, d), dtype=weight.dtype, device=images.device)
    uint8 = images.dtype == torch.uint8
    rowsum = weight.float().reshape(d, k).sum(1) if uint8 else None
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_D"]))
    with launching(images):
        wrap_triton(_patch_embed_fwd)[grid](
            images, weight, bias, rowsum, out, m, t, grid_w, d, k, *images.stride(),
            P=patch_size, UINT8=uint8, PRECISION=precision(weight.dtype), **cfg,
        )
    return out


def patch_embed_backward_weight(dout: torch.Tensor, images: torch.Tensor, patch_size: int,
                                splits: int | None = None, **blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dweight (D, C, p, p) fp32, dbias (D,) fp32); token bands are summed in a fixed order."""
    n, c, h, w = images.shape
    d = dout.shape[-1]
    grid_w, t = w // patch_size, (h // patch_size) * (w // patch_size)
    m, k = n * t, c * patch_size * patch_size
    cfg = {**tuning.patch_embed_backward_blocks(dout.dtype), **blocks}
    tiles = triton.cdiv(d, cfg["BLOCK_D"]) * triton.cdiv(k, cfg["BLOCK_K"])
    splits = splits or max(1, min(triton.cdiv(m, cfg["BLOCK_M"]), 512 // tiles + 1))
    tokens_per_split = triton.cdiv(triton.cdiv(m, splits), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    splits = triton.cdiv(m, tokens_per_split)
    dw_part = torch.empty((splits, d, k), dtype=torch.float32, device=dout.device)
    db_part = torch.empty((splits, d), dtype=torch.float32, device=dout.device)
    dout2 = dout.reshape(m, d).contiguous()
    with launching(images):
        wrap_triton(_patch_embed_bwd_weight)[(tiles, splits)](
            images, dout2, dw_part, db_part, m, t, grid_w, d, k, tokens_per_split, *images.stride(),
            P=patch_size, UINT8=images.dtype == torch.uint8, PRECISION=precision(dout.dtype), **cfg,
        )
    return dw_part.sum(0).view(d, c, patch_size, patch_size), db_part.sum(0)


# ------------------------------------------------------------ reference (PyTorch)
def reference_patch_embed_forward(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  patch_size: int) -> torch.Tensor:
    """What ``patch_embed_forward`` computes (fp32 products), in PyTorch: the op's path on CPU tensors
    when no kernel can run there (``torch.compile`` on a CPU)."""
    x = normalize_uint8(images) if images.dtype == torch.uint8 else images.float()
    tokens = F.conv2d(x, weight.float(), bias.float(), stride=patch_size)
    return tokens.flatten(2).transpose(1, 2).to(weight.dtype).contiguous()


def reference_patch_embed_backward(dout: torch.Tensor, images: torch.Tensor,
                                   patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``patch_embed_backward_weight`` computes: (dweight (D, C, p, p) fp32, dbias (D,) fp32)."""
    x = normalize_uint8(images) if images.dtype == torch.uint8 else images.float()
    patches = F.unfold(x, patch_size, stride=patch_size)  # (N, C*p*p, T)
    dw = torch.einsum("ntd,nkt->dk", dout.float(), patches)
    return dw.view(dout.shape[-1], images.shape[1], patch_size, patch_size), dout.float().sum((0, 1))


# ------------------------------------------------------------------ the ops
@triton_op("fast3r::patch_embed", mutates_args=())
def patch_embed_op(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) images -> (N, T, D) tokens: the op torch.compile and export see."""
    if not runs_kernels(images):
        return reference_patch_embed_forward(images, weight, bias, patch_size)
    with device_guard(images.device):
        return patch_embed_forward(images, weight, bias, patch_size)


@triton_op("fast3r::patch_embed_backward", mutates_args=())
def patch_embed_backward_op(dout: torch.Tensor, images: torch.Tensor,
                            patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not runs_kernels(images):
        return reference_patch_embed_backward(dout, images, patch_size)
    with device_guard(images.device):
        return patch_embed_backward_weight(dout, images, patch_size)


def _patch_embed_setup(ctx, inputs, output):
    images, weight, bias, patch_size = inputs
    ctx.save_for_backward(images)
    ctx.patch_size = patch_size
    ctx.dtypes = (weight.dtype, bias.dtype)


def _patch_embed_grad(ctx, dout):
    (images,) = ctx.saved_tensors
    dweight, dbias = patch_embed_backward_op(dout, images, ctx.patch_size)
    return None, dweight.to(ctx.dtypes[0]), dbias.to(ctx.dtypes[1]), None


patch_embed_op.register_autograd(_patch_embed_grad, setup_context=_patch_embed_setup)


def patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, patch_size: int = 16) -> torch.Tensor:
    """Non-overlapping patch embedding: (N, C, H, W) images -> (N, H/p * W/p, D) tokens.

    ``weight`` is the conv weight (D, C, p, p), ``bias`` (D,). Float images are used as
    given (cast to the weight dtype); uint8 images are normalized to [-1, 1] inside the
    kernel. The output has the weight's dtype (the autocast dtype under autocast, as
    ``nn.Conv2d`` gives there). Gradients flow to weight and bias, not to the images.
    """
    cast_to = autocast_dtype(images.device)
    if cast_to is not None:
        weight, bias = weight.to(cast_to), bias.to(cast_to)
        images = images if images.dtype == torch.uint8 else images.to(cast_to)
    _check(images, weight, bias, patch_size)
    return patch_embed_op(images, weight, bias, int(patch_size))


def _check(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: int) -> None:
    check_device("images", images)
    for name, t in (("weight", weight), ("bias", bias)):
        check_device(name, t, images.device)
        check_float(name, t)
    if images.dtype != torch.uint8:
        check_float("images", images)
    if images.dim() != 4:
        raise ValueError(f"images has shape {tuple(images.shape)}; expected (N, C, H, W)")
    _, c, h, w = images.shape
    if weight.shape[1:] != (c, p, p):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected (D, {c}, {p}, {p}) for {c}-channel "
                         f"images and patch_size={p}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous; pass weight.contiguous()")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    if h % p or w % p or h == 0 or w == 0:
        raise ValueError(f"image size {h}x{w} is not a positive multiple of patch_size={p}; crop or resize the images")
    if images.requires_grad:
        raise ValueError("patch_embed does not differentiate with respect to the images; pass images.detach()")
