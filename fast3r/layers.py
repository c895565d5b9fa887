"""Transformer building blocks of Fast3R, on the ops of one backend (``fast3r.backends``).

Module and parameter names follow the official checkpoint (``qkv``, ``proj``, ``norm1``,
``mlp.fc1`` ...), so state dicts load unchanged whichever backend the layers were built with.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fast3r_kernels.attention import default_scale
from fast3r_kernels.patch_embed import patch_positions

from .backends import Ops, Rope

# Fusion blocks were trained on 20 views and run on ~137 at inference; in eval mode the
# official model sharpens their softmax by sqrt(ln 137 / ln 20) to compensate.
TRAIN_VIEWS, INFERENCE_VIEWS = 20, 137
FUSION_TEMPERATURE = math.sqrt(math.log(INFERENCE_VIEWS) / math.log(TRAIN_VIEWS))
MLP_TOKEN_CHUNK = 65536  # tokens per MLP pass in inference: 512 MiB of bf16 hidden activations at width 4096


@dataclass(frozen=True)
class InPlace:
    """How a block runs in the lean inference plan (``fast3r.memory``): x is updated in place.

    queries: query tokens per attention call (K and V of every token are computed first, whole);
    mlp: tokens per MLP band; before_write(b, start, stop): called before rows [start, stop) of scene b
    of x are overwritten (the fusion waits there for those rows' copy to host memory).
    """

    queries: int
    mlp: int
    before_write: Callable[[int, int, int], None] | None = None


def _positions(grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
    """RoPE positions of a patch grid: cached in eager; computed in the graph under torch.compile."""
    if torch.compiler.is_compiling():
        return patch_positions(grid_h, grid_w, device)
    return _cached_positions(grid_h, grid_w, device)


@functools.lru_cache(maxsize=64)
def _cached_positions(grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # cached, so it must also serve a later training step
        return patch_positions(grid_h, grid_w, device)


def check_patch_grid(h: int, w: int, patch_size: int) -> None:
    if h % patch_size or w % patch_size or h == 0 or w == 0:
        raise ValueError(
            f"image size {h}x{w} is not a positive multiple of the patch size {patch_size}; "
            f"resize or crop to e.g. {max(patch_size, h // patch_size * patch_size)}x"
            f"{max(patch_size, w // patch_size * patch_size)}"
        )


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm on the backend's op; ``forward(x, residual)`` returns (x + residual, LN(x + residual))."""

    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__(dim, eps=eps)
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                residual_out: torch.Tensor | None = None):
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps, residual, residual_out)


class PatchEmbed(nn.Module):
    """16x16 stride-16 convolution from images to tokens (``proj`` keeps the conv's state-dict keys)."""

    def __init__(self, patch_size: int, dim: int, ops: Ops, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.ops = ops

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (N, 3, H, W) in [-1, 1], or uint8 RGB -> tokens (N, H/p * W/p, dim), their RoPE positions."""
        n, _, h, w = images.shape
        check_patch_grid(h, w, self.patch_size)
        tokens = self.ops.patch_embed(images, self.proj.weight, self.proj.bias, self.patch_size)
        grid_h, grid_w = h // self.patch_size, w // self.patch_size
        return tokens, _positions(grid_h, grid_w, images.device).expand(n, -1, -1)


class Attention(nn.Module):
    """Multi-head self-attention with optional RoPE-2D and the fusion eval-mode temperature."""

    def __init__(self, dim: int, num_heads: int, ops: Ops, rope: bool = False, fusion_temperature: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        ops.check_attention(head_dim, rope)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.ops = ops
        self.scale = default_scale(head_dim)
        self.attn_bias_for_inference_enabled = fusion_temperature
        self.attn_bias_scale = self.scale * FUSION_TEMPERATURE

    def softmax_scale(self) -> float:
        if self.attn_bias_for_inference_enabled and not self.training:
            return self.attn_bias_scale
        return self.scale

    def forward(self, x: torch.Tensor, rope: Rope | None = None, attend=None) -> torch.Tensor:
        """x: (B, L, dim). ``attend(q, k, v, scale)`` replaces the backend's attention (context parallelism)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)
        if attend is not None:
            out = attend(q, k, v, self.softmax_scale())
        else:
            out = self.ops.attention(q, k, v, self.softmax_scale(), rope)
        return self.proj(out.reshape(b, n, c))

    # Lean inference (Block with ``lean=``): the packed qkv projection split by its rows of weights, so K and V
    # of every token and the queries of one chunk are computed apart; the results equal the packed ones.
    def keys_values(self, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """y: (R, dim) normed tokens -> K and V rows (R, 2 * dim), the last two thirds of qkv, written into out."""
        d = y.shape[-1]
        return torch.addmm(self.qkv.bias[d:], y, self.qkv.weight[d:].t(), out=out)

    def queries(self, y: torch.Tensor) -> torch.Tensor:
        """y: (B, R, dim) normed tokens -> their queries (B, R, H, D), the first third of qkv."""
        b, r, d = y.shape
        return F.linear(y, self.qkv.weight[:d], self.qkv.bias[:d]).view(b, r, self.num_heads, d // self.num_heads)

    def attend_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend=None) -> torch.Tensor:
        """q (B, R, H, D) against every key k, v (B, L, H, D) -> (B * R, dim), before the projection."""
        scale = self.softmax_scale()
        out = self.ops.attention(q, k, v, scale, None) if attend is None else attend(q, k, v, scale)
        return out.reshape(-1, q.shape[2] * q.shape[3])


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    The second residual add and norm2 are one op (``norm2(h, residual=x)``), which the
    Triton backend runs as one fused kernel.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, ops: Ops, rope: bool = False,
                 fusion_temperature: bool = False):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps, ops)
        self.attn = Attention(dim, num_heads, ops, rope=rope, fusion_temperature=fusion_temperature)
        self.norm2 = LayerNorm(dim, eps, ops)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rope: Rope | None = None, attend=None, lean: InPlace | None = None
                ) -> torch.Tensor:
        """x: (B, L, dim). ``lean``: inference only, no RoPE; x is updated in place and returned."""
        if lean is not None:
            return self._forward_in_place(x, attend, lean)
        h = self.attn(self.norm1(x), rope, attend)
        if torch.is_grad_enabled():
            x, y = self.norm2(h, residual=x)
            return x + self.mlp(y)
        # Without autograd, x + h goes into h's fresh buffer and the MLP updates it in place, a band of
        # tokens at a time, so the 4x-wide MLP activation of a 300k-token fusion sequence never exists in full.
        width = x.shape[-1]
        for rows_h, rows_x in zip(h.view(-1, width).split(MLP_TOKEN_CHUNK), x.reshape(-1, width).split(MLP_TOKEN_CHUNK)):
            rows_h, y = self.norm2(rows_h, residual=rows_x, residual_out=rows_h)
            rows_h += self.mlp(y)
        return h

    def _forward_in_place(self, x: torch.Tensor, attend, plan: InPlace) -> torch.Tensor:
        """The lean block: K and V of every token (2 token buffers), then per chunk of queries the attention,
        projection, residual + norm2 and the MLP, each chunk's result written back into its rows of x.

        A chunk's queries read only their own rows of x and every key, and the keys are computed before any
        row changes, so updating x in place gives the fast path's result. Only 3 token buffers live (x, K, V)
        and a chunk's transients; under context parallelism the ring / Ulysses need every local query at
        once, so the queries and the attention output are whole there (2 more token buffers).
        """
        b, n, d = x.shape
        heads = self.attn.num_heads
        kv = x.new_empty(b, n, 2 * d)
        for i, rows in token_chunks(b, n, plan.queries):
            self.attn.keys_values(self.norm1(x[i, rows]), out=kv[i, rows])
        k, v = kv.view(b, n, 2, heads, d // heads).unbind(2)
        attended = None
        if attend is not None:
            attended = self.attn.attend_queries(self.attn.queries(self.norm1(x)), k, v, attend).view(b, n, d)
        for i, rows in token_chunks(b, n, plan.queries):
            if attended is None:
                h = self._attention_rows(x[i : i + 1, rows], k[i : i + 1], v[i : i + 1])
            else:
                h = self.attn.proj(attended[i, rows])
            if plan.before_write is not None:
                plan.before_write(i, rows.start, rows.stop)
            self._residual_mlp_rows(h, x[i, rows], plan.mlp)
            del h
        return x

    def _attention_rows(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """proj(attention(queries of norm1(x) against k, v)): x (1, R, dim) -> (R, dim); transients die here."""
        q = self.attn.queries(self.norm1(x))
        out = self.attn.attend_queries(q, k, v)
        del q
        return self.attn.proj(out)

    def _residual_mlp_rows(self, h: torch.Tensor, x: torch.Tensor, band: int) -> None:
        """x <- x + h, then x <- x + mlp(norm2(x)), in place, ``band`` rows at a time: h, x (R, dim)."""
        for rows_h, rows_x in zip(h.split(band), x.split(band)):
            rows_x, y = self.norm2(rows_h, residual=rows_x, residual_out=rows_x)
            rows_x += self.mlp(y)


def token_chunks(batch: int, length: int, size: int) -> Iterator[tuple[int, slice]]:
    """(scene index, token slice) of consecutive chunks of at most ``size`` tokens, scene by scene."""
    for i in range(batch):
        for start in range(0, length, size):
            yield i, slice(start, min(length, start + size))
