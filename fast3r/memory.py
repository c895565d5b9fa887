"""The memory plan of an inference forward: chunk sizes, what each stage holds, and "fast" versus "lean".

Chunks: the encoder and the heads are independent per view, so they run in view chunks whose size
bounds their transient memory (from the free device memory, or explicit chunk sizes passed to
``Fast3R.forward``).

Plans (``Fast3R.forward(memory=...)``), in token buffers T = B x L x D x bytes (L: tokens of all views):

- ``"fast"``: the four hook layers the heads read stay on the GPU, each fusion block computes the whole
  packed qkv; the last fusion layer holds 3 hooks + x, norm1(x), qkv, the attention output and its
  projection = 10 T. Fastest; the only plan a CUDA graph can capture.
- ``"lean"``: the hooks go to pinned host memory as they are produced (``fast3r.offload``) and come back
  one head chunk at a time; each block updates x in place, K and V whole and the queries in chunks
  (``layers.InPlace``): 3 T plus a chunk's transients. Inference in the model's own dtype only.
- ``"auto"`` (the default): "fast" where its peak fits the memory this process may still use, else "lean".

``plan_bytes`` is the arithmetic (benchmarks/memory_plan.py prints it as a table); ``choose`` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import layers
from .config import Fast3RConfig
from .layers import InPlace

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

MEMORY_MODES = ("auto", "fast", "lean")
# Lean plan: queries per attention call and tokens per MLP band. 64k queries keep the attention at full
# speed (16k programs of 64 queries per call); on a GPU the chunk is rounded to a whole number of waves
# (below). The MLP band bounds its 4x-wide hidden activations (2 x 128 MiB in bf16 at width 4096).
LEAN_QUERY_TOKENS = 65536
LEAN_MLP_TOKENS = 16384
# Query rows per attention program (our kernel's 16-bit tiles; cuDNN's 128-row tiles divide the same
# count). A chunk of queries launches heads x chunk / 64 programs; making that a multiple of 4 x the SM
# count fills whole waves at 1, 2 or 4 programs per SM, so chunking adds no partly idle wave per call
# (a partial wave of 64k-query chunks at 1.15M keys idles ~1.5% of the layer).
QUERY_TILE = 64
WAVE_PROGRAMS_PER_SM = 4
# "auto" picks "fast" when its estimated peak is at most this share of the memory left to the process.
AUTO_HEADROOM = 0.9


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
    free = _free_bytes(device)
    budget = min(CHUNK_MEMORY_BUDGET, int(free * CHUNK_MEMORY_FRACTION))
    return max(1, min(maximum, budget // max(bytes_per_view, 1)))


@torch.compiler.assume_constant_result  # torch.compile reads it once, when it traces, instead of per call
def _free_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


# ------------------------------------------------------------------------------------ lean chunks
def lean_chunks(device: torch.device, heads: int) -> InPlace:
    """The lean plan's chunk sizes on ``device``: queries per attention call, tokens per MLP band."""
    queries = LEAN_QUERY_TOKENS
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        unit = WAVE_PROGRAMS_PER_SM * sms * QUERY_TILE // _gcd(heads, WAVE_PROGRAMS_PER_SM * sms * QUERY_TILE)
        unit = _lcm(unit, QUERY_TILE)  # whole query tiles too
        queries = max(1, round(LEAN_QUERY_TOKENS / unit)) * unit
    return InPlace(queries=queries, mlp=LEAN_MLP_TOKENS)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _lcm(a: int, b: int) -> int:
    return a * b // _gcd(a, b)


# -------------------------------------------------------------------------------------- arithmetic
@dataclass(frozen=True)
class Workload:
    """What sets a forward's memory: B scenes of ``views`` views, ``tokens`` tokens in all, the largest view."""

    batch: int
    views: int
    tokens: int
    view_tokens: int  # tokens of the largest view
    view_pixels: int  # pixels of the largest view
    elem_bytes: int  # bytes per activation element (2 for bf16)
    outputs_on_device: bool  # the fp32 pointmaps stay on the model's device (no output_device="cpu")


def plan_bytes(cfg: Fast3RConfig, mode: str, work: Workload, chunks: InPlace | None = None) -> dict[str, int]:
    """Bytes each stage holds at its peak on the model's device, beyond the weights and the input images.

    encoder: the tokens of every view plus one encoder chunk; fusion: the token buffers of the last
    block (fast: 3 hooks + x, norm1(x), qkv, attention output, projection; lean: x, K, V) plus the
    chunk transients (the image-index embedding is freed once added); heads: what stays on the device (fast: 4 hooks) plus one head chunk's working
    memory, its hooks (lean, twice: one chunk in flight) and the outputs kept on the device.
    ``chunks`` (lean): defaults to ``lean_chunks`` on the CPU (64k queries, 16k-token MLP bands).
    """
    if mode not in ("fast", "lean"):
        raise ValueError(f"mode={mode!r}; plan_bytes computes the 'fast' or the 'lean' plan")
    e, d = work.elem_bytes, cfg.fusion_dim
    hidden = int(d * cfg.mlp_ratio)
    token_buffer = work.batch * work.tokens * d * e
    per_view_enc = encoder_bytes_per_view(cfg, work.view_tokens, e) * work.batch
    enc_chunk = min(MAX_ENCODER_CHUNK, work.views, max(1, CHUNK_MEMORY_BUDGET // per_view_enc))
    encoder = work.batch * work.tokens * cfg.enc_dim * e + enc_chunk * per_view_enc
    per_view_head = head_bytes_per_view(cfg, work.view_pixels, e) * work.batch
    head_chunk = min(MAX_HEAD_CHUNK, work.views, max(1, CHUNK_MEMORY_BUDGET // per_view_head))
    outputs = work.batch * work.views * work.view_pixels * 32 if work.outputs_on_device else 0  # 2 heads x 4 fp32
    head_tokens = head_chunk * work.view_tokens * work.batch * (cfg.enc_dim + 3 * d) * e
    if mode == "fast":
        band = min(work.tokens * work.batch, layers.MLP_TOKEN_CHUNK)
        mlp = 5 * token_buffer + band * (d + 2 * hidden) * e  # norm2 out, fc1 out, GELU out
        fusion = max(10 * token_buffer, mlp)
        heads = 3 * token_buffer + work.batch * work.tokens * cfg.enc_dim * e + head_chunk * per_view_head
        return {"encoder": encoder, "fusion": fusion, "heads": heads + outputs}
    chunks = chunks or InPlace(queries=LEAN_QUERY_TOKENS, mlp=LEAN_MLP_TOKENS)
    queries, band = min(chunks.queries, work.tokens), min(chunks.mlp, chunks.queries, work.tokens)
    # norm1 rows, then queries and attention output; then the projection plus one MLP band (norm2, fc1, GELU).
    transient = max(2 * queries * d * e, queries * d * e + band * (d + 2 * hidden) * e)
    fusion = 3 * token_buffer + transient
    heads = head_chunk * per_view_head + 2 * head_tokens + outputs
    return {"encoder": encoder, "fusion": fusion, "heads": heads}


def plan_peak(cfg: Fast3RConfig, mode: str, work: Workload, chunks: InPlace | None = None) -> int:
    return max(plan_bytes(cfg, mode, work, chunks).values())


# ---------------------------------------------------------------------------------------- choosing
def available_bytes(device: torch.device) -> int:
    """Bytes this process may still allocate on a CUDA device: free memory and the allocator's cache,
    within ``torch.cuda.set_per_process_memory_fraction`` (the cap ``mem_get_info`` does not show)."""
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    cap = int(torch.cuda.get_per_process_memory_fraction(device) * total)
    return min(free + reserved - allocated, cap - allocated)


def choose(cfg: Fast3RConfig, mode: str, device: torch.device, work: Workload) -> str:
    """Resolve ``memory=`` to "fast" or "lean".

    "auto" is "fast" off CUDA, while a CUDA graph is being captured or torch.compile traces (no device
    queries or side streams there), and where the fast plan's peak fits ``AUTO_HEADROOM`` of
    ``available_bytes``; else "lean".
    """
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory={mode!r}; choose one of {MEMORY_MODES}")
    if mode == "lean" and torch.compiler.is_compiling():
        raise ValueError("memory='lean' runs eagerly (host copies on a side stream); compile with "
                         "Fast3R.compile(), which leaves the forward eager, or pass memory='fast'")
    if mode != "auto":
        return mode
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return "fast"
    fits = plan_peak(cfg, "fast", work) <= AUTO_HEADROOM * available_bytes(device)
    return "fast" if fits else "lean"
