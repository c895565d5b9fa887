"""Activation checkpointing for training: keep a unit's input, recompute its inside in the backward.

One function, ``apply_activation_checkpointing(model, mode)``, applied from outside the model
(as torchtitan's ``apply_ac`` wraps its blocks), makes each unit's ``forward`` run under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``. The module tree, parameter names
and state dict do not change, so optimizer state, checkpoints and ``save_pretrained`` are the same
with or without it. Without autograd (validation) a unit runs as before.

Modes (what stays alive between forward and backward):

- ``none``: every activation of every layer (fastest; 1.7 GiB per 512x384 view for the large model).
- ``blocks``: the units the issue names: each encoder block keeps only its input (one token buffer);
  each fusion block keeps its input and its attention's output and log-sum-exp (selective
  checkpointing, as torchtitan's "op" policy: the fusion attention is quadratic in the tokens, so it
  is the one op whose recomputation would cost more than the rest of the block; one more token
  buffer per fusion block buys it back); each DPT head keeps only its inputs per call, and the
  model calls each head once per head chunk of views, so a head chunk is recomputed at a time.
  Costs about one more forward of the transformer blocks except the fusion attention, and of the heads.
- ``full``: ``blocks`` without keeping the fusion attention's output (it is recomputed too), plus the
  encoder as a whole per encoder chunk of views: the encoder keeps
  nothing but the images it was given (uint8), instead of the inputs of its 24 blocks for every view.
  In the backward a chunk's encoder is re-run (its blocks still checkpointed inside, so the transient
  is one chunk's block inputs plus one block), then its blocks are recomputed as in ``blocks``: the
  encoder's forward runs three times in all. What remains per view is the fusion blocks' inputs, the
  layers the heads read and the outputs: the mode for the most views per sample.

The recomputation does not replay random state (``preserve_rng_state=False``): Fast3R's forward
draws no random numbers (no dropout, no drop path), and the RNG bookkeeping per block would be waste.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..model import Fast3R

MODES = ("none", "blocks", "full")
_MARK = "_fast3r_activation_checkpointing"


def apply_activation_checkpointing(model: Fast3R, mode: str) -> dict[str, int]:
    """Checkpoint the units of ``mode`` in place; -> how many modules of each kind were wrapped.

    Applying twice is refused (a unit would be checkpointed inside itself for nothing).
    """
    if mode not in MODES:
        raise ValueError(f"checkpointing={mode!r}; choose one of {', '.join(MODES)}")
    report = {"encoder_blocks": 0, "fusion_blocks": 0, "heads": 0, "encoder": 0}
    if mode == "none":
        return report
    if getattr(model, _MARK, None) is not None:
        raise ValueError(f"activation checkpointing is already applied to this model ({getattr(model, _MARK)!r})")
    setattr(model, _MARK, mode)
    for block in model.encoder.enc_blocks:
        _checkpoint_forward(block)
        report["encoder_blocks"] += 1
    for block in model.decoder.dec_blocks:
        _checkpoint_forward(block, keep_attention=mode == "blocks")
        report["fusion_blocks"] += 1
    for head in (model.downstream_head, model.downstream_head_local):
        if head is not None:
            _checkpoint_forward(head)
            report["heads"] += 1
    if mode == "full":
        _checkpoint_forward(model.encoder)
        report["encoder"] = 1
    return report


def _checkpoint_forward(module: nn.Module, keep_attention: bool = False) -> None:
    module.forward = functools.partial(_checkpointed, module.forward, keep_attention)


def _checkpointed(forward, keep_attention: bool, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    context = {"context_fn": _keep_attention_outputs} if keep_attention else {}
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **context, **kwargs)


def _keep_attention_outputs():
    return create_selective_checkpoint_contexts(_attention_policy)


def _attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save what the attention ops return (output and log-sum-exp); recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in attention_ops() else CheckpointPolicy.PREFER_RECOMPUTE


@functools.cache
def attention_ops() -> frozenset:
    """The forward attention ops either backend dispatches to: ours, and each of PyTorch's SDPA kernels."""
    import fast3r_kernels.attention  # noqa: F401 - registers torch.ops.fast3r.attention

    names = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_fused_attention_overrideable")
    sdpa = [getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name)]
    return frozenset([torch.ops.fast3r.attention.default, *sdpa])
