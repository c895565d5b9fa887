"""Block-size tables per kernel, regime and dtype, with where each entry was measured.

The 16-bit entries are the H100 sweeps in benchmarks/NOTES.md (bf16; fp16 tiles have the
same size). fp32 tiles take twice the shared memory, so fp32 gets smaller tiles or fewer
pipeline stages, chosen to fit the 227 KiB a block may use on Hopper (checked on every CI
run by tests/test_tuning.py, which compiles each launch for sm_90). fp32 is the exactness
path (true fp32 products), not the fast one, so its entries favour fitting over speed.
"""

from __future__ import annotations

import torch

# Attention forward: 4-warp CTAs on 64-row tiles, several per SM (64-key tiles; 128 from 32k keys on).
# With RoPE one 256-row tile per head so K is rotated once per 256 queries.
ATTENTION_FWD = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
ATTENTION_FWD_LONG = {**ATTENTION_FWD, "BLOCK_N": 128}
ATTENTION_FWD_ROPE = {"BLOCK_M": 256, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
ATTENTION_BWD = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
LONG_SEQUENCE = 32768  # keys from which the 128-key tiles win (H100, 32k-294k keys)
# Below this many keys, without RoPE, stock cuDNN attention is as fast or faster than ours (H100, bf16, same
# run, results/kernels_h100.json: 16k keys 0.96x, 64k 0.99x, 294k 1.07x of cuDNN) and launches with less
# host time, which dominates at 1-32 views; Fast3R's triton backend hands those calls to SDPA.
FUSED_ATTENTION_MIN_KEYS = 65536

# fp32: 64x64 tiles with two stages fit at D=128 (K and V tiles of 32 KiB each per stage).
ATTENTION_FP32 = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
ATTENTION_FP32_ROPE = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
ATTENTION_FP32_BWD = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}

# Patch embedding, H100 1500 x 224^2: 128 tokens x 256 channels per program, 8 warps, 4 stages.
PATCH_EMBED_FWD = {"BLOCK_M": 128, "BLOCK_D": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}
PATCH_EMBED_FWD_FP32 = {"BLOCK_M": 128, "BLOCK_D": 256, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
PATCH_EMBED_BWD = {"BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}


def attention_forward_blocks(keys: int, rope: bool, dtype: torch.dtype) -> dict:
    """The default forward tiling for ``keys`` keys, with or without RoPE, in ``dtype``."""
    if dtype == torch.float32:
        return ATTENTION_FP32_ROPE if rope else ATTENTION_FP32
    if rope:
        return ATTENTION_FWD_ROPE
    return ATTENTION_FWD_LONG if keys >= LONG_SEQUENCE else ATTENTION_FWD


def attention_backward_blocks(dtype: torch.dtype) -> dict:
    return ATTENTION_FP32_BWD if dtype == torch.float32 else ATTENTION_BWD


def patch_embed_forward_blocks(dtype: torch.dtype) -> dict:
    return PATCH_EMBED_FWD_FP32 if dtype == torch.float32 else PATCH_EMBED_FWD


def patch_embed_backward_blocks(dtype: torch.dtype) -> dict:
    return PATCH_EMBED_BWD
