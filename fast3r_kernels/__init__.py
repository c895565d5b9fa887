"""Triton kernels for Fast3R: fused attention (+RoPE-2D), LayerNorm (+residual), patch embedding, bilinear
upsampling; each a PyTorch custom op (torch.library), so torch.compile and torch.export see them."""

from . import versions as versions  # first: warns about an untested Triton before the kernels import it
from .accelerate import accelerate
from .attention import attention
from .layernorm import layer_norm
from .modules import FusedAttention, FusedLayerNorm, FusedPatchEmbed
from .patch_embed import patch_embed
from .upsample import upsample_bilinear

__all__ = [
    "FusedAttention",
    "FusedLayerNorm",
    "FusedPatchEmbed",
    "accelerate",
    "attention",
    "layer_norm",
    "patch_embed",
    "upsample_bilinear",
]
