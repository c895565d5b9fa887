"""How much memory a training step needs, and what to change when it does not fit.

An estimate, from bytes per token and per pixel that autograd keeps for backward, as measured by
counting the tensors it saves (``torch.autograd.graph.saved_tensors_hooks``) in our layers:

| per token per block (mlp ratio 4)  | bf16-mixed | fp32 / official |
|------------------------------------|------------|-----------------|
| encoder block (with RoPE)          | 38 x dim   | 77 x dim        |
| fusion block                       | 32 x dim   | 64 x dim        |

A DPT head keeps 4 x feature_dim + 57 bytes per pixel in bf16-mixed (8 x feature_dim + 68 in
fp32); the outputs and the loss 232 bytes per pixel. For the large model at 512x384 this is
1.65 GiB per view, against 1.70 GiB per view measured on the H200 (TRAINING.md: 22 GiB at 8
views, 117 GiB at 64), whose 8.4 GiB intercept is the fp32 weights, AdamW's two moments and
autocast's bf16 weight copies. The estimate adds the fp32 gradients on top (conservative).
With checkpointing, a checkpointed unit keeps its input instead (2 or 4 bytes x dim per token),
and the backward needs the largest recomputed unit at once (fast3r.train.activation_checkpointing
says which units each mode checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .. import memory as inference_memory
from ..config import Fast3RConfig

ENCODER_BLOCK = {"bf16": (14, 6), "fp32": (29, 12)}  # (a, b): a x dim + b x mlp hidden bytes per token
FUSION_BLOCK = {"bf16": (8, 6), "fp32": (16, 12)}
HEAD_PER_FEATURE = {"bf16": (4, 57), "fp32": (8, 68)}  # (a, b): a x head_feature_dim + b bytes per pixel
OUTPUT_AND_LOSS_PER_PIXEL = 232
AUTOCAST_WEIGHT_COPY = 2  # bytes per parameter: bf16 copies of the weights that autocast caches
GPU_DEFAULT_HEAD_CHUNK = 64
GPU_DEFAULT_ENCODER_CHUNK = 256


class TrainingOutOfMemoryError(RuntimeError):
    """The step ran out of GPU memory; the message names the setting that would fit."""


@dataclass(frozen=True)
class StepShape:
    """What sets a step's memory: the sample, the memory settings and the parameters."""

    views: int
    height: int
    width: int
    batch: int
    checkpointing: str
    precision: str
    params: int
    trainable: int
    encoder_chunk: int | None = None
    head_chunk: int | None = None


def step_bytes(cfg: Fast3RConfig, shape: StepShape) -> int:
    """Estimated peak bytes of one training step (forward + backward + AdamW) on one GPU."""
    kind = "bf16" if shape.precision == "bf16-mixed" else "fp32"
    stream = 2 if kind == "bf16" else 4  # bytes per element of the residual stream between blocks
    tokens = (shape.height // cfg.patch_size) * (shape.width // cfg.patch_size)
    pixels = shape.height * shape.width
    samples = shape.batch * shape.views
    enc_block = _per_token(ENCODER_BLOCK[kind], cfg.enc_dim, cfg.mlp_ratio)
    fus_block = _per_token(FUSION_BLOCK[kind], cfg.fusion_dim, cfg.mlp_ratio)
    a, b = HEAD_PER_FEATURE[kind]
    heads = 2 if cfg.with_local_head else 1
    head_pixel = heads * (a * cfg.head_feature_dim + b)
    encoder_chunk = min(shape.encoder_chunk or _encoder_chunk(cfg, tokens, stream), shape.views) * shape.batch
    head_chunk = min(shape.head_chunk or _head_chunk(cfg, pixels, stream), shape.views) * shape.batch

    static = shape.params * 4 + shape.trainable * (8 + 4)  # weights, AdamW moments, gradients
    if kind == "bf16":
        static += shape.params * AUTOCAST_WEIGHT_COPY
    outputs = samples * pixels * OUTPUT_AND_LOSS_PER_PIXEL
    if shape.checkpointing == "none":
        kept = samples * (tokens * (cfg.enc_depth * enc_block + cfg.fusion_depth * fus_block) + pixels * head_pixel)
        return static + kept + outputs
    # The layers the heads read stay alive: encoder tokens (fp32) and three fusion layers.
    hooks = samples * tokens * (cfg.enc_dim * 4 + 3 * cfg.fusion_dim * stream)
    fusion_inputs = samples * tokens * cfg.fusion_depth * cfg.fusion_dim * stream
    recompute = max(samples * tokens * fus_block,  # one fusion block over every token of the sample
                    head_chunk * pixels * head_pixel / heads)  # one head over one chunk of views
    if shape.checkpointing == "blocks":  # the fusion attention's output and log-sum-exp are kept too
        fusion_inputs += samples * tokens * cfg.fusion_depth * (cfg.fusion_dim * stream + cfg.fusion_heads * 4)
        encoder_inputs = samples * tokens * cfg.enc_depth * cfg.enc_dim * stream
        recompute = max(recompute, encoder_chunk * tokens * enc_block)
    else:  # full: the encoder keeps only its uint8 images; one chunk is re-run at a time
        encoder_inputs = samples * pixels * 3
        recompute = max(recompute, encoder_chunk * tokens * (cfg.enc_depth * cfg.enc_dim * stream + enc_block))
    return int(static + hooks + fusion_inputs + encoder_inputs + recompute + outputs)


def most_views(cfg: Fast3RConfig, shape: StepShape, limit_bytes: float) -> int:
    """The most views per sample whose estimate stays under ``limit_bytes`` (0 if not even one)."""
    low, high = 0, 1
    while step_bytes(cfg, _with_views(shape, high)) <= limit_bytes and high < 2**20:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if step_bytes(cfg, _with_views(shape, middle)) <= limit_bytes else (low, middle)
    return low


def out_of_memory_message(cfg: Fast3RConfig, shape: StepShape, device_bytes: int, size: int) -> str:
    """One message: what ran out, what each checkpointing setting is estimated to need, what would fit."""
    gib = 2**30
    usable = device_bytes * 0.9  # the allocator's fragmentation and the CUDA context take the rest
    needs = {mode: step_bytes(cfg, replace(shape, checkpointing=mode)) for mode in ("none", "blocks", "full")}
    lines = [(f"out of GPU memory in a training step: views={shape.views} at size={size} "
              f"({shape.height}x{shape.width}), batch_size={shape.batch}, checkpointing={shape.checkpointing}, "
              f"precision={shape.precision}, on a {device_bytes / gib:.1f} GiB GPU."),
             "Estimated peak per setting: " + ", ".join(f"checkpointing={m}: {b / gib:.0f} GiB"
                                                         for m, b in needs.items()) + "."]
    fitting = [m for m in ("none", "blocks", "full") if needs[m] <= usable]
    if fitting and fitting[0] != shape.checkpointing:
        lines.append(f"Set checkpointing: {fitting[0]} (estimated {needs[fitting[0]] / gib:.0f} GiB), or fewer views:")
    else:
        lines.append("Fewer views would fit:")
    lines.append(", ".join(f"views <= {most_views(cfg, replace(shape, checkpointing=m), usable)} with "
                           f"checkpointing: {m}" for m in ("none", "blocks", "full"))
                 + (f" (at batch_size={shape.batch}; batch_size: 1 fits more)" if shape.batch > 1 else "") + ".")
    return "\n".join(lines)


def _per_token(coefficients: tuple[int, int], dim: int, mlp_ratio: float) -> float:
    a, b = coefficients
    return a * dim + b * dim * mlp_ratio


def _encoder_chunk(cfg: Fast3RConfig, tokens: int, stream: int) -> int:
    """The chunk the model picks on a GPU with plenty of free memory (fast3r.memory's budget)."""
    per_view = inference_memory.encoder_bytes_per_view(cfg, tokens, stream)
    return max(1, min(GPU_DEFAULT_ENCODER_CHUNK, inference_memory.CHUNK_MEMORY_BUDGET // per_view))


def _head_chunk(cfg: Fast3RConfig, pixels: int, stream: int) -> int:
    per_view = inference_memory.head_bytes_per_view(cfg, pixels, stream)
    return max(1, min(GPU_DEFAULT_HEAD_CHUNK, inference_memory.CHUNK_MEMORY_BUDGET // per_view))


def _with_views(shape: StepShape, views: int) -> StepShape:
    return replace(shape, views=views)
