"""Fast3R: many unposed views in, one global and one local pointmap per view out, in one pass."""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn

from . import checkpoint, memory, offload, parallel
from .backends import BACKENDS, get_ops
from .config import Fast3RConfig
from .encoder import Encoder
from .fusion import FusionTransformer, sample_image_indices
from .graphs import GraphCache
from .heads import DPTHead
from .layers import InPlace, check_patch_grid
from .memory import MEMORY_MODES, Workload, choose, lean_chunks

Images = torch.Tensor | Sequence[torch.Tensor]
# How the fusion attention spans ranks under context parallelism (benchmarks/NOTES.md compares them).
SHARDED_ATTENTION = {"ring": parallel.ring_attention, "ulysses": parallel.ulysses_attention}


class Fast3R(nn.Module):
    """The Fast3R network with the official state-dict layout.

    The backend is chosen when the layers are built: ``backend="torch"`` runs stock PyTorch
    ops; ``backend="triton"`` runs attention (with fused RoPE-2D), LayerNorm (with the fused
    residual add) and patch embedding on the kernels of ``fast3r_kernels``. The state dict
    is the same either way. A new model starts in train mode, like any nn.Module: call
    ``.eval()`` for inference (``from_pretrained`` returns it in eval mode).
    """

    def __init__(self, cfg: Fast3RConfig | str = "large", backend: str = "torch"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
        self.config = Fast3RConfig.preset(cfg) if isinstance(cfg, str) else cfg
        self.backend = backend
        self.ops = ops = get_ops(backend)
        self.encoder = Encoder(self.config, ops)
        self.decoder = FusionTransformer(self.config, ops)
        self.downstream_head = DPTHead(self.config, ops)
        self.downstream_head_local = DPTHead(self.config, ops) if self.config.with_local_head else None
        self._replay_graphs = False  # set by compile(mode="reduce-overhead")
        self._capturing = False  # True while _graphed captures: the forward inside must not graph itself again

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        images: Images,
        *,
        image_ids: str | torch.Tensor = "auto",
        seed: int | None = None,
        encoder_chunk: int | None = None,
        head_chunk: int | None = None,
        process_group: dist.ProcessGroup | None = None,
        context_parallel: str = "auto",
        output_device: torch.device | str | None = None,
        cuda_graph: bool = False,
        memory: str = "auto",
    ) -> list[dict[str, torch.Tensor]]:
        """Reconstruct a scene.

        images: (N, 3, H, W), a list of N (3, H_i, W_i) tensors (sizes may differ), or a
            batch of scenes (B, N, 3, H, W). Float images are in [-1, 1]; uint8 RGB is
            normalized here. H and W must be multiples of the patch size (16).
        image_ids: "sequential" (view i uses index i), "random" (the official training
            scheme, seeded by ``seed``), an explicit (N,) or (B, N) tensor, or "auto"
            (random if the config asks for it, else sequential).
        encoder_chunk / head_chunk: views per encoder / head pass (default: from free memory).
        process_group: run one scene across the ranks of this torch.distributed group. Each
            rank passes its own contiguous shard of the views (rank order is view order;
            ``fast3r.parallel.split_views`` makes balanced shards) and gets its own views'
            outputs; the fusion attention spans every rank's tokens, so the result equals
            the single-process forward of the whole scene. View ids are global (rank 0's
            first view is view 0, the reference frame); an explicit ``image_ids`` tensor
            holds the whole scene's ids. Inference only.
        context_parallel: how the fusion attention crosses ranks: "ulysses" (all-to-all over
            heads; needs heads % ranks == 0), "ring" (K/V blocks passed around, overlapped with
            compute; any rank count), or "auto": ulysses where it applies, else ring (measured
            fastest, benchmarks/NOTES.md).
        output_device: move each view's outputs there as its head chunk finishes (e.g.
            "cpu", so thousands of fp32 pointmaps do not stay on the GPU).
        cuda_graph: capture the forward once per input shape and replay it (inference on a
            CUDA tensor of one size; pays at small view counts, where launches dominate).
        memory: "fast" keeps the four layers the heads read on the device (about 10 token buffers
            of B x tokens x 1024 x 2 bytes at the peak: 24 GiB at 1500 views of 512x384); "lean" moves
            them to pinned host memory as they are produced and brings them back per head chunk, and
            runs each fusion block in place with the queries in chunks (3 token buffers: 9 GiB there),
            for the same outputs; "auto" (default) is "fast" where its peak fits the memory this
            process may still use (``torch.cuda.set_per_process_memory_fraction`` included), else
            "lean". Lean is for inference in the model's own dtype: not under autograd, autocast or
            ``cuda_graph=True`` ("auto" is "fast" there). See ``fast3r.memory``. For thousands of views
            also pass ``output_device="cpu"``: the fp32 outputs take 32 bytes per pixel.

        Returns one dict per view with ``pts3d_in_other_view`` (H, W, 3) in view 0's
        camera frame, ``conf`` (H, W), and with the local head ``pts3d_local`` (H, W, 3)
        in the view's own frame and ``conf_local`` (H, W); a leading B for batched input.
        All outputs are fp32.
        """
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory={memory!r}; choose one of {MEMORY_MODES}")
        if not cuda_graph and self._replay_graphs and not self._capturing:  # Fast3R.compile(mode="reduce-overhead")
            cuda_graph = (isinstance(images, torch.Tensor) and images.is_cuda and process_group is None
                          and memory != "lean" and not self.training and not torch.is_grad_enabled())
        if cuda_graph:
            if memory == "lean":
                raise ValueError("cuda_graph=True captures the fast plan (the lean one copies to host memory on a "
                                 "side stream); pass memory='fast' or 'auto' with cuda_graph=True")
            return self._graphed(images, image_ids, seed, encoder_chunk, head_chunk, output_device)
        views, batched = _as_views(images, self.config.patch_size)
        patch = self.config.patch_size
        grids = [(v.shape[-2] // patch, v.shape[-1] // patch) for v in views]
        sizes = [gh * gw for gh, gw in grids]
        offsets = [0, *itertools.accumulate(sizes)]
        attend, first_view, num_views = None, 0, len(views)
        if process_group is not None:
            attend, first_view, num_views = self._context_parallel(process_group, context_parallel, sizes,
                                                                   views[0].shape[0])
        ids = self._image_ids(image_ids, seed, views[0].shape[0], num_views)[:, first_view : first_view + len(views)]
        lean = self._memory_plan(memory, views, grids, output_device)
        tokens = self._encode(views, grids, offsets, encoder_chunk)
        hooks = self.decoder(tokens, sizes, _to_device(ids, tokens.device), attend, lean)
        del tokens  # hooks[0] holds it (or its host copy); nothing else may
        return self._predict(hooks, grids, offsets, batched, head_chunk, output_device)

    def _memory_plan(self, memory: str, views: list[torch.Tensor], grids: list[tuple[int, int]],
                     output_device: torch.device | str | None) -> InPlace | None:
        """-> the lean plan's chunks, or None for the fast plan (``fast3r.memory.choose`` decides "auto")."""
        device, dtype = self._device(), self._dtype()
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        autocast = torch.is_autocast_enabled(device.type)
        if memory == "lean" and (training or autocast):
            raise ValueError("memory='lean' is for inference in the model's own dtype: run under "
                             "torch.inference_mode() (or no_grad) and cast the model (model.to(torch.bfloat16)) "
                             "instead of autocast; or pass memory='fast'")
        if training or autocast:
            return None
        patch = self.config.patch_size
        work = Workload(
            batch=views[0].shape[0], views=len(views), tokens=sum(gh * gw for gh, gw in grids),
            view_tokens=max(gh * gw for gh, gw in grids), view_pixels=max(gh * gw for gh, gw in grids) * patch**2,
            elem_bytes=dtype.itemsize,
            outputs_on_device=output_device is None or _same_device(torch.device(output_device), device))
        if choose(self.config, memory, device, work) == "fast":
            return None
        return lean_chunks(device, self.config.fusion_heads)

    def _context_parallel(self, group: dist.ProcessGroup, method: str, sizes: list[int], batch: int):
        """-> (attention across ranks, global index of this rank's first view, views in the scene)."""
        if method == "auto":
            method = "ulysses" if self.config.fusion_heads % dist.get_world_size(group) == 0 else "ring"
        if method not in SHARDED_ATTENTION:
            raise ValueError(f"context_parallel={method!r}; choose 'auto' or one of {sorted(SHARDED_ATTENTION)}")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise parallel.InferenceOnlyError("context parallelism (process_group=...) is for inference: run it "
                                              "under torch.inference_mode() or torch.no_grad()")
        layout = parallel.gather_layout(group, sizes, self._dtype(),
                                        # the ring's buffers assume one batch size on every rank
                                        parallel.fingerprint(self.config, self.backend, self.training, batch))
        attend = functools.partial(SHARDED_ATTENTION[method], group=group,
                                   local_attention=self.ops.attention_with_lse, shard_lengths=layout.shard_lengths)
        return (lambda q, k, v, scale: attend(q, k, v, scale=scale)), layout.view_offset, layout.num_views

    def _graphed(self, images, image_ids, seed, encoder_chunk, head_chunk, output_device):
        if not (isinstance(images, torch.Tensor) and images.is_cuda):
            raise ValueError("cuda_graph=True needs the images as one CUDA tensor (N, 3, H, W) or (B, N, 3, H, W)")
        if self.training or torch.is_grad_enabled():
            raise ValueError("cuda_graph=True is for inference: call model.eval() and run under "
                             "torch.inference_mode()")
        views, _ = _as_views(images, self.config.patch_size)  # validates once, outside the capture
        batch = views[0].shape[0]
        ids = _to_device(self._image_ids(image_ids, seed, batch, len(views)), images.device)
        if not hasattr(self, "_graph_cache"):
            self._graph_cache = GraphCache()
        self._capturing = True  # the forward captured (and its warm-up) runs eager, not graphed again
        try:
            outputs = self._graph_cache.run(
                lambda x: self(x, image_ids=ids, encoder_chunk=encoder_chunk or len(views),
                               head_chunk=head_chunk or min(len(views), memory.MAX_HEAD_CHUNK)),
                images, (tuple(ids.flatten().tolist()), encoder_chunk, head_chunk))
        finally:
            self._capturing = False
        if output_device is not None:
            outputs = [{k: t.to(output_device) for k, t in view.items()} for view in outputs]
        return outputs

    def _encode(self, views: list[torch.Tensor], grids: list[tuple[int, int]], offsets: list[int],
                chunk: int | None) -> torch.Tensor:
        """Encoder tokens of all views, concatenated: (B, sum of tokens, enc_dim), in view chunks."""
        batch, device = views[0].shape[0], self._device()
        dtype = self.encoder.patch_embed.proj.weight.dtype
        tokens = torch.empty(batch, offsets[-1], self.config.enc_dim, dtype=dtype, device=device)
        per_view = memory.encoder_bytes_per_view(self.config, max(gh * gw for gh, gw in grids), dtype.itemsize)
        chunk = chunk or memory.chunk_size(device, per_view * batch, memory.MAX_ENCODER_CHUNK, memory.CPU_ENCODER_CHUNK)
        for run in _runs(grids, chunk):
            out = self.encoder(torch.cat([_to_model(views[i], dtype, device) for i in run]))
            tokens[:, offsets[run[0]] : offsets[run[-1] + 1]] = rearrange(out, "(n b) t c -> b (n t) c", n=len(run))
        return tokens

    def _predict(self, hooks: list[torch.Tensor], grids: list[tuple[int, int]], offsets: list[int], batched: bool,
                 chunk: int | None, output_device: torch.device | str | None) -> list[dict[str, torch.Tensor]]:
        """Run both heads on the hook layers, in chunks of equally sized views.

        Hook layers in host memory (the lean plan) come to the device one chunk at a time, the next
        chunk's copy overlapping the heads' work on this one.
        """
        batch, patch, device = hooks[0].shape[0], self.config.patch_size, self._device()
        pixels = max(gh * gw for gh, gw in grids) * patch * patch
        per_view = memory.head_bytes_per_view(self.config, pixels, hooks[0].dtype.itemsize)
        chunk = chunk or memory.chunk_size(device, per_view * batch, memory.MAX_HEAD_CHUNK, memory.CPU_HEAD_CHUNK)
        heads = {"": self.downstream_head, "_local": self.downstream_head_local}
        results: list[dict[str, torch.Tensor]] = [{} for _ in grids]
        runs = _runs(grids, chunk)
        rows = offload.rows_on_device(hooks, [(offsets[run[0]], offsets[run[-1] + 1]) for run in runs], device)
        for run, chunk_layers in zip(runs, rows):
            n = len(run)
            layers = [rearrange(h, "b (n t) c -> (n b) t c", n=n) for h in chunk_layers]
            for suffix, head in heads.items():
                if head is None:
                    continue
                points, conf = head(layers, grids[run[0]])
                points = points.view(n, batch, *points.shape[1:])
                conf = conf.view(n, batch, *conf.shape[1:])
                key = "pts3d_in_other_view" if suffix == "" else "pts3d_local"
                if output_device is not None:
                    points, conf = points.to(output_device), conf.to(output_device)
                for j, i in enumerate(run):
                    results[i][key] = points[j] if batched else points[j, 0]
                    results[i]["conf" + suffix] = conf[j] if batched else conf[j, 0]
        return results

    def _device(self) -> torch.device:
        return self.encoder.patch_embed.proj.weight.device

    def _dtype(self) -> torch.dtype:
        return self.encoder.patch_embed.proj.weight.dtype

    def _image_ids(self, image_ids: str | torch.Tensor, seed: int | None, batch: int, num_views: int) -> torch.Tensor:
        if isinstance(image_ids, torch.Tensor):
            from .validation import check_image_ids

            return check_image_ids(image_ids, batch, num_views)
        if image_ids == "auto":
            image_ids = "random" if self.config.random_image_index else "sequential"
        if image_ids == "sequential":
            return torch.arange(num_views).expand(batch, num_views)
        if image_ids == "random":
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            return sample_image_indices(batch, num_views, generator)
        raise ValueError(f"image_ids={image_ids!r}; use 'sequential', 'random', 'auto' or a tensor of indices")

    # ------------------------------------------------------------------ compile
    def compile(self, *, mode: str | None = None, dynamic: bool | None = None, fullgraph: bool = True,
                **options) -> Fast3R:
        """Compile each encoder block, fusion block and head with ``torch.compile`` (regional compilation).

        The blocks repeat, so one compiled graph serves all 24 of a kind: compile time is that of
        three small graphs, not of the whole unrolled forward. The first scene compiles them for its
        shapes; a scene of another view count recompiles them once with symbolic token and view
        dimensions (torch.compile's automatic dynamic shapes), and no view count after that does;
        ``dynamic=True`` starts symbolic; ``dynamic=False`` compiles each new shape apart, as ``compile: true``
        in a training config does (with symbolic sizes, Inductor's CPU backend fails on the heads' training
        graph, torch 2.13). The per-view bookkeeping between them stays eager Python.
        ``mode="reduce-overhead"``: the regions compile in the default mode and every inference
        forward on a CUDA tensor then replays as one CUDA graph (``cuda_graph=True``); per-region
        graphs (Inductor's cudagraph trees) would overwrite a block's output at the next block's
        replay while the heads still hold it. Returns the model (compiled in place), so
        ``Fast3R(...).compile()`` chains. ``torch.compile(model)`` works too; it traces the whole
        forward, and then recompiles for every new view count (the output is a list of N dicts).
        """
        self._replay_graphs = mode == "reduce-overhead"
        mode = None if self._replay_graphs else mode
        blocks = [*self.encoder.enc_blocks, *self.decoder.dec_blocks]
        heads = [h.dpt for h in (self.downstream_head, self.downstream_head_local) if h is not None]
        for module in (*blocks, *heads):
            module.compile(mode=mode, dynamic=dynamic, fullgraph=fullgraph, **options)
        return self

    # --------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        backend: str = "torch",
        config: Fast3RConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Fast3R:
        """Load a checkpoint directory or weights file (config.json beside it), or a hub id.

        An existing local path always wins; a string ``owner/name`` that is not one is a Hugging
        Face hub id (``checkpoint.resolve`` states the rule). Strict: a missing, unexpected or
        mis-shaped key raises ``CheckpointError`` naming it, as does an empty, truncated or
        non-weights file. Pickled ``.pth``/``.bin`` files are read with ``weights_only=True``.
        Returns the model in eval mode.
        """
        weights, config_path = checkpoint.resolve(path_or_repo_id)
        architecture = weights.parent / checkpoint.ARCHITECTURE_NAME  # written where config.json cannot say it all
        if config is None and architecture.is_file():
            config = Fast3RConfig.from_yaml(architecture)
        if config is None:
            if config_path is None:
                raise FileNotFoundError(f"no {checkpoint.CONFIG_NAME} beside {weights}; pass config=Fast3RConfig(...)")
            config = checkpoint.read_config(config_path)
        with torch.device("meta"):
            model = cls(config, backend=backend)
        checkpoint.load_strict(model, checkpoint.read_state_dict(weights), str(weights))
        return model.to(device=device, dtype=dtype).eval()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module``'s; strict loading names every bad key or non-finite tensor (``checkpoint.load_strict``)
        and takes either name of a weight shared under two, as safetensors files hold them."""
        if not strict:
            return super().load_state_dict(state_dict, strict=False, assign=assign)
        return checkpoint.load_strict(self, dict(state_dict), "state_dict", assign=assign)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` in the official layout."""
        return checkpoint.save(self, self.config, directory)


def _as_views(images: Images, patch: int) -> tuple[list[torch.Tensor], bool]:
    """-> per-view (B, 3, H, W) tensors, and whether the caller passed a batch of scenes.

    The input is checked here, once: shape, dtype, at least one view and scene, and float values
    (finite, in [-1, 1]; see ``validation.check_float_images``).
    """
    from .validation import check_float_images

    if isinstance(images, torch.Tensor):
        if images.dim() not in (4, 5):
            raise ValueError(f"images has shape {tuple(images.shape)}; expected (N, 3, H, W) or (B, N, 3, H, W)")
        if 0 in images.shape[:-3]:
            raise ValueError(f"images has shape {tuple(images.shape)}: no view to reconstruct; pass at least one")
        batched = images.dim() == 5
        by_view = images.transpose(0, 1) if batched else images  # view index first, no copy
        views = list(by_view) if batched else list(images.unsqueeze(1))
    elif isinstance(images, Sequence) and all(isinstance(v, torch.Tensor) for v in images):
        if not images:
            raise ValueError("images is an empty list; pass a non-empty list of (3, H, W) tensors, one per view")
        if any(v.dim() != 3 for v in images):
            raise ValueError("a list of images must hold (3, H, W) tensors, one per view")
        views, batched = [v.unsqueeze(0) for v in images], False
        by_view = views
    else:
        raise TypeError("images must be a tensor (N, 3, H, W) / (B, N, 3, H, W) or a non-empty list of (3, H, W) tensors")
    if len({v.dtype == torch.uint8 for v in views}) > 1:
        raise TypeError("views mix uint8 and float images; pass all views as uint8 RGB or all as floats in [-1, 1]")
    for i, v in enumerate(views):
        if v.shape[1] != 3:
            raise ValueError(f"view {i} has {v.shape[1]} channels; Fast3R takes RGB (3 channels)")
        if not (v.dtype.is_floating_point or v.dtype == torch.uint8):
            raise TypeError(f"view {i} has dtype {v.dtype}; pass float images in [-1, 1] or uint8 RGB")
        check_patch_grid(v.shape[-2], v.shape[-1], patch)
    check_float_images(by_view)
    return views, batched


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to ``device`` without waiting for the GPU (pinned, asynchronous).

    Under torch.compile / export a plain copy: the graph owns its host-to-device transfers. An expanded
    tensor (sequential image ids of a batch) is made contiguous first: pinning cannot write overlapping memory.
    """
    if device.type == "cuda" and t.device.type == "cpu" and not torch.compiler.is_compiling():
        return t.contiguous().pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """"cuda" and "cuda:0" name one device when the current device is 0."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _to_model(view: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Float views take the model dtype; uint8 stays uint8 (the patch embedding normalizes it)."""
    view = view.to(device)
    return view if view.dtype == torch.uint8 else view.to(dtype)


def _runs(grids: list[tuple[int, int]], max_len: int) -> list[list[int]]:
    """Split view indices into consecutive runs of equal grid size, each at most ``max_len`` long."""
    runs: list[list[int]] = []
    for i, grid in enumerate(grids):
        if runs and len(runs[-1]) < max_len and grids[runs[-1][0]] == grid:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
