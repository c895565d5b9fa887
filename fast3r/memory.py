"""How many views to push through the encoder and the heads at once.

Both stages are independent per view, so they run in chunks whose size bounds their
transient memory. The defaults come from the free device memory; pass explicit chunk
sizes to ``Fast3R.forward`` to override them.
"""

from __future__ import annotations

import torch

from .config import Fast3RConfig

# A chunk's transient activations may use this much, or a quarter of the free device memory if less.
# Larger chunks add little speed (256 views of encoder tokens already make 50k-row GEMMs) and the head
# chunk sits on top of the fusion layers and the outputs, which set the peak: 1 GiB keeps 1500 views
# at 224 px under 8 GiB.
CHUNK_MEMORY_BUDGET = 2**30
CHUNK_MEMORY_FRACTION = 0.25
MAX_ENCODER_CHUNK = 256
MAX_HEAD_CHUNK = 64
CPU_ENCODER_CHUNK = 64
CPU_HEAD_CHUNK = 16


def encoder_bytes_per_view(cfg: Fast3RConfig, tokens: int, elem_bytes: int) -> int:
    """Peak transient bytes of one view in an encoder block: qkv, MLP hidden, residuals, scores."""
    hidden = int(cfg.enc_dim * cfg.mlp_ratio)
    activations = tokens * (3 * cfg.enc_dim + 2 * hidden + 4 * cfg.enc_dim) * elem_bytes
    scores = cfg.enc_heads * tokens * tokens * 4  # only the math SDPA fallback materializes these
    return activations + scores


def head_bytes_per_view(cfg: Fast3RConfig, pixels: int, elem_bytes: int) -> int:
    """Peak transient bytes of one view in a DPT head: full-resolution features plus fp32 outputs."""
    return pixels * (3 * (cfg.head_feature_dim // 2) * elem_bytes + 64)


def chunk_size(device: torch.device, bytes_per_view: int, maximum: int, cpu_default: int) -> int:
    if device.type != "cuda":
        return cpu_default
    free, _ = torch.cuda.mem_get_info(device)
    budget = min(CHUNK_MEMORY_BUDGET, int(free * CHUNK_MEMORY_FRACTION))
    return max(1, min(maximum, budget // max(bytes_per_view, 1)))
