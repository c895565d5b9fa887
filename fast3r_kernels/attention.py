"""Fused multi-head attention (non-causal), FlashAttention-2 style, with optional RoPE-2D.

Forward: a program owns BLOCK_M query rows of one (batch, head) and streams K/V in
BLOCK_N tiles, keeping the running row max m, row sum l and the output accumulator in
registers (online softmax), so the L x L score matrix never exists. The softmax runs in
the exp2 domain with ``scale * log2(e)`` folded into one multiply-subtract per score, and
the accumulator is divided by l once, at the end. Only the last K/V tile is masked.

Layouts: q, k, v are read through their strides, so the (B, L, H, D) views the qkv
projection produces (stride 3*H*D between tokens) are consumed in place, with no
transposes or copies; the output is written in the same layout (B, L, H, D), which the
output projection reads as (B, L, H*D). Element offsets are computed in int64, so
sequences beyond 2^31 elements (1.2 M tokens of packed qkv) address correctly.

RoPE-2D: with ``rope_pos`` the kernel rotates q and k as it loads them (first half of the
head by the token's y, second half by its x, rotate-half convention, fp32, angles from an
fp32 cos/sin table), so rotated q/k never exist in memory.

Backward: dK/dV in one pass over query tiles, dQ in another over key tiles; no atomics,
so gradients are bitwise reproducible. The gradient of RoPE is the inverse rotation.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._config import cast, check_device, check_float, mma, precision

HEAD_DIMS = (32, 64, 128)
LAYOUTS = ("BLHD", "BHLD")
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------- RoPE
@triton.jit
def _swap_quarters(x, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """x[:, d ^ HEAD_DIM/4]: exchange the two quarters inside each half of the head, in registers."""
    QUARTER: tl.constexpr = HEAD_DIM // 4
    x = tl.permute(tl.reshape(x, (ROWS, 2, 2, QUARTER)), (0, 1, 3, 2))
    first, second = tl.split(x)
    x = tl.permute(tl.join(second, first), (0, 1, 3, 2))
    return tl.reshape(x, (ROWS, HEAD_DIM))


@triton.jit
def _rope(x, pos_y, pos_x, COS, SIN, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, INVERSE: tl.constexpr):
    """Rotate fp32 rows x (ROWS, HEAD_DIM) by their (y, x) positions; INVERSE undoes it."""
    QUARTER: tl.constexpr = HEAD_DIM // 4
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    sign = tl.where((d % HALF) < QUARTER, -1.0, 1.0)
    if INVERSE:
        sign = -sign
    pos = tl.where((d >= HALF)[None, :], pos_x[:, None], pos_y[:, None])
    table = pos * QUARTER + (d % QUARTER)[None, :]
    cos = tl.load(COS + table)
    sin = tl.load(SIN + table)
    return x * cos + sign[None, :] * _swap_quarters(x, ROWS, HEAD_DIM) * sin


@triton.jit
def _load_positions(POS, rows, L, stride_l, stride_c):
    """(y, x) positions of the given tokens as int32 (POS may hold any integer dtype)."""
    in_range = rows < L
    ptrs = POS + rows.to(tl.int64) * stride_l
    pos_y = tl.load(ptrs, mask=in_range, other=0).to(tl.int32)
    pos_x = tl.load(ptrs + stride_c, mask=in_range, other=0).to(tl.int32)
    return pos_y, pos_x


@triton.jit
def _load_rows(ptr, rows, stride_l, L, POS, stride_pos_l, stride_pos_c, COS, SIN,
               ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, MASK: tl.constexpr,
               PRECISION: tl.constexpr):
    """Load (ROWS, HEAD_DIM) rows of one (batch, head), rotated by RoPE-2D if ROPE."""
    d = tl.arange(0, HEAD_DIM)
    ptrs = ptr + rows.to(tl.int64)[:, None] * stride_l + d[None, :]
    if MASK:
        x = tl.load(ptrs, mask=(rows < L)[:, None], other=0.0)
    else:
        x = tl.load(ptrs)
    if ROPE:
        pos_y, pos_x = _load_positions(POS, rows, L, stride_pos_l, stride_pos_c)
        x = cast(_rope(x.to(tl.float32), pos_y, pos_x, COS, SIN, ROWS, HEAD_DIM, False), ptr.dtype.element_ty, PRECISION)
    return x


@triton.jit
def _head_offsets(pid_bh, H, stride_b, stride_h):
    return (pid_bh // H).to(tl.int64) * stride_b + (pid_bh % H).to(tl.int64) * stride_h


@triton.jit
def _positions(POS, pid_bh, H, stride_b, ROPE: tl.constexpr):
    """Base pointer of this batch's (L, 2) positions (POS is None without RoPE)."""
    if ROPE:
        return POS + (pid_bh // H).to(tl.int64) * stride_b
    return POS


# ------------------------------------------------------------------------ forward
@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_ptr, v_ptr, start_n, stride_kl, stride_vl, L_K,
              POS_K, stride_pos_l, stride_pos_c, COS, SIN, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, MASK: tl.constexpr,
              PRECISION: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(k_ptr, cols, stride_kl, L_K, POS_K, stride_pos_l, stride_pos_c, COS, SIN, BLOCK_N, HEAD_DIM, ROPE, MASK, PRECISION)
    s = mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), PRECISION)
    if MASK:
        s = tl.where((cols < L_K)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_ptr, cols, stride_vl, L_K, POS_K, stride_pos_l, stride_pos_c, COS, SIN, BLOCK_N, HEAD_DIM, False, MASK, PRECISION)
    acc = mma(cast(p, v.dtype, PRECISION), v, acc * alpha[:, None], PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, POS, COS, SIN,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l, spos_b, spos_l, spos_c,
    H, L_Q, L_K, m_tiles, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr, RETURN_LSE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_bh, pid_m = pid // m_tiles, pid % m_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = _positions(POS, pid_bh, H, spos_b, ROPE)
    q = _load_rows(Q + _head_offsets(pid_bh, H, sq_b, sq_h), rows, sq_l, L_Q, pos, spos_l, spos_c, COS, SIN,
                   BLOCK_M, HEAD_DIM, ROPE, True, PRECISION)
    k_ptr = K + _head_offsets(pid_bh, H, sk_b, sk_h)
    v_ptr = V + _head_offsets(pid_bh, H, sv_b, sv_h)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full = (L_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptr, v_ptr, start_n, sk_l, sv_l, L_K, pos, spos_l, spos_c, COS, SIN,
                                  qk_scale, BLOCK_N, HEAD_DIM, ROPE, False, PRECISION)
    if full < L_K:
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptr, v_ptr, full, sk_l, sv_l, L_K, pos, spos_l, spos_c, COS, SIN,
                                  qk_scale, BLOCK_N, HEAD_DIM, ROPE, True, PRECISION)
    acc = acc / l_i[:, None]
    d = tl.arange(0, HEAD_DIM)
    o_ptrs = O + _head_offsets(pid_bh, H, so_b, so_h) + rows.to(tl.int64)[:, None] * so_l + d[None, :]
    tl.store(o_ptrs, cast(acc, O.dtype.element_ty, PRECISION), mask=(rows < L_Q)[:, None])
    if RETURN_LSE:  # natural-log LSE of the scaled scores, (B, H, L_Q) fp32
        tl.store(LSE + pid_bh.to(tl.int64) * L_Q + rows, (m_i + tl.math.log2(l_i)) * 0.6931471805599453,
                 mask=rows < L_Q)


# ----------------------------------------------------------------------- backward
@triton.jit
def _bwd_delta(O, DO, DELTA, so_b, so_h, so_l, sdo_b, sdo_h, sdo_l, H, L, m_tiles,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O): the softmax-gradient correction term, (B, H, L) fp32."""
    pid = tl.program_id(0)
    pid_bh, pid_m = pid // m_tiles, pid % m_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    ok = (rows < L)[:, None]
    o = tl.load(O + _head_offsets(pid_bh, H, so_b, so_h) + rows.to(tl.int64)[:, None] * so_l + d[None, :],
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + _head_offsets(pid_bh, H, sdo_b, sdo_h) + rows.to(tl.int64)[:, None] * sdo_l + d[None, :],
                 mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * L + rows, tl.sum(o * do, 1), mask=rows < L)


@triton.jit
def _probabilities(q, k, lse2, rows, cols, L_Q, L_K, qk_scale, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Recompute P = softmax rows from the saved log2-sum-exp; zero outside the valid block."""
    s = mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), PRECISION)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    return tl.where((rows < L_Q)[:, None] & (cols < L_K)[None, :], p, 0.0)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, POS, COS, SIN,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sdo_b, sdo_h, sdo_l,
    sdk_b, sdk_h, sdk_l, sdv_b, sdv_h, sdv_l, spos_b, spos_l, spos_c,
    H, L_Q, L_K, n_tiles, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_bh, pid_n = pid // n_tiles, pid % n_tiles
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pos = _positions(POS, pid_bh, H, spos_b, ROPE)
    k = _load_rows(K + _head_offsets(pid_bh, H, sk_b, sk_h), cols, sk_l, L_K, pos, spos_l, spos_c, COS, SIN,
                   BLOCK_N, HEAD_DIM, ROPE, True, PRECISION)
    v = _load_rows(V + _head_offsets(pid_bh, H, sv_b, sv_h), cols, sv_l, L_K, pos, spos_l, spos_c, COS, SIN,
                   BLOCK_N, HEAD_DIM, False, True, PRECISION)
    q_ptr = Q + _head_offsets(pid_bh, H, sq_b, sq_h)
    do_ptr = DO + _head_offsets(pid_bh, H, sdo_b, sdo_h)
    row_stats = pid_bh.to(tl.int64) * L_Q
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, L_Q, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_ptr, rows, sq_l, L_Q, pos, spos_l, spos_c, COS, SIN, BLOCK_M, HEAD_DIM, ROPE, True, PRECISION)
        do = _load_rows(do_ptr, rows, sdo_l, L_Q, pos, spos_l, spos_c, COS, SIN, BLOCK_M, HEAD_DIM, False, True, PRECISION)
        lse2 = tl.load(LSE + row_stats + rows, mask=rows < L_Q, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_stats + rows, mask=rows < L_Q, other=0.0)
        p = _probabilities(q, k, lse2, rows, cols, L_Q, L_K, qk_scale, BLOCK_N, PRECISION)
        dv = mma(tl.trans(cast(p, do.dtype, PRECISION)), do, dv, PRECISION)
        dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION)
        ds = p * (dp - delta[:, None])
        dk = mma(tl.trans(cast(ds, q.dtype, PRECISION)), q, dk, PRECISION)
    dk *= sm_scale
    if ROPE:
        pos_y, pos_x = _load_positions(pos, cols, L_K, spos_l, spos_c)
        dk = _rope(dk, pos_y, pos_x, COS, SIN, BLOCK_N, HEAD_DIM, True)
    d = tl.arange(0, HEAD_DIM)
    ok = (cols < L_K)[:, None]
    tl.store(DK + _head_offsets(pid_bh, H, sdk_b, sdk_h) + cols.to(tl.int64)[:, None] * sdk_l + d[None, :],
             cast(dk, DK.dtype.element_ty, PRECISION), mask=ok)
    tl.store(DV + _head_offsets(pid_bh, H, sdv_b, sdv_h) + cols.to(tl.int64)[:, None] * sdv_l + d[None, :],
             cast(dv, DV.dtype.element_ty, PRECISION), mask=ok)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, POS, COS, SIN,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sdo_b, sdo_h, sdo_l, sdq_b, sdq_h, sdq_l, spos_b, spos_l, spos_c,
    H, L_Q, L_K, m_tiles, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_bh, pid_m = pid // m_tiles, pid % m_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = _positions(POS, pid_bh, H, spos_b, ROPE)
    q = _load_rows(Q + _head_offsets(pid_bh, H, sq_b, sq_h), rows, sq_l, L_Q, pos, spos_l, spos_c, COS, SIN,
                   BLOCK_M, HEAD_DIM, ROPE, True, PRECISION)
    do = _load_rows(DO + _head_offsets(pid_bh, H, sdo_b, sdo_h), rows, sdo_l, L_Q, pos, spos_l, spos_c, COS, SIN,
                    BLOCK_M, HEAD_DIM, False, True, PRECISION)
    row_stats = pid_bh.to(tl.int64) * L_Q
    lse2 = tl.load(LSE + row_stats + rows, mask=rows < L_Q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_stats + rows, mask=rows < L_Q, other=0.0)
    k_ptr = K + _head_offsets(pid_bh, H, sk_b, sk_h)
    v_ptr = V + _head_offsets(pid_bh, H, sv_b, sv_h)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, L_K, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, cols, sk_l, L_K, pos, spos_l, spos_c, COS, SIN, BLOCK_N, HEAD_DIM, ROPE, True, PRECISION)
        v = _load_rows(v_ptr, cols, sv_l, L_K, pos, spos_l, spos_c, COS, SIN, BLOCK_N, HEAD_DIM, False, True, PRECISION)
        p = _probabilities(q, k, lse2, rows, cols, L_Q, L_K, qk_scale, BLOCK_N, PRECISION)
        dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION)
        ds = p * (dp - delta[:, None])
        dq = mma(cast(ds, k.dtype, PRECISION), k, dq, PRECISION)
    dq *= sm_scale
    if ROPE:
        pos_y, pos_x = _load_positions(pos, rows, L_Q, spos_l, spos_c)
        dq = _rope(dq, pos_y, pos_x, COS, SIN, BLOCK_M, HEAD_DIM, True)
    d = tl.arange(0, HEAD_DIM)
    tl.store(DQ + _head_offsets(pid_bh, H, sdq_b, sdq_h) + rows.to(tl.int64)[:, None] * sdq_l + d[None, :],
             cast(dq, DQ.dtype.element_ty, PRECISION), mask=(rows < L_Q)[:, None])


# ---------------------------------------------------------------------- launchers
FWD_BLOCKS = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
BWD_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


@functools.lru_cache(maxsize=16)
def rope_tables(n_pos: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables (n_pos, head_dim/4): angle pos * base^(-2i / (head_dim/2)), as RoPE2D computes it."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=device).float() / half))
    angles = torch.outer(torch.arange(n_pos, device=device, dtype=torch.float32), inv_freq)
    return angles.cos().contiguous(), angles.sin().contiguous()


def _rope_inputs(pos: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, cos, sin) for the kernels; reads pos.min/max (one small device sync)."""
    lowest, highest = (int(v) for v in pos.aminmax())
    if lowest < 0:
        raise ValueError(f"rope_pos holds {lowest}; token positions must be >= 0")
    return (pos, *rope_tables(highest + 1, head_dim, base, pos.device))


def _strides(t: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, head, token) strides of a 4-D tensor in the given layout."""
    if layout == "BLHD":
        return t.stride(0), t.stride(2), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _dims(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(B, H, L, D) of a tensor in the given layout."""
    b, x, y, d = t.shape
    return (b, y, x, d) if layout == "BLHD" else (b, x, y, d)


def _rope_args(rope) -> tuple:
    if rope is None:
        return None, None, None, 0, 0, 0
    pos, cos, sin = rope
    return pos, cos, sin, *pos.stride()


def attention_forward(q, k, v, scale: float, layout: str, rope=None, return_lse: bool = False, **blocks):
    """-> (out in q's layout, lse (B, H, L_Q) fp32 or None)."""
    b, h, l_q, d = _dims(q, layout)
    l_k = _dims(k, layout)[2]
    cfg = {**FWD_BLOCKS, **blocks}
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, h, l_q), dtype=torch.float32, device=q.device) if return_lse else None
    pos, cos, sin, spos_b, spos_l, spos_c = _rope_args(rope)
    m_tiles = triton.cdiv(l_q, cfg["BLOCK_M"])
    _attn_fwd[(b * h * m_tiles,)](
        q, k, v, out, lse, pos, cos, sin,
        *_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(out, layout), spos_b, spos_l, spos_c,
        h, l_q, l_k, m_tiles, scale * LOG2E,
        HEAD_DIM=d, ROPE=rope is not None, RETURN_LSE=return_lse, PRECISION=precision(q.dtype), **cfg,
    )
    return out, lse


def attention_backward(do, q, k, v, out, lse, scale: float, layout: str, rope=None, **blocks):
    """-> (dq, dk, dv), each contiguous in ``layout``."""
    b, h, l_q, d = _dims(q, layout)
    l_k = _dims(k, layout)[2]
    cfg = {**BWD_BLOCKS, **blocks}
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty((b, h, l_q), dtype=torch.float32, device=q.device)
    m_tiles = triton.cdiv(l_q, cfg["BLOCK_M"])
    n_tiles = triton.cdiv(l_k, cfg["BLOCK_N"])
    _bwd_delta[(b * h * m_tiles,)](out, do, delta, *_strides(out, layout), *_strides(do, layout), h, l_q, m_tiles,
                                   HEAD_DIM=d, BLOCK_M=cfg["BLOCK_M"])
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    pos, cos, sin, spos_b, spos_l, spos_c = _rope_args(rope)
    common = dict(HEAD_DIM=d, ROPE=rope is not None, PRECISION=precision(q.dtype), **cfg)
    strides_in = (*_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(do, layout))
    _attn_bwd_dkdv[(b * h * n_tiles,)](
        q, k, v, do, lse, delta, dk, dv, pos, cos, sin, *strides_in,
        *_strides(dk, layout), *_strides(dv, layout), spos_b, spos_l, spos_c,
        h, l_q, l_k, n_tiles, scale * LOG2E, scale, **common,
    )
    _attn_bwd_dq[(b * h * m_tiles,)](
        q, k, v, do, lse, delta, dq, pos, cos, sin, *strides_in, *_strides(dq, layout), spos_b, spos_l, spos_c,
        h, l_q, l_k, m_tiles, scale * LOG2E, scale, **common,
    )
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, layout, rope_pos, rope_base, return_lse):
        rope = _rope_inputs(rope_pos, q.shape[-1], rope_base) if rope_pos is not None else None
        needs_lse = return_lse or any(ctx.needs_input_grad[:3])
        out, lse = attention_forward(q, k, v, scale, layout, rope, needs_lse)
        ctx.save_for_backward(q, k, v, out, lse, *(rope or ()))
        ctx.scale, ctx.layout = scale, layout
        if return_lse:
            ctx.mark_non_differentiable(lse)
            return out, lse
        return out

    @staticmethod
    def backward(ctx, do, *_):
        q, k, v, out, lse, *rope = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, out, lse, ctx.scale, ctx.layout, tuple(rope) or None)
        return dq, dk, dv, None, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    layout: str = "BLHD",
    rope_pos: torch.Tensor | None = None,
    rope_base: float = 100.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T) v over all keys (no mask), per batch and head.

    q: (B, L_Q, H, D) for ``layout="BLHD"`` (the view of a packed qkv projection, any
       token stride) or (B, H, L_Q, D) for ``"BHLD"``; k, v likewise with L_K keys.
       D in {32, 64, 128}; bf16, fp16 or fp32 (fp32 computes with fp32 products).
    scale: softmax scale, default 1/sqrt(D) (Fast3R's fusion blocks pass their temperature).
    rope_pos: optional (B, L, 2) integer (y, x) token positions; q and k are then rotated
       by RoPE-2D with ``rope_base`` inside the kernel (self-attention, L_Q == L_K).
    return_lse: also return the natural-log sum-exp of each row's scaled scores,
       (B, H, L_Q) fp32, to merge partial attentions computed over key shards.
    Returns the output in q's layout (and the LSE).
    """
    _check(q, k, v, layout, rope_pos)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale={scale}; the softmax scale must be a positive finite number")
    return AttentionFunction.apply(q, k, v, scale, layout, rope_pos, float(rope_base), return_lse)


def _check(q, k, v, layout, rope_pos) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; use 'BLHD' (batch, tokens, heads, dim) or 'BHLD'")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_device(name, t, q.device)
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 4-D {layout}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} is {t.dtype} but q is {q.dtype}; pass q, k, v in one dtype")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dimension; pass {name}.contiguous()")
    (b, h, _, d), (bk, hk, lk, dk), (bv, hv, lv, dv) = (_dims(t, layout) for t in (q, k, v))
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported; supported head dims: {HEAD_DIMS}")
    if (bk, hk, dk) != (b, h, d) or (bv, hv, lv, dv) != (b, h, lk, d):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not match in {layout}: "
                         "batch, heads and head dim must agree, and k and v must have the same length")
    if rope_pos is not None:
        check_device("rope_pos", rope_pos, q.device)
        l_q = _dims(q, layout)[2]
        if rope_pos.dtype.is_floating_point or rope_pos.dtype == torch.bool:
            raise TypeError(f"rope_pos has dtype {rope_pos.dtype}; pass integer (y, x) token positions")
        if rope_pos.shape != (b, l_q, 2):
            raise ValueError(f"rope_pos has shape {tuple(rope_pos.shape)}; expected ({b}, {l_q}, 2) (y, x) per token")
        if lk != l_q:
            raise ValueError("rope_pos needs self-attention (q and k of equal length)")
