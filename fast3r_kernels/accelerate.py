"""Swap a foreign model's attention, LayerNorm and patch-embedding modules for the fused ones, in place.

For trees we did not build (the official Fast3R code, CroCo/DUSt3R-style ViTs); Fast3R's
own model picks its backend when it is built (``Fast3R(cfg, backend="triton")``).
Modules are recognized by structure, not by class:
- attention: ``qkv`` and ``proj`` (nn.Linear), an int ``num_heads``, optional ``rope`` with a
  ``base``, optional ``attn_drop`` / ``proj_drop`` dropouts; the fusion temperature
  attributes (``attn_bias_for_inference_enabled``, ``attn_bias_scale``) are honoured;
- nn.LayerNorm over the last dimension;
- patch embedding: a module whose ``proj`` is an nn.Conv2d with kernel == stride and whose
  forward returns (tokens, positions), as the official PatchEmbed does.
A module that matches but that the fused version would not reproduce exactly (active
dropout, masks, q/k norms or other unknown children, an unsupported head dim, a patch
embedding that returns something else) is left alone, and the report says why.
Parameters are shared, not copied, so state-dict keys and values are unchanged.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import HEAD_DIMS, ROPE_HEAD_DIMS
from .modules import FusedAttention, FusedLayerNorm, FusedPatchEmbed

ATTENTION_CHILDREN = {"qkv", "proj", "rope", "attn_drop", "proj_drop"}
PATCH_EMBED_CHILDREN = {"proj", "norm"}


@dataclass
class AccelerationReport:
    """What ``accelerate`` swapped and skipped: module names (dotted paths) per kind, and why."""

    swapped: dict[str, list[str]] = field(default_factory=lambda: {"attention": [], "layer_norm": [],
                                                                    "patch_embed": []})
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{kind}: {len(names)} swapped" for kind, names in self.swapped.items()]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


class Refused(Exception):
    """A module looks like a target but the fused version would not compute the same thing."""


def accelerate(model: nn.Module, *, attention: bool = True, layer_norm: bool = True,
               patch_embed: bool = True) -> nn.Module:
    """Replace the enabled kinds of submodules of ``model`` in place and return it.

    The report of what was swapped and skipped (with the reason) is attached as
    ``model.acceleration_report`` (``str()`` of it reads well); skips are also warned about.
    """
    kinds = {"attention": attention, "layer_norm": layer_norm, "patch_embed": patch_embed}
    report = AccelerationReport()
    done: dict[int, nn.Module] = {}

    def replace(module: nn.Module, name: str) -> nn.Module:
        if id(module) in done:  # a module shared under two names is swapped once
            return done[id(module)]
        kind = _kind(module)
        fused = module
        if kind is not None and kinds[kind]:
            try:
                fused = _FUSERS[kind](module)
                report.swapped[kind].append(name or "(root)")
            except Refused as why:
                report.skipped[name or "(root)"] = f"{kind}: {why}"
        if fused is module:
            for child_name, child in list(module._modules.items()):
                if child is not None:
                    module._modules[child_name] = replace(child, f"{name}.{child_name}" if name else child_name)
        done[id(module)] = fused
        return fused

    root = replace(model, "")
    root.acceleration_report = report
    if report.skipped:
        warnings.warn(f"accelerate() left {len(report.skipped)} module(s) unchanged; see .acceleration_report:\n"
                      + "\n".join(f"  {n}: {w}" for n, w in list(report.skipped.items())[:5]), stacklevel=2)
    return root


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, (FusedAttention, FusedLayerNorm, FusedPatchEmbed)):
        return None
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    proj = getattr(module, "proj", None)
    if isinstance(proj, nn.Conv2d):
        return "patch_embed"
    if isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(proj, nn.Linear) \
            and isinstance(getattr(module, "num_heads", None), int):
        return "attention"
    return None


def _fuse_layer_norm(ln: nn.LayerNorm) -> nn.Module:
    if type(ln).forward is not nn.LayerNorm.forward:
        raise Refused(f"{type(ln).__name__} overrides nn.LayerNorm.forward; its callers may pass what the fused "
                      "module does not take")
    if len(ln.normalized_shape) != 1:
        raise Refused(f"normalizes over {tuple(ln.normalized_shape)}; the kernel normalizes the last dimension only")
    return FusedLayerNorm.from_layer_norm(ln)


def _fuse_attention(attn: nn.Module) -> nn.Module:
    params = list(inspect.signature(attn.forward).parameters)
    if len(params) != 2:
        raise Refused(f"its forward takes {tuple(params)}; the fused attention replaces forward(x, xpos)")
    unknown = sorted(set(attn._modules) - ATTENTION_CHILDREN - {n for n, m in attn._modules.items()
                                                                  if isinstance(m, nn.Identity)})
    if unknown:
        raise Refused(f"has children {unknown} (e.g. q/k norms) that the fused attention does not apply")
    for name in ("attn_drop", "proj_drop"):
        p = getattr(getattr(attn, name, None), "p", 0.0)
        if p:
            raise Refused(f"{name} has p={p}; the fused attention has no dropout")
    if getattr(attn, "dropout_p", 0.0):
        raise Refused(f"dropout_p={attn.dropout_p}; the fused attention has no dropout")
    if getattr(attn, "attn_mask", None) is not None or getattr(attn, "is_causal", False):
        raise Refused("uses an attention mask or causal attention; the fused attention attends to every token")
    if attn.qkv.out_features != 3 * attn.proj.in_features:
        raise Refused(f"qkv has {attn.qkv.out_features} outputs, not 3 x {attn.proj.in_features}")
    head_dim = attn.qkv.out_features // 3 // attn.num_heads
    rope = getattr(attn, "rope", None) is not None
    supported = ROPE_HEAD_DIMS if rope else HEAD_DIMS
    if head_dim not in supported:
        raise Refused(f"head dim {head_dim} with{'' if rope else 'out'} RoPE; supported: {supported}")
    if rope and not isinstance(getattr(attn.rope, "base", None), (int, float)):
        raise Refused("its rope has no numeric `base`; only RoPE-2D (base, rotate-half per axis) is fused")
    return FusedAttention.from_module(attn)


def _fuse_patch_embed(module: nn.Module) -> nn.Module:
    proj = module.proj
    if not (proj.kernel_size == proj.stride and proj.kernel_size[0] == proj.kernel_size[1]
            and proj.padding == (0, 0) and proj.dilation == (1, 1) and proj.groups == 1 and proj.bias is not None):
        raise Refused("its conv is not a biased, square, kernel == stride patch projection")
    unknown = sorted(n for n, m in module._modules.items() if n not in PATCH_EMBED_CHILDREN
                     or (n == "norm" and not isinstance(m, nn.Identity)))
    if unknown:
        raise Refused(f"has children {unknown} (e.g. a norm) that the fused patch embedding does not apply")
    if getattr(module, "flatten", True) is not True:
        raise Refused("flatten=False: it returns feature maps, the fused version returns tokens")
    _probe_patch_embed(module)
    return FusedPatchEmbed.from_module(module)


def _probe_patch_embed(module: nn.Module) -> None:
    """Run the original on one small image: it must return (tokens (1, T, D), positions (1, T, 2))."""
    weight = module.proj.weight
    if weight.is_meta:
        return
    p = module.proj.kernel_size[0]
    size = getattr(module, "img_size", None)
    size = (size, size) if isinstance(size, int) else tuple(size) if size is not None else (2 * p, 2 * p)
    probe = torch.zeros(1, module.proj.in_channels, *size, dtype=weight.dtype, device=weight.device)
    kwargs = {"true_shape": torch.tensor([size], device=weight.device)} \
        if "true_shape" in inspect.signature(module.forward).parameters else {}
    try:
        with torch.no_grad():
            out = module(probe, **kwargs)
    except Exception as err:
        raise Refused(f"its forward failed on a probe image ({err.__class__.__name__}: {err})") from err
    tokens = (size[0] // p) * (size[1] // p)
    ok = (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)
          and out[0].shape == (1, tokens, module.proj.out_channels) and out[1].shape == (1, tokens, 2))
    if not ok:
        raise Refused("its forward does not return (tokens (N, T, D), positions (N, T, 2))")


_FUSERS = {"attention": _fuse_attention, "layer_norm": _fuse_layer_norm, "patch_embed": _fuse_patch_embed}
