"""Fused multi-head attention (non-causal), FlashAttention-2 style, with optional RoPE-2D.

Forward: a program owns BLOCK_M query rows of one (batch, head) and streams K/V in
BLOCK_N tiles, keeping the running row max m, row sum l and the output accumulator in
registers (online softmax), so the L x L score matrix never exists. The softmax runs in
the exp2 domain with ``scale * log2(e)`` folded into one multiply-subtract per score, and
the accumulator is divided by l once, at the end. Only the last K/V tile is masked.

Memory access: every tile moves through a rank-4 TMA tensor descriptor over the
(B, L, H, D) (or (B, H, L, D)) view as it is, so the q/k/v views of a packed qkv
projection (token stride 3*H*D) are read in place, with no transpose or copy; the
copy engine zero-fills rows past a ragged sequence end and clips stores there, and its
loads are software-pipelined across K/V tiles. Coordinates are per dimension, so
sequences past 2^31 elements (1.2 M tokens of packed qkv) address correctly.

RoPE-2D: with ``rope_pos`` the kernel rotates q and k as it loads them, one quarter of
the head dimension at a time (y rotates quarters 0/1 into each other, x quarters 2/3),
in fp32 with angles from an fp32 cos/sin table. Scores are then the sum of four
quarter-width products, the same tensor-core work as one full-width product, and
rotated q/k never exist in memory.

Backward: dK/dV in one pass over query tiles, dQ in another over key tiles; no atomics,
so gradients are bitwise reproducible run to run. RoPE's gradient is the inverse rotation.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import tuning
from ._config import (
    autocast_dtype,
    cast,
    check_device,
    check_float,
    device_guard,
    mma,
    precision,
)

HEAD_DIMS = (32, 64, 128)
# RoPE rotates quarters of the head: at D=32 a quarter-width product has K=8, below the
# tensor cores' (and tl.dot's) minimum of 16, so RoPE needs D >= 64.
ROPE_HEAD_DIMS = (64, 128)
LAYOUTS = ("BLHD", "BHLD")
LOG2E = 1.4426950408889634
# RoPE table rows when positions are not given a bound and cannot be read (torch.compile): a 65,536-pixel side.
TRACED_ROPE_POSITIONS = 4096


# ----------------------------------------------------------------- tile access
@triton.jit
def _load(desc, b, h, row, col, ROWS: tl.constexpr, COLS: tl.constexpr, BHLD: tl.constexpr):
    """(ROWS, COLS) tile of head h of batch b, starting at token ``row`` and feature ``col``."""
    if BHLD:
        tile = desc.load([b, h, row, col])
    else:
        tile = desc.load([b, row, h, col])
    return tile.reshape(ROWS, COLS)


@triton.jit
def _store(desc, b, h, row, col, tile, ROWS: tl.constexpr, COLS: tl.constexpr, BHLD: tl.constexpr):
    if BHLD:
        desc.store([b, h, row, col], tile.reshape(1, 1, ROWS, COLS))
    else:
        desc.store([b, row, h, col], tile.reshape(1, ROWS, 1, COLS))


# ------------------------------------------------------------------------ RoPE
@triton.jit
def _cos_sin(POS, COS, SIN, pos_b, rows, L, spos_l, spos_c, n_pos, QUARTER: tl.constexpr):
    """cos/sin (ROWS, QUARTER) of the tokens' y and x angles, from the (n_pos, QUARTER) tables.

    Positions are clamped to the table, so a position the caller promised to keep below
    n_pos but did not can never read outside it.
    """
    ok = rows < L
    ptrs = POS + pos_b + rows.to(tl.int64) * spos_l
    py = tl.load(ptrs, mask=ok, other=0).to(tl.int32)
    px = tl.load(ptrs + spos_c, mask=ok, other=0).to(tl.int32)
    py = tl.minimum(tl.maximum(py, 0), n_pos - 1)[:, None] * QUARTER
    px = tl.minimum(tl.maximum(px, 0), n_pos - 1)[:, None] * QUARTER
    f = tl.arange(0, QUARTER)[None, :]
    return tl.load(COS + py + f), tl.load(SIN + py + f), tl.load(COS + px + f), tl.load(SIN + px + f)


@triton.jit
def _rotated_quarters(desc4, b, h, row, L, POS, COS, SIN, pos_b, spos_l, spos_c, n_pos,
                      ROWS: tl.constexpr, QUARTER: tl.constexpr, BHLD: tl.constexpr, PRECISION: tl.constexpr):
    """Load rows of q or k as four (ROWS, QUARTER) quarters and rotate them by RoPE-2D, in fp32."""
    x0 = _load(desc4, b, h, row, 0, ROWS, QUARTER, BHLD).to(tl.float32)
    x1 = _load(desc4, b, h, row, QUARTER, ROWS, QUARTER, BHLD).to(tl.float32)
    x2 = _load(desc4, b, h, row, 2 * QUARTER, ROWS, QUARTER, BHLD).to(tl.float32)
    x3 = _load(desc4, b, h, row, 3 * QUARTER, ROWS, QUARTER, BHLD).to(tl.float32)
    cy, sy, cx, sx = _cos_sin(POS, COS, SIN, pos_b, row + tl.arange(0, ROWS), L, spos_l, spos_c, n_pos, QUARTER)
    dtype: tl.constexpr = desc4.dtype
    return (cast(x0 * cy - x1 * sy, dtype, PRECISION), cast(x1 * cy + x0 * sy, dtype, PRECISION),
            cast(x2 * cx - x3 * sx, dtype, PRECISION), cast(x3 * cx + x2 * sx, dtype, PRECISION))


@triton.jit
def _store_unrotated(desc4, b, h, row, g0, g1, g2, g3, L, POS, COS, SIN, pos_b, spos_l, spos_c, n_pos,
                     ROWS: tl.constexpr, QUARTER: tl.constexpr, BHLD: tl.constexpr, PRECISION: tl.constexpr):
    """Store gradient quarters taken w.r.t. rotated q/k as gradients w.r.t. the inputs (inverse rotation)."""
    cy, sy, cx, sx = _cos_sin(POS, COS, SIN, pos_b, row + tl.arange(0, ROWS), L, spos_l, spos_c, n_pos, QUARTER)
    dtype: tl.constexpr = desc4.dtype
    _store(desc4, b, h, row, 0, cast(g0 * cy + g1 * sy, dtype, PRECISION), ROWS, QUARTER, BHLD)
    _store(desc4, b, h, row, QUARTER, cast(g1 * cy - g0 * sy, dtype, PRECISION), ROWS, QUARTER, BHLD)
    _store(desc4, b, h, row, 2 * QUARTER, cast(g2 * cx + g3 * sx, dtype, PRECISION), ROWS, QUARTER, BHLD)
    _store(desc4, b, h, row, 3 * QUARTER, cast(g3 * cx - g2 * sx, dtype, PRECISION), ROWS, QUARTER, BHLD)


@triton.jit
def _q_or_k(desc, desc4, b, h, row, L, POS, COS, SIN, pos_b, spos_l, spos_c, n_pos,
            ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BHLD: tl.constexpr, ROPE: tl.constexpr,
            PRECISION: tl.constexpr):
    """q or k rows: four rotated quarters with RoPE, else the full tile (repeated, the extra three unused)."""
    if ROPE:
        x0, x1, x2, x3 = _rotated_quarters(desc4, b, h, row, L, POS, COS, SIN, pos_b, spos_l, spos_c, n_pos,
                                           ROWS, HEAD_DIM // 4, BHLD, PRECISION)
    else:
        x0 = _load(desc, b, h, row, 0, ROWS, HEAD_DIM, BHLD)
        x1, x2, x3 = x0, x0, x0
    return x0, x1, x2, x3


@triton.jit
def _scores(a0, a1, a2, a3, b0, b1, b2, b3, ROWS: tl.constexpr, COLS: tl.constexpr, ROPE: tl.constexpr,
            PRECISION: tl.constexpr):
    """a @ b^T in fp32, as four quarter-width products with RoPE."""
    s = mma(a0, tl.trans(b0), tl.zeros([ROWS, COLS], dtype=tl.float32), PRECISION)
    if ROPE:
        s = mma(a1, tl.trans(b1), s, PRECISION)
        s = mma(a2, tl.trans(b2), s, PRECISION)
        s = mma(a3, tl.trans(b3), s, PRECISION)
    return s


# --------------------------------------------------------------------- forward
@triton.jit
def _attn_fwd(
    q_desc, k_desc, v_desc, o_desc, q4_desc, k4_desc, LSE, POS, COS, SIN, spos_b, spos_l, spos_c, n_pos,
    H, L_Q, L_K, m_tiles, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BHLD: tl.constexpr,
    ROPE: tl.constexpr, RETURN_LSE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bh, start_m = pid // m_tiles, (pid % m_tiles) * BLOCK_M
    b, h = bh // H, bh % H
    pos_b = b.to(tl.int64) * spos_b
    q0, q1, q2, q3 = _q_or_k(q_desc, q4_desc, b, h, start_m, L_Q, POS, COS, SIN, pos_b, spos_l, spos_c, n_pos,
                             BLOCK_M, HEAD_DIM, BHLD, ROPE, PRECISION)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Full tiles run unmasked; the ragged last tile, if any, is masked on its own.
    full = (L_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q0, q1, q2, q3, k_desc, k4_desc, v_desc, b, h, start_n, L_K,
                                  POS, COS, SIN, pos_b, spos_l, spos_c, n_pos, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM,
                                  BHLD, ROPE, False, PRECISION)
    if full < L_K:
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q0, q1, q2, q3, k_desc, k4_desc, v_desc, b, h, full, L_K,
                                  POS, COS, SIN, pos_b, spos_l, spos_c, n_pos, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM,
                                  BHLD, ROPE, True, PRECISION)
    out = cast(acc / l_i[:, None], o_desc.dtype, PRECISION)
    _store(o_desc, b, h, start_m, 0, out, BLOCK_M, HEAD_DIM, BHLD)
    if RETURN_LSE:  # natural-log sum-exp of the scaled scores, (B, H, L_Q) fp32
        rows = start_m + tl.arange(0, BLOCK_M)
        tl.store(LSE + bh.to(tl.int64) * L_Q + rows, (m_i + tl.math.log2(l_i)) / 1.4426950408889634,
                 mask=rows < L_Q)


@triton.jit
def _fwd_tile(acc, m_i, l_i, q0, q1, q2, q3, k_desc, k4_desc, v_desc, b, h, start_n, L_K,
              POS, COS, SIN, pos_b, spos_l, spos_c, n_pos, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BHLD: tl.constexpr,
              ROPE: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    k0, k1, k2, k3 = _q_or_k(k_desc, k4_desc, b, h, start_n, L_K, POS, COS, SIN, pos_b, spos_l, spos_c, n_pos,
                             BLOCK_N, HEAD_DIM, BHLD, ROPE, PRECISION)
    s = _scores(q0, q1, q2, q3, k0, k1, k2, k3, BLOCK_M, BLOCK_N, ROPE, PRECISION)
    if MASK:  # keys past L_K were zero-filled: a -inf column bias excludes them from the softmax
        s += tl.where(start_n + tl.arange(0, BLOCK_N) < L_K, 0.0, float("-inf"))[None, :]
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load(v_desc, b, h, start_n, 0, BLOCK_N, HEAD_DIM, BHLD)
    acc = mma(cast(p, v.dtype, PRECISION), v, acc * alpha[:, None], PRECISION)
    return acc, m_new, l_i


# -------------------------------------------------------------------- backward
@triton.jit
def _bwd_delta(o_desc, do_desc, DELTA, H, L, m_tiles,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BHLD: tl.constexpr):
    """delta = rowsum(dO * O): the softmax-gradient correction term, (B, H, L) fp32."""
    pid = tl.program_id(0)
    bh, start_m = pid // m_tiles, (pid % m_tiles) * BLOCK_M
    b, h = bh // H, bh % H
    o = _load(o_desc, b, h, start_m, 0, BLOCK_M, HEAD_DIM, BHLD).to(tl.float32)
    do = _load(do_desc, b, h, start_m, 0, BLOCK_M, HEAD_DIM, BHLD).to(tl.float32)
    rows = start_m + tl.arange(0, BLOCK_M)
    tl.store(DELTA + bh.to(tl.int64) * L + rows, tl.sum(o * do, 1), mask=rows < L)


@triton.jit
def _row_stats(LSE, DELTA, bh, rows, L_Q):
    """The forward's log2-sum-exp and the delta term of these query rows."""
    offsets = bh.to(tl.int64) * L_Q + rows
    lse2 = tl.load(LSE + offsets, mask=rows < L_Q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + offsets, mask=rows < L_Q, other=0.0)
    return lse2, delta


@triton.jit
def _zero_grads(ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """Gradient accumulators: four quarter-width ones with RoPE, else one (repeated, unused copies)."""
    if ROPE:
        g0 = tl.zeros([ROWS, HEAD_DIM // 4], dtype=tl.float32)
        g1, g2, g3 = tl.zeros_like(g0), tl.zeros_like(g0), tl.zeros_like(g0)
    else:
        g0 = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
        g1, g2, g3 = g0, g0, g0
    return g0, g1, g2, g3


@triton.jit
def _accumulate(g0, g1, g2, g3, lhs, r0, r1, r2, r3, ROPE: tl.constexpr, PRECISION: tl.constexpr):
    """g_i += lhs @ r_i for each quarter with RoPE, else g0 += lhs @ r0."""
    g0 = mma(lhs, r0, g0, PRECISION)
    if ROPE:
        g1 = mma(lhs, r1, g1, PRECISION)
        g2 = mma(lhs, r2, g2, PRECISION)
        g3 = mma(lhs, r3, g3, PRECISION)
    return g0, g1, g2, g3


@triton.jit
def _store_grad(desc, desc4, b, h, row, g0, g1, g2, g3, sm_scale, L, POS, COS, SIN, pos_b, spos_l, spos_c, n_pos,
                ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BHLD: tl.constexpr, ROPE: tl.constexpr,
                PRECISION: tl.constexpr):
    """Scale a dq/dk accumulator by the softmax scale and store it, un-rotating it with RoPE."""
    if ROPE:
        _store_unrotated(desc4, b, h, row, g0 * sm_scale, g1 * sm_scale, g2 * sm_scale, g3 * sm_scale,
                         L, POS, COS, SIN, pos_b, spos_l, spos_c, n_pos, ROWS, HEAD_DIM // 4, BHLD, PRECISION)
    else:
        _store(desc, b, h, row, 0, cast(g0 * sm_scale, desc.dtype, PRECISION), ROWS, HEAD_DIM, BHLD)


@triton.jit
def _probabilities(s, lse2, rows, cols, L_Q, L_K, qk_scale):
    """P recomputed from scores and the saved log2-sum-exp; zero outside the valid block."""
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    return tl.where((rows < L_Q)[:, None] & (cols < L_K)[None, :], p, 0.0)


@triton.jit
def _attn_bwd_dkdv(
    q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, q4_desc, k4_desc, dk4_desc,
    LSE, DELTA, POS, COS, SIN, spos_b, spos_l, spos_c, n_pos, H, L_Q, L_K, n_tiles, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BHLD: tl.constexpr,
    ROPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bh, start_n = pid // n_tiles, (pid % n_tiles) * BLOCK_N
    b, h = bh // H, bh % H
    pos_b = b.to(tl.int64) * spos_b
    cols = start_n + tl.arange(0, BLOCK_N)
    k0, k1, k2, k3 = _q_or_k(k_desc, k4_desc, b, h, start_n, L_K, POS, COS, SIN, pos_b, spos_l, spos_c, n_pos,
                             BLOCK_N, HEAD_DIM, BHLD, ROPE, PRECISION)
    v = _load(v_desc, b, h, start_n, 0, BLOCK_N, HEAD_DIM, BHLD)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk0, dk1, dk2, dk3 = _zero_grads(BLOCK_N, HEAD_DIM, ROPE)
    for start_m in range(0, L_Q, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q0, q1, q2, q3 = _q_or_k(q_desc, q4_desc, b, h, start_m, L_Q, POS, COS, SIN, pos_b, spos_l, spos_c, n_pos,
                                 BLOCK_M, HEAD_DIM, BHLD, ROPE, PRECISION)
        do = _load(do_desc, b, h, start_m, 0, BLOCK_M, HEAD_DIM, BHLD)
        lse2, delta = _row_stats(LSE, DELTA, bh, rows, L_Q)
        s = _scores(q0, q1, q2, q3, k0, k1, k2, k3, BLOCK_M, BLOCK_N, ROPE, PRECISION)
        p = _probabilities(s, lse2, rows, cols, L_Q, L_K, qk_scale)
        dv = mma(tl.trans(cast(p, do.dtype, PRECISION)), do, dv, PRECISION)
        dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION)
        ds_t = tl.trans(cast(p * (dp - delta[:, None]), do.dtype, PRECISION))
        dk0, dk1, dk2, dk3 = _accumulate(dk0, dk1, dk2, dk3, ds_t, q0, q1, q2, q3, ROPE, PRECISION)
    _store(dv_desc, b, h, start_n, 0, cast(dv, dv_desc.dtype, PRECISION), BLOCK_N, HEAD_DIM, BHLD)
    _store_grad(dk_desc, dk4_desc, b, h, start_n, dk0, dk1, dk2, dk3, sm_scale, L_K, POS, COS, SIN, pos_b,
                spos_l, spos_c, n_pos, BLOCK_N, HEAD_DIM, BHLD, ROPE, PRECISION)


@triton.jit
def _attn_bwd_dq(
    q_desc, k_desc, v_desc, do_desc, dq_desc, q4_desc, k4_desc, dq4_desc,
    LSE, DELTA, POS, COS, SIN, spos_b, spos_l, spos_c, n_pos, H, L_Q, L_K, m_tiles, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BHLD: tl.constexpr,
    ROPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bh, start_m = pid // m_tiles, (pid % m_tiles) * BLOCK_M
    b, h = bh // H, bh % H
    pos_b = b.to(tl.int64) * spos_b
    rows = start_m + tl.arange(0, BLOCK_M)
    q0, q1, q2, q3 = _q_or_k(q_desc, q4_desc, b, h, start_m, L_Q, POS, COS, SIN, pos_b, spos_l, spos_c, n_pos,
                             BLOCK_M, HEAD_DIM, BHLD, ROPE, PRECISION)
    do = _load(do_desc, b, h, start_m, 0, BLOCK_M, HEAD_DIM, BHLD)
    lse2, delta = _row_stats(LSE, DELTA, bh, rows, L_Q)
    dq0, dq1, dq2, dq3 = _zero_grads(BLOCK_M, HEAD_DIM, ROPE)
    for start_n in range(0, L_K, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k0, k1, k2, k3 = _q_or_k(k_desc, k4_desc, b, h, start_n, L_K, POS, COS, SIN, pos_b, spos_l, spos_c, n_pos,
                                 BLOCK_N, HEAD_DIM, BHLD, ROPE, PRECISION)
        v = _load(v_desc, b, h, start_n, 0, BLOCK_N, HEAD_DIM, BHLD)
        s = _scores(q0, q1, q2, q3, k0, k1, k2, k3, BLOCK_M, BLOCK_N, ROPE, PRECISION)
        p = _probabilities(s, lse2, rows, cols, L_Q, L_K, qk_scale)
        dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION)
        ds = cast(p * (dp - delta[:, None]), do.dtype, PRECISION)
        dq0, dq1, dq2, dq3 = _accumulate(dq0, dq1, dq2, dq3, ds, k0, k1, k2, k3, ROPE, PRECISION)
    _store_grad(dq_desc, dq4_desc, b, h, start_m, dq0, dq1, dq2, dq3, sm_scale, L_Q, POS, COS, SIN, pos_b,
                spos_l, spos_c, n_pos, BLOCK_M, HEAD_DIM, BHLD, ROPE, PRECISION)


# ------------------------------------------------------------------- launchers
def rope_tables(n_pos: int, head_dim: int, base: float, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables (n_pos, head_dim/4): angle pos * base^(-2i / (head_dim/2)), i < head_dim/4.

    The one definition of RoPE-2D's angles: the kernels read these tables and the PyTorch
    reference (``rope_rotate``) rotates with the same values. Eager: cached per size and
    device, built outside inference mode, so a table first made under
    ``torch.inference_mode()`` can still be saved for a later backward. Under torch.compile
    they are computed in the graph (a few tiny ops Inductor folds), not read from a cache.
    """
    if torch.compiler.is_compiling():
        return _rope_angles(int(n_pos), int(head_dim), float(base), torch.device(device))
    return _cached_rope_tables(int(n_pos), int(head_dim), float(base), torch.device(device))


@functools.lru_cache(maxsize=32)
def _cached_rope_tables(n_pos: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode(False), torch.no_grad():
        return _rope_angles(n_pos, head_dim, base, device)


def _rope_angles(n_pos: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=device).float() / half))
    angles = torch.outer(torch.arange(n_pos, device=device, dtype=torch.float32), inv_freq)
    return angles.cos().contiguous(), angles.sin().contiguous()


def _rope_inputs(pos: torch.Tensor, head_dim: int, base: float, n_pos: int | None):
    """(positions, cos, sin) for the kernels.

    With ``n_pos`` known on the host (the patch grid) there is no device sync; positions are
    clamped to the table inside the kernel. Without it, pos.min/max are read (one sync) in
    eager; under torch.compile, which cannot read them, the table covers TRACED_ROPE_POSITIONS.
    """
    if n_pos is None and torch.compiler.is_compiling():
        n_pos = TRACED_ROPE_POSITIONS
    if n_pos is None:
        lowest, highest = (int(v) for v in pos.aminmax())
        if lowest < 0:
            raise ValueError(f"rope_pos holds {lowest}; token positions must be >= 0")
        n_pos = highest + 1
    return (pos, *rope_tables(n_pos, head_dim, base, pos.device))


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """t itself if TMA can address it (unit last stride, 16-byte aligned offset and strides), else a copy.

    The descriptors assume a unit last stride: an incoming gradient with any other (an
    expanded or transposed dO) must be copied, or its elements would be read as if packed.
    Alignment is read from the storage offset (allocations are 512-byte aligned); every stride,
    size-1 dimensions' too, must be aligned, since the descriptors take t's own strides.
    """
    size = t.element_size()
    aligned = t.stride(-1) == 1 and (t.storage_offset() * size) % 16 == 0 and all(
        s > 0 and (s * size) % 16 == 0 for s in t.stride()[:-1])
    return t if aligned else t.contiguous()


def _descriptor(t: torch.Tensor, layout: str, rows: int, cols: int) -> TensorDescriptor:
    """Rank-4 descriptor over t's own shape and strides, loading (rows tokens x cols features) of one head."""
    return TensorDescriptor.from_tensor(t, [1, rows, 1, cols] if layout == "BLHD" else [1, 1, rows, cols])


def _quarter_descriptor(t: torch.Tensor, layout: str, rows: int, rope) -> TensorDescriptor | None:
    """Descriptor of quarter-width tiles, which RoPE rotates; None without RoPE."""
    return _descriptor(t, layout, rows, t.shape[-1] // 4) if rope is not None else None


def _dims(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(B, H, L, D) of a tensor in the given layout."""
    b, x, y, d = t.shape
    return (b, y, x, d) if layout == "BLHD" else (b, x, y, d)


def _rope_args(rope) -> tuple:
    """POS, COS, SIN, spos_b, spos_l, spos_c, n_pos of the kernels."""
    if rope is None:
        return None, None, None, 0, 0, 0, 1
    pos, cos, sin = rope
    return pos, cos, sin, *pos.stride(), cos.shape[0]


def attention_forward(q, k, v, scale: float, layout: str, rope=None, return_lse: bool = False, **blocks):
    """-> (out in q's layout, contiguous; lse (B, H, L_Q) fp32 or None)."""
    q, k, v = (_tma_ready(t) for t in (q, k, v))
    b, h, l_q, d = _dims(q, layout)
    l_k = _dims(k, layout)[2]
    cfg = {**tuning.attention_forward_blocks(l_k, rope is not None, q.dtype), **blocks}
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, h, l_q), dtype=torch.float32, device=q.device) if return_lse else None
    m_tiles = triton.cdiv(l_q, bm)
    _attn_fwd[(b * h * m_tiles,)](
        _descriptor(q, layout, bm, d), _descriptor(k, layout, bn, d), _descriptor(v, layout, bn, d),
        _descriptor(out, layout, bm, d), _quarter_descriptor(q, layout, bm, rope),
        _quarter_descriptor(k, layout, bn, rope), lse, *_rope_args(rope),
        h, l_q, l_k, m_tiles, scale * LOG2E,
        HEAD_DIM=d, BHLD=layout == "BHLD", ROPE=rope is not None, RETURN_LSE=return_lse,
        PRECISION=precision(q.dtype), **cfg,
    )
    return out, lse


def attention_backward(do, q, k, v, out, lse, scale: float, layout: str, rope=None, **blocks):
    """-> (dq, dk, dv), each contiguous in ``layout``."""
    do, q, k, v = (_tma_ready(t) for t in (do, q, k, v))
    b, h, l_q, d = _dims(q, layout)
    l_k = _dims(k, layout)[2]
    cfg = {**tuning.attention_backward_blocks(q.dtype), **blocks}
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    m_tiles, n_tiles = triton.cdiv(l_q, bm), triton.cdiv(l_k, bn)
    bhld = layout == "BHLD"
    delta = torch.empty((b, h, l_q), dtype=torch.float32, device=q.device)
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    common = {"HEAD_DIM": d, "BHLD": bhld, "ROPE": rope is not None, "PRECISION": precision(q.dtype), **cfg}
    rope_args = _rope_args(rope)
    _bwd_delta[(b * h * m_tiles,)](_descriptor(out, layout, bm, d), _descriptor(do, layout, bm, d), delta,
                                   h, l_q, m_tiles, HEAD_DIM=d, BLOCK_M=bm, BHLD=bhld)
    _attn_bwd_dkdv[(b * h * n_tiles,)](
        _descriptor(q, layout, bm, d), _descriptor(k, layout, bn, d), _descriptor(v, layout, bn, d),
        _descriptor(do, layout, bm, d), _descriptor(dk, layout, bn, d), _descriptor(dv, layout, bn, d),
        _quarter_descriptor(q, layout, bm, rope), _quarter_descriptor(k, layout, bn, rope),
        _quarter_descriptor(dk, layout, bn, rope),
        lse, delta, *rope_args, h, l_q, l_k, n_tiles, scale * LOG2E, scale, **common,
    )
    _attn_bwd_dq[(b * h * m_tiles,)](
        _descriptor(q, layout, bm, d), _descriptor(k, layout, bn, d), _descriptor(v, layout, bn, d),
        _descriptor(do, layout, bm, d), _descriptor(dq, layout, bm, d),
        _quarter_descriptor(q, layout, bm, rope), _quarter_descriptor(k, layout, bn, rope),
        _quarter_descriptor(dq, layout, bm, rope),
        lse, delta, *rope_args, h, l_q, l_k, m_tiles, scale * LOG2E, scale, **common,
    )
    return dq, dk, dv


# ------------------------------------------------------------ RoPE in PyTorch
def rope_rotate(t: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                inverse: bool = False) -> torch.Tensor:
    """RoPE-2D on (B, H, L, D) in fp32, the rotation the kernels apply (inverse: the gradient's).

    The first half of each head rotates by the token's y, the second by its x, each half by
    the rotate-half convention; ``pos`` (B, L, 2) indexes the (n_pos, D/4) cos/sin tables.
    """
    sin = -sin if inverse else sin
    y, x = t.float().chunk(2, dim=-1)
    return torch.cat([_rotate_half(y, cos[pos[..., 0]], sin[pos[..., 0]]),
                      _rotate_half(x, cos[pos[..., 1]], sin[pos[..., 1]])], dim=-1)


def _rotate_half(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cat([cos, cos], dim=-1)[:, None], torch.cat([sin, sin], dim=-1)[:, None]
    first, second = t.chunk(2, dim=-1)
    return t * cos + torch.cat([-second, first], dim=-1) * sin


# ------------------------------------------------------------------ the ops
def _rope(pos, cos, sin):
    return None if pos is None else (pos, cos, sin)


# torch.compile / export see attention as one custom op that Inductor calls as an opaque kernel (not a
# triton_op it traces into): its kernels read every tile through host-side TMA descriptors, which PyTorch's
# non-Dynamo tracing cannot capture yet (torch 2.11-2.13, triton_kernel_wrap: "TMA descriptor capturing not
# yet supported in non-dynamo tracing"). LayerNorm, patch embedding and upsampling use plain pointers and are
# triton_ops. Either way compile, export and CUDA-graph capture work.
@torch.library.custom_op("fast3r::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layout: str,
                 rope_pos: torch.Tensor | None, rope_cos: torch.Tensor | None,
                 rope_sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale q k^T) v -> (out in q's layout, lse (B, H, L_Q) fp32): the op torch.compile and export see."""
    check_device("q", q)  # a custom op runs on real tensors only: CUDA, or the CPU under TRITON_INTERPRET
    with device_guard(q.device):
        return attention_forward(q, k, v, scale, layout, _rope(rope_pos, rope_cos, rope_sin), return_lse=True)


@attention_op.register_fake
def _attention_shapes(q, k, v, scale, layout, rope_pos, rope_cos, rope_sin):
    b, h, l_q, _ = _dims(q, layout)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, h, l_q), dtype=torch.float32)


@torch.library.custom_op("fast3r::attention_backward", mutates_args=())
def attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, scale: float, layout: str, rope_pos: torch.Tensor | None,
                          rope_cos: torch.Tensor | None,
                          rope_sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device("q", q)
    with device_guard(q.device):
        return attention_backward(do, q, k, v, out, lse, scale, layout, _rope(rope_pos, rope_cos, rope_sin))


@attention_backward_op.register_fake
def _attention_backward_shapes(do, q, k, v, out, lse, scale, layout, rope_pos, rope_cos, rope_sin):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _attention_setup(ctx, inputs, output):
    q, k, v, scale, layout, rope_pos, rope_cos, rope_sin = inputs
    ctx.save_for_backward(q, k, v, *output, rope_pos, rope_cos, rope_sin)
    ctx.scale, ctx.layout = scale, layout
    ctx.mark_non_differentiable(output[1])


def _attention_grad(ctx, do, _dlse):
    q, k, v, out, lse, rope_pos, rope_cos, rope_sin = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(do, q, k, v, out, lse, ctx.scale, ctx.layout, rope_pos, rope_cos, rope_sin)
    return dq, dk, dv, None, None, None, None, None


attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


def default_scale(head_dim: int) -> float:
    """The softmax scale when none is given: 1/sqrt(head dim)."""
    return head_dim**-0.5


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    layout: str = "BLHD",
    rope_pos: torch.Tensor | None = None,
    rope_base: float = 100.0,
    rope_num_pos: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T) v over all keys (no mask), per batch and head.

    q: (B, L_Q, H, D) for ``layout="BLHD"`` (the view of a packed qkv projection, any
       token stride) or (B, H, L_Q, D) for ``"BHLD"``; k, v likewise with L_K keys.
       D in {32, 64, 128}; bf16, fp16 or fp32 (fp32 computes with fp32 products).
       Under autocast, q, k, v are cast to the autocast dtype (as SDPA does).
    scale: softmax scale, default 1/sqrt(D) (Fast3R's fusion blocks pass their temperature).
    rope_pos: optional (B, L, 2) integer (y, x) token positions; q and k are then rotated
       by RoPE-2D with ``rope_base`` inside the kernel (self-attention, L_Q == L_K, D in {64, 128}).
    rope_num_pos: positions lie in [0, rope_num_pos) (the patch grid's larger side). Given,
       the call never waits for the GPU (CUDA-graph safe; positions are clamped to that
       range); omitted, the positions are read once to size and check the angle table.
    return_lse: also return the natural-log sum-exp of each row's scaled scores,
       (B, H, L_Q) fp32, to merge partial attentions computed over key shards.
    Returns the output in q's layout (and the LSE). Views whose base or strides are not
    16-byte aligned, or whose last stride is not 1, are copied once (the kernels read through
    TMA descriptors). Not supported: masks, dropout, causal attention, RoPE at D=32.
    """
    cast_to = autocast_dtype(q.device)
    if cast_to is not None:
        q, k, v = (t.to(cast_to) for t in (q, k, v))
    _check(q, k, v, layout, rope_pos, rope_num_pos)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    if not 0 < scale < math.inf:  # also False for NaN; a comparison, so torch.compile can trace it
        raise ValueError(f"scale={scale}; the softmax scale must be a positive finite number")
    rope = (None, None, None) if rope_pos is None else _rope_inputs(rope_pos, q.shape[-1], float(rope_base),
                                                                      rope_num_pos)
    out, lse = attention_op(q, k, v, scale, layout, *rope)
    return (out, lse) if return_lse else out


def _check(q, k, v, layout, rope_pos, rope_num_pos) -> None:
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
        if 0 in t.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; every dimension must be non-empty")
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
        if d not in ROPE_HEAD_DIMS:
            raise ValueError(f"RoPE at head dim {d} is not supported (its quarter-width products would be {d // 4} "
                             f"wide, below the tensor cores' 16); RoPE head dims: {ROPE_HEAD_DIMS}. Apply RoPE "
                             "before the call and pass rope_pos=None, or use a larger head dim")
        if rope_num_pos is not None and not (isinstance(rope_num_pos, int) and rope_num_pos >= 1):
            raise ValueError(f"rope_num_pos={rope_num_pos!r}; pass the number of positions, an int >= 1")
