"""One scene across GPUs: the fusion attention sharded by tokens (context parallelism).

Each rank holds a contiguous shard of the scene's views (rank order is view order), so it
holds the query, key and value tokens of those views, (B, L_rank, H, D). Two ways to let
every query see every key, both on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs):

- ``ring_attention``: the packed K+V block of each rank travels around the ring with
  point-to-point sends; while block i+1 is in flight, the local kernel attends to block i.
  Fast3R's fusion attention has no mask, so every step is the same work and the partial
  results merge exactly by their log-sum-exp (``merge_partials``). Per layer each rank
  sends (P-1) K+V shards and keeps two K+V buffers; the transfer hides behind compute
  while one step's attention takes longer than moving one shard.
- ``ulysses_attention``: two all-to-alls over heads; each rank then holds every token of
  H/P heads and runs one ordinary attention. Needs H % P == 0, moves q, k, v and the
  output once per layer, and cannot overlap its transfers with compute.

Both take the local kernel as ``local_attention(q, k, v, scale) -> (out, lse)`` (BLHD
tensors, lse (B, H, L) fp32 natural-log), e.g. ``torch_attention_with_lse`` or
``triton_attention_with_lse``, and both are for inference only (no autograd across ranks).

Per forward, outside the layers: ``split_views`` / ``shard_for_rank`` cut a scene into the
ranks' shards, balanced by token count, and ``gather_layout`` exchanges each rank's view
and token counts once (checking that every rank runs the same model in the same dtype),
giving the ``shard_lengths`` the attention functions take, so a layer needs no extra
communication or host synchronization.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .backends import TORCH, TRITON

LocalAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
PREPROCESS_SIZES = (224, 512)  # fast3r.images.load_images sizes


class ShardingError(ValueError):
    """A scene or a tensor cannot be split over the ranks as asked."""


class RankMismatchError(RuntimeError):
    """Ranks disagree on something every rank must share (model config, dtype); raised on every rank."""


class InferenceOnlyError(RuntimeError):
    """Autograd through the cross-rank attention was asked for; context parallelism is for inference."""


# ------------------------------------------------------------------ partial attentions
def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attentions of the same queries over disjoint key sets, in fp32.

    out_*: (B, L, H, D) softmax-normalized outputs; lse_*: (B, H, L) natural-log sum-exp of
    each row's scaled scores. Returns (out fp32 (B, L, H, D), lse fp32 (B, H, L)) of the
    attention over the union of the keys: lse = logaddexp(lse_a, lse_b),
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b. Inputs are left untouched.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(f"partials do not match: out {tuple(out_a.shape)} vs {tuple(out_b.shape)}, "
                         f"lse {tuple(lse_a.shape)} vs {tuple(lse_b.shape)}")
    b, length, h, _ = out_a.shape
    if lse_a.shape != (b, h, length):
        raise ValueError(f"lse has shape {tuple(lse_a.shape)}; expected (B, H, L) = ({b}, {h}, {length}) for out "
                         f"{tuple(out_a.shape)} in (B, L, H, D)")
    out = out_a.to(torch.float32, copy=True)
    lse = lse_a.to(torch.float32, copy=True)
    _merge_into(out, lse, out_b, lse_b)
    return out, lse


def _merge_into(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """merge_partials in place on fp32 accumulators ``out`` (B, L, H, D) and ``lse`` (B, H, L).

    The two weights exp(lse_a - lse) and exp(lse_b - lse) sum to one, so the weighted sum is
    a lerp towards out_b: one pass over the output and no temporary beyond out_b in fp32.
    """
    merged = torch.logaddexp(lse, lse_b.to(torch.float32))
    weight_b = torch.exp(lse_b - merged)
    out.lerp_(out_b.to(torch.float32), weight_b.transpose(1, 2).unsqueeze(-1))
    lse.copy_(merged)


# ---------------------------------------------------------------- local kernels
# The backends' attention with its log-sum-exp (fast3r.backends owns them), under the names the ring and
# Ulysses take as ``local_attention``.
torch_attention_with_lse = TORCH.attention_with_lse
triton_attention_with_lse = TRITON.attention_with_lse


# ------------------------------------------------------------ sharded attention
def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    group: dist.ProcessGroup | None,
    local_attention: LocalAttention,
    shard_lengths: Sequence[int],
) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys, K/V blocks passed around a ring.

    q, k, v: this rank's (B, L_rank, H, D) tokens (any strides, e.g. views of a packed qkv);
    shard_lengths: L of every rank in rank order (``SceneLayout.shard_lengths``), the same
    list on every rank, so receive buffers are sized without asking. Step i attends to the
    block of rank (rank - i) mod P while the next block arrives from rank - 1 (one send of
    K and V packed together); partials merge by log-sum-exp in fp32.
    Returns (B, L_rank, H, D) in q's dtype.
    """
    _check_inference(q, k, v)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _check_shards(shard_lengths, world, rank, q, k, v)
    b, _, h, d = k.shape
    # Two packed (2, B, L, H, D) K+V buffers of the largest shard: the block being attended
    # to (and sent on), and the one arriving.
    numel = [2 * b * n * h * d for n in shard_lengths]
    buffers = [torch.empty(max(numel), dtype=k.dtype, device=k.device) for _ in range(min(world, 2))]
    current = buffers[0][: numel[rank]].view(2, b, shard_lengths[rank], h, d)
    current[0].copy_(k)
    current[1].copy_(v)
    send_to, recv_from = _global_rank(group, (rank + 1) % world), _global_rank(group, (rank - 1) % world)
    out = lse = None
    for step in range(world):
        pending = []
        if step < world - 1:
            source = (rank - step - 1) % world
            incoming = buffers[(step + 1) % 2][: numel[source]].view(2, b, shard_lengths[source], h, d)
            pending = dist.batch_isend_irecv([dist.P2POp(dist.isend, current, send_to, group),
                                              dist.P2POp(dist.irecv, incoming, recv_from, group)])
        block_out, block_lse = local_attention(q, current[0], current[1], scale)
        if out is None:
            _check_local_result(block_out, block_lse, q)
            out, lse = block_out.to(torch.float32, copy=True), block_lse.to(torch.float32, copy=True)
        else:
            _merge_into(out, lse, block_out, block_lse)
        for work in pending:
            work.wait()
        if pending:
            current = incoming
    return out.to(q.dtype)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    group: dist.ProcessGroup | None,
    local_attention: LocalAttention,
    shard_lengths: Sequence[int],
) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys, by two all-to-alls over heads.

    The first all-to-all gives each rank every token (in view order) of H/P heads, the local
    kernel attends over them, the second sends each rank's tokens back with all heads.
    Arguments and result as in ``ring_attention``; needs H divisible by the number of ranks.
    """
    _check_inference(q, k, v)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _check_shards(shard_lengths, world, rank, q, k, v)
    b, n, h, d = q.shape
    if h % world:
        raise ShardingError(f"ulysses_attention splits the {h} heads over {world} ranks, which needs "
                            f"{h} % {world} == 0; use ring_attention or a rank count that divides {h}")
    heads = h // world
    # Token-major (tokens, q/k/v, B, heads, D) pieces: what arrives from the ranks concatenates in view order.
    send = torch.empty(world, n, 3, b, heads, d, dtype=q.dtype, device=q.device)
    for i, t in enumerate((q, k, v)):
        send[:, :, i].copy_(t.unflatten(2, (world, heads)).permute(2, 1, 0, 3, 4))
    gathered = torch.empty(sum(shard_lengths), 3, b, heads, d, dtype=q.dtype, device=q.device)
    dist.all_to_all_single(gathered, send.flatten(0, 1), output_split_sizes=list(shard_lengths),
                           input_split_sizes=[n] * world, group=group)
    del send
    q_all, k_all, v_all = (gathered[:, i].transpose(0, 1) for i in range(3))
    out, lse = local_attention(q_all, k_all, v_all, scale)
    _check_local_result(out, lse, q_all)
    del gathered, q_all, k_all, v_all
    back = torch.empty(world * n, b, heads, d, dtype=q.dtype, device=q.device)
    dist.all_to_all_single(back, out.transpose(0, 1).to(q.dtype).contiguous(), output_split_sizes=[n] * world,
                           input_split_sizes=list(shard_lengths), group=group)
    return back.view(world, n, b, heads, d).permute(2, 1, 0, 3, 4).reshape(b, n, h, d)


def _check_inference(*tensors: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise InferenceOnlyError(
            "context parallelism is for inference: gradients do not flow across ranks, so training with "
            "process_group is not supported; run under torch.inference_mode() (or no_grad), or train on one GPU")


def _check_shards(shard_lengths: Sequence[int], world: int, rank: int, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> None:
    if len(shard_lengths) != world or any(n < 1 for n in shard_lengths):
        raise ShardingError(f"shard_lengths={list(shard_lengths)}; expected {world} positive token counts, one "
                            "per rank in rank order (SceneLayout.shard_lengths)")
    if q.dim() != 4 or k.shape != v.shape or k.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected this rank's "
                         "(B, L_rank, H, D) tokens, the same shape for all three (self-attention)")
    if q.shape[1] != shard_lengths[rank]:
        raise ShardingError(f"this rank (rank {rank}) holds {q.shape[1]} tokens but shard_lengths[{rank}] = "
                            f"{shard_lengths[rank]}; pass the shard_lengths of gather_layout for this forward")


def _check_local_result(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor) -> None:
    b, n, h, _ = q.shape
    if out.shape != q.shape or lse.shape != (b, h, n):
        raise ValueError(f"local_attention returned out {tuple(out.shape)}, lse {tuple(lse.shape)}; expected "
                         f"out {tuple(q.shape)} (B, L, H, D) and lse ({b}, {h}, {n}) (B, H, L)")


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


# ------------------------------------------------------------ splitting a scene
def split_views(
    views: Sequence | torch.Tensor,
    world_size: int,
    *,
    size: int | None = None,
    patch_size: int = 16,
    tokens_per_view: Sequence[int] | Callable[[object], int] | None = None,
) -> list:
    """Cut a scene's views into ``world_size`` contiguous shards (rank r gets shard r), balanced by tokens.

    views: a list of (3, H, W) / (B, 3, H, W) tensors or image file paths, an (N, 3, H, W)
    tensor or a (B, N, 3, H, W) batch of scenes. A tensor view has (H/p) * (W/p) tokens;
    an image file gets the tokens of its ``fast3r.load_images(paths, size)`` result, computed
    from its header alone (no pixel is decoded), so ``size`` (224 or 512) is required for
    paths. ``tokens_per_view`` (a list, or a function of a view) overrides both.
    The shards minimize the largest shard's token count (the slowest rank sets the pace) and,
    among those, keep each cut nearest its even share. Every shard holds at least one view.
    Returns a list of lists (tensor slices for tensor input, along the view dimension).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size}; need at least one rank")
    view_dim = 1 if isinstance(views, torch.Tensor) and views.dim() == 5 else 0
    if isinstance(views, torch.Tensor) and views.dim() not in (4, 5):
        raise ValueError(f"views has shape {tuple(views.shape)}; expected (N, 3, H, W) or (B, N, 3, H, W)")
    count = views.shape[view_dim] if isinstance(views, torch.Tensor) else len(views)
    if count < world_size:
        raise ShardingError(f"{count} views cannot fill {world_size} ranks: every rank needs at least one view; "
                            f"run at most {count} processes or pass more views")
    items = views.unbind(view_dim) if isinstance(views, torch.Tensor) else views
    weights = _token_counts(items, size, patch_size, tokens_per_view)
    bounds = [0, *_balanced_cuts(weights, world_size), count]
    if isinstance(views, torch.Tensor):
        return [views.narrow(view_dim, a, b - a) for a, b in itertools.pairwise(bounds)]
    return [list(views[a:b]) for a, b in itertools.pairwise(bounds)]


def shard_for_rank(views: Sequence | torch.Tensor, group: dist.ProcessGroup | None = None, **kwargs) -> list:
    """This rank's shard of ``split_views(views, world size of group, **kwargs)``."""
    return split_views(views, dist.get_world_size(group), **kwargs)[dist.get_rank(group)]


def _balanced_cuts(weights: Sequence[int], parts: int) -> list[int]:
    """Cut positions (parts - 1 of them) splitting ``weights`` into ``parts`` non-empty contiguous runs.

    First the smallest achievable largest-run sum (binary search with a greedy fit), then,
    cut by cut, the position nearest the run's even share of the total among those that keep
    every run within that bound and leave enough views for the runs after it (on a tie, the
    later cut: 5 equal views split 3 + 2).
    """
    n, total = len(weights), sum(weights)
    if not 1 <= parts <= n:
        raise ShardingError(f"cannot cut {n} views into {parts} non-empty shards")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    low, high = max(weights), total
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if _greedy_runs(weights, mid) <= parts else (mid + 1, high)
    cap = low
    # earliest[m]: smallest start from which the remaining views fit into m runs of at most cap.
    earliest, start, used = {0: n}, n, 0
    while used < parts:
        end = start
        while start > 0 and prefix[end] - prefix[start - 1] <= cap:
            start -= 1
        used += 1
        earliest[used] = start
    cuts, previous = [], 0
    for k in range(1, parts):
        lo = max(previous + 1, earliest[parts - k])
        hi = n - (parts - k)
        while hi > lo and prefix[hi] - prefix[previous] > cap:
            hi -= 1
        target = total * k / parts
        previous = min(range(lo, hi + 1), key=lambda c: (abs(prefix[c] - target), -c))  # ties: earlier ranks longer
        cuts.append(previous)
    return cuts


def _greedy_runs(weights: Sequence[int], cap: int) -> int:
    """How many runs of sum <= cap a left-to-right greedy fill needs."""
    runs, current = 1, 0
    for w in weights:
        if current + w > cap:
            runs, current = runs + 1, 0
        current += w
    return runs


def _token_counts(items: Sequence, size: int | None, patch_size: int,
                  tokens_per_view: Sequence[int] | Callable[[object], int] | None) -> list[int]:
    if tokens_per_view is not None:
        counts = [int(tokens_per_view(v)) for v in items] if callable(tokens_per_view) else list(tokens_per_view)
        if len(counts) != len(items) or any(c < 1 for c in counts):
            raise ValueError(f"tokens_per_view gives {counts[:8]}... for {len(items)} views; expected one positive "
                             "token count per view")
        return counts
    counts = []
    for i, view in enumerate(items):
        if isinstance(view, torch.Tensor):
            if view.dim() not in (3, 4):
                raise ValueError(f"view {i} has shape {tuple(view.shape)}; expected (3, H, W) or (B, 3, H, W)")
            h, w = view.shape[-2:]
        elif isinstance(view, (str, os.PathLike)):
            h, w = preprocessed_size(view, size)
        else:
            raise TypeError(f"view {i} is a {type(view).__name__}; pass tensors or image file paths, or "
                            "tokens_per_view")
        counts.append(max(1, (h // patch_size) * (w // patch_size)))
    return counts


def preprocessed_size(path: str | os.PathLike, size: int | None) -> tuple[int, int]:
    """(H, W) that ``fast3r.load_images([path], size)`` gives, from the image header alone."""
    from PIL import Image

    if size not in PREPROCESS_SIZES:
        raise ValueError(f"size={size}; image files need the load_images size (224 or 512) to count their tokens, "
                         "or pass tokens_per_view")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image {path} does not exist") from err
    # fast3r.images.preprocess: resize the long side (to 512, or so that the short side becomes 224) ...
    long_side = size if size == 512 else round(size * max(w / h, h / w))
    scale = long_side / max(w, h)
    w, h = round(w * scale), round(h * scale)
    cx, cy = w // 2, h // 2
    if size == 224:  # ... then a centre square,
        half = min(cx, cy)
        return 2 * half, 2 * half
    half_w, half_h = (2 * cx) // 16 * 8, (2 * cy) // 16 * 8  # ... or multiples of 16, a square becoming 4:3.
    if w == h:
        half_h = 3 * half_w // 4
    return 2 * half_h, 2 * half_w


# -------------------------------------------------------------- scene layout
@dataclass(frozen=True)
class SceneLayout:
    """Who holds which views and tokens of the scene; the same on every rank."""

    rank: int
    view_tokens: tuple[tuple[int, ...], ...]  # per rank, the token count of each of its views

    @property
    def world_size(self) -> int:
        return len(self.view_tokens)

    @property
    def num_views(self) -> int:
        return sum(len(r) for r in self.view_tokens)

    @property
    def view_offset(self) -> int:
        """Global index of this rank's first view (view ids are sequential across ranks)."""
        return sum(len(r) for r in self.view_tokens[: self.rank])

    @property
    def shard_lengths(self) -> list[int]:
        """Tokens of every rank, in rank order: what ``ring_attention`` / ``ulysses_attention`` take."""
        return [sum(r) for r in self.view_tokens]

    @property
    def token_offset(self) -> int:
        """Global index of this rank's first token in the scene's concatenated sequence."""
        return sum(self.shard_lengths[: self.rank])


def gather_layout(
    group: dist.ProcessGroup | None,
    local_view_token_counts: Sequence[int],
    dtype: torch.dtype,
    config_fingerprint: str,
) -> SceneLayout:
    """Exchange every rank's view token counts, dtype and config fingerprint in one host-side collective.

    Called once per forward, before the fusion layers. Every rank receives everyone's
    entries, so a rank without views, a dtype or a configuration that differs between ranks
    raises the same ``RankMismatchError`` / ``ShardingError`` on every rank instead of
    leaving the others waiting in the next collective. With NCCL, set the rank's CUDA
    device first (``torch.cuda.set_device``), as for any NCCL collective.
    """
    mine = (tuple(int(c) for c in local_view_token_counts), str(dtype), str(config_fingerprint))
    entries: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(entries, mine, group=group)
    empty = [r for r, (counts, _, _) in enumerate(entries) if not counts or min(counts) < 1]
    if empty:
        raise ShardingError(f"rank(s) {empty} hold no views (or a view without tokens); every rank needs at least "
                            "one view: use split_views / shard_for_rank, or fewer processes")
    same_config = "build the model from the same config, backend and checkpoint on every rank"
    for index, what, fix in ((1, "dtype", "load the model in one dtype on every rank"),
                             (2, "model configuration", same_config)):
        values = [entry[index] for entry in entries]
        if len(set(values)) > 1:
            listed = ", ".join(f"rank {r}: {value}" for r, value in enumerate(values))
            raise RankMismatchError(f"ranks disagree on the {what} ({listed}); {fix}")
    return SceneLayout(rank=dist.get_rank(group), view_tokens=tuple(entry[0] for entry in entries))


def fingerprint(*parts: object) -> str:
    """Short stable hash of anything with a deterministic repr (a frozen config dataclass, a backend name)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
