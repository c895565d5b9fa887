"""Drop-in nn.Modules over the fused kernels, state-dict compatible with what they replace.

Each keeps the parameters (and parameter names) of the module it stands in for. On a
CPU tensor outside TRITON_INTERPRET they run the equivalent PyTorch op, so an
accelerated model still works after ``model.cpu()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._config import interpreting
from .attention import attention, default_scale
from .layernorm import layer_norm
from .patch_embed import normalize_uint8, patch_embed, patch_positions


def _on_kernel_device(x: torch.Tensor) -> bool:
    return x.is_cuda or interpreting()


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm on the Triton kernel; ``forward(x, residual)`` also fuses the residual add."""

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm) -> FusedLayerNorm:
        fused = cls(ln.normalized_shape, ln.eps, ln.elementwise_affine, bias=ln.bias is not None, device="meta")
        fused.weight, fused.bias = ln.weight, ln.bias
        fused.train(ln.training)
        return fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """-> LN(x), or (x + residual, LN(x + residual)) when ``residual`` is given."""
        if _on_kernel_device(x):
            return layer_norm(x, self.weight, self.bias, self.eps, residual=residual)
        if residual is None:
            return super().forward(x)
        x = x + residual
        return x, super().forward(x)


class FusedAttention(nn.Module):
    """Self-attention with the fused kernel: qkv projection, attention (+RoPE-2D), output projection.

    Keeps the official attribute names (``qkv``, ``proj``, ``num_heads``, ``rope``,
    ``scale``, ``attn_bias_for_inference_enabled``, ``attn_bias_scale``) and its
    ``forward(x, xpos)`` signature. q, k, v stay strided views of the qkv output.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, rope: nn.Module | None = None,
                 scale: float | None = None, attn_bias_for_inference_enabled: bool = False,
                 attn_bias_scale: float | None = None):
        super().__init__()
        self.qkv, self.proj, self.num_heads, self.rope = qkv, proj, num_heads, rope
        head_dim = qkv.out_features // 3 // num_heads
        self.scale = default_scale(head_dim) if scale is None else scale
        self.attn_bias_for_inference_enabled = attn_bias_for_inference_enabled
        self.attn_bias_scale = self.scale if attn_bias_scale is None else attn_bias_scale

    @classmethod
    def from_module(cls, attn: nn.Module) -> FusedAttention:
        fused = cls(attn.qkv, attn.proj, attn.num_heads, getattr(attn, "rope", None), getattr(attn, "scale", None),
                    getattr(attn, "attn_bias_for_inference_enabled", False), getattr(attn, "attn_bias_scale", None))
        fused.train(attn.training)
        return fused

    def softmax_scale(self) -> float:
        if self.attn_bias_for_inference_enabled and not self.training:
            return self.attn_bias_scale
        return self.scale

    def forward(self, x: torch.Tensor, xpos: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, C); xpos: (B, L, 2) (y, x) positions, used when the module has RoPE."""
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.unbind(2)  # (B, L, H, D) views, token stride 3*C
        rope_pos = xpos if self.rope is not None and xpos is not None else None
        base = float(getattr(self.rope, "base", 100.0))
        if _on_kernel_device(x):
            out = attention(q, k, v, scale=self.softmax_scale(), layout="BLHD", rope_pos=rope_pos, rope_base=base)
        else:
            out = _reference_attention(q, k, v, self.softmax_scale(), self.rope if rope_pos is not None else None, xpos)
        return self.proj(out.reshape(b, n, c))


def _reference_attention(q, k, v, scale, rope, pos):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if rope is not None:
        q, k = rope(q, pos), rope(k, pos)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


class FusedPatchEmbed(nn.Module):
    """Patch embedding on the implicit-im2col kernel; the conv stays as ``proj`` for the state dict.

    ``forward(images, true_shape=None)`` -> (tokens (N, T, D), positions (N, T, 2)).
    With ``true_shape`` (the official ManyAR convention), images whose true shape is
    portrait are stored transposed and are embedded transposed back, as officially.
    """

    def __init__(self, proj: nn.Conv2d):
        super().__init__()
        self.proj = proj
        self.patch_size = proj.kernel_size[0]

    @classmethod
    def from_module(cls, module: nn.Module) -> FusedPatchEmbed:
        fused = cls(module.proj)
        fused.train(module.training)
        return fused

    def forward(self, images: torch.Tensor, true_shape: torch.Tensor | None = None, **_):
        portrait = (true_shape[:, 0] > true_shape[:, 1]).tolist() if true_shape is not None else []
        if any(portrait):
            if not all(portrait):
                return self._mixed(images, torch.tensor(portrait, device=images.device))
            images = images.transpose(-1, -2)
        return self._embed(images)

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = images.shape
        p = self.patch_size
        if _on_kernel_device(images):
            tokens = patch_embed(images, self.proj.weight, self.proj.bias, p)
        else:
            pixels = normalize_uint8(images) if images.dtype == torch.uint8 else images
            tokens = self.proj(pixels.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        return tokens, patch_positions(h // p, w // p, images.device).expand(n, -1, -1)

    def _mixed(self, images: torch.Tensor, portrait: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wide, wide_pos = self._embed(images[~portrait])
        tall, tall_pos = self._embed(images[portrait].transpose(-1, -2))
        tokens = wide.new_empty((images.shape[0], *wide.shape[1:]))
        pos = wide_pos.new_empty((images.shape[0], *wide_pos.shape[1:]))
        tokens[~portrait], tokens[portrait] = wide, tall
        pos[~portrait], pos[portrait] = wide_pos, tall_pos
        return tokens, pos
