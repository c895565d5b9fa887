"""Swap a model's attention, LayerNorm and patch-embedding modules for the fused ones, in place.

Recognized by structure, not by class, so it works on Fast3R's own modules and on any
tree shaped like the official code:
- attention: a module with ``qkv`` and ``proj`` (nn.Linear) and an int ``num_heads``
  (optional ``rope`` with a ``base``; the fusion temperature attributes are honoured);
- nn.LayerNorm over the last dimension;
- patch embedding: a module whose ``proj`` is an nn.Conv2d with kernel == stride.
Parameters are shared, not copied, so state-dict keys and values are unchanged.
"""

from __future__ import annotations

from torch import nn

from .modules import FusedAttention, FusedLayerNorm, FusedPatchEmbed


def accelerate(model: nn.Module) -> nn.Module:
    """Replace supported submodules of ``model`` in place and return it."""
    replacements: dict[int, nn.Module] = {}

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in replacements:  # a module shared under two names is swapped once
                replacements[id(child)] = _fused_version(child)
                if replacements[id(child)] is child:
                    visit(child)
            parent._modules[name] = replacements[id(child)]

    root = _fused_version(model)
    if root is not model:
        return root
    visit(model)
    return model


def _fused_version(module: nn.Module) -> nn.Module:
    if isinstance(module, (FusedAttention, FusedLayerNorm, FusedPatchEmbed)):
        return module
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return FusedLayerNorm.from_layer_norm(module)
    if _is_patch_embed(module):
        return FusedPatchEmbed.from_module(module)
    if _is_attention(module):
        return FusedAttention.from_module(module)
    return module


def _is_patch_embed(module: nn.Module) -> bool:
    proj = getattr(module, "proj", None)
    return (isinstance(proj, nn.Conv2d) and proj.kernel_size == proj.stride and proj.padding == (0, 0)
            and proj.dilation == (1, 1) and proj.groups == 1 and proj.bias is not None
            and proj.kernel_size[0] == proj.kernel_size[1])


def _is_attention(module: nn.Module) -> bool:
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(getattr(module, "num_heads", None), int)):
        return False
    dropout = getattr(module, "dropout_p", 0.0) or getattr(getattr(module, "attn_drop", None), "p", 0.0)
    masked = getattr(module, "attn_mask", None) is not None or getattr(module, "is_causal", False)
    head_dim = qkv.out_features // 3 // module.num_heads
    return not dropout and not masked and qkv.out_features == 3 * proj.in_features and head_dim in (32, 64, 128)
