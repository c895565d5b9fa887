"""Time one training step of the OFFICIAL Fast3R and print one JSON line (issue 20's baseline).

What its training runs, on synthetic data: the released configuration (ViT-L encoder, 24 x 1024
fusion blocks, global + local DPT heads, random image indices) with random, perturbed weights;
fp32 weights, its own bf16 autocast inside every attention block (on CUDA); train mode; batch 1
of N views; ``ConfLossMultiviewV2(Regr3DMultiviewV4(L21Loss(), norm_mode="avg_dis"), alpha=0.2)``
on ground truth unprojected from random depth maps with holes; ``loss.backward()``; one AdamW step
(lr 1e-4, betas (0.9, 0.95), weight decay 0.05, as configs/model/fast3r.yaml). One warm-up step
(it also allocates AdamW's state), then --reps timed steps, each phase device-synchronized.

The official package is also named ``fast3r``: this runs in a process of its own, never beside ours.
  python3 benchmarks/official_train_step.py --official .peers/fast3r-official --views 32 --hw 384 512 --reps 3
  python3 benchmarks/official_train_step.py --official ../shared/peers/fast3r-official --config tiny --device cpu \
      --views 3 --hw 48 64 --reps 1        # a CPU check of the same path
Prints {"seconds": median step, "forward_s" (model + loss), "backward_s", "optimizer_s", "peak_gib", ...};
running out of memory prints {"oom": true, ...} instead (exit status 0), anything else a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

CONFIGS = {  # the released checkpoint (super_long_training) and the golden fixtures' tiny model
    "large": {"enc": {"embed_dim": 1024, "num_heads": 16, "depth": 24},
              "dec": {"embed_dim": 1024, "num_heads": 16, "depth": 24}},
    "tiny": {"enc": {"embed_dim": 128, "num_heads": 2, "depth": 2},
             "dec": {"embed_dim": 128, "num_heads": 2, "depth": 10}},
}
OFFICIAL_INDEX_ROWS = 1000  # the official image-index table; its training draws view indices from it


def official_args(name: str) -> dict[str, dict]:
    """The three constructor dicts; decoder: the training's random image indices (its config.json says False)."""
    enc, dec = CONFIGS[name]["enc"], CONFIGS[name]["dec"]
    return {
        "encoder_args": {"encoder_type": "croco", "img_size": 512, "patch_size": 16,
                         "patch_embed_cls": "ManyAR_PatchEmbed", "mlp_ratio": 4, "pos_embed": "RoPE100",
                         "attn_implementation": "flash_attention", **enc},
        "decoder_args": {"decoder_type": "fast3r", "random_image_idx_embedding": True,
                         "enc_embed_dim": enc["embed_dim"], "mlp_ratio": 4.0, "qkv_bias": True, "drop": 0.0,
                         "attn_drop": 0.0, "attn_implementation": "flash_attention", **dec},
        "head_args": {"head_type": "dpt", "output_mode": "pts3d", "landscape_only": True,
                      "depth_mode": ["exp", -float("inf"), float("inf")], "conf_mode": ["exp", 1, float("inf")],
                      "patch_size": 16, "with_local_head": True},
    }


def import_official(path: Path):
    """The official model and training loss; ``<path>/fast3r`` goes last on sys.path because its
    losses module imports the vendored DUSt3R as top-level ``dust3r``."""
    if not (path / "fast3r" / "models" / "fast3r.py").is_file():
        sys.exit(f"--official {path}: no fast3r/models/fast3r.py there; pass the official source checkout")
    sys.path.insert(0, str(path))
    sys.path.append(str(path / "fast3r"))
    from fast3r.dust3r.losses import ConfLossMultiviewV2, L21Loss, Regr3DMultiviewV4
    from fast3r.models.fast3r import Fast3R

    return Fast3R, ConfLossMultiviewV2(Regr3DMultiviewV4(L21Loss(), norm_mode="avg_dis"), alpha=0.2)


def synthetic_views(num_views: int, h: int, w: int, device: str, seed: int) -> list[dict[str, torch.Tensor]]:
    """A batch of one scene as the official loader collates it: img in [-1, 1], true_shape, and world
    points of random depth maps (12% holes = invalid pixels) seen by cameras with random rigid poses."""
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    focal = 0.8 * w
    rays = torch.stack([(u - w / 2) / focal, (v - h / 2) / focal, torch.ones_like(u)], dim=-1)
    views = []
    for _ in range(num_views):
        depth = 1.5 + torch.rand(h, w, generator=g)
        depth[torch.rand(h, w, generator=g) < 0.12] = 0
        q, r = torch.linalg.qr(torch.randn(3, 3, generator=g))
        rotation = q * torch.sign(torch.diagonal(r))  # a uniformly random orthogonal matrix ...
        if torch.det(rotation) < 0:
            rotation[:, 0] = -rotation[:, 0]  # ... made a rotation
        pose = torch.eye(4)
        pose[:3, :3], pose[:3, 3] = rotation, torch.randn(3, generator=g)
        points = (rays * depth[..., None]) @ rotation.T + pose[:3, 3]
        views.append({
            "img": (torch.rand(1, 3, h, w, generator=g) * 2 - 1).to(device),
            "true_shape": torch.tensor([[h, w]], dtype=torch.int32, device=device),
            "pts3d": points[None].to(device),
            "valid_mask": (depth > 0)[None].to(device),
            "camera_pose": pose[None].to(device),
        })
    return views


def build(Fast3R, name: str, device: str, seed: int):
    """The official model with its own init, biases and norms moved off their init (as run_official.py)."""
    torch.manual_seed(seed)
    model = Fast3R(**official_args(name))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith(".bias") or "norm" in key:
                p.add_(torch.randn_like(p) * 0.02)
    return model.to(device).train()


def timed_steps(model, criterion, views, reps: int, device: str) -> dict:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    phases: dict[str, list[float]] = {"seconds": [], "forward_s": [], "backward_s": [], "optimizer_s": []}
    loss = None
    for step in range(reps + 1):  # step 0 warms up (kernels, AdamW's state)
        if step == 1 and device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        preds = model(views)
        loss, _ = criterion(views, preds)  # the module's fp32 autocast around it is a no-op
        sync()
        t1 = time.perf_counter()
        loss.backward()
        del preds
        sync()
        t2 = time.perf_counter()
        optimizer.step()
        sync()
        t3 = time.perf_counter()
        if step == 0:
            warmup = t3 - t0
            continue
        for key, seconds in zip(phases, (t3 - t0, t1 - t0, t2 - t1, t3 - t2)):
            phases[key].append(seconds)
    result = {key: statistics.median(values) for key, values in phases.items()}
    return result | {"all_seconds": [round(s, 4) for s in phases["seconds"]], "warmup_s": round(warmup, 4),
                     "loss": loss.item()}


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "peers" / "fast3r-official",
                    help="the official source checkout (a copy of shared/peers/fast3r-official)")
    ap.add_argument("--config", default="large", choices=list(CONFIGS))
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--hw", type=int, nargs=2, default=[384, 512], metavar=("H", "W"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    h, w = args.hw
    if not 2 <= args.views <= OFFICIAL_INDEX_ROWS:
        ap.error(f"--views {args.views}: the official training draws view indices from its table of "
                 f"{OFFICIAL_INDEX_ROWS} rows; pass 2..{OFFICIAL_INDEX_ROWS}")
    if h % 16 or w % 16 or w < h:
        ap.error(f"--hw {h} {w}: H and W must be multiples of 16, landscape (W >= H), e.g. --hw 384 512")
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device; pass --device cpu for a CPU check")
    with contextlib.redirect_stdout(sys.stderr):  # the official code prints; stdout carries only the JSON line
        info = run(args, h, w)
    print(json.dumps(info))


def run(args: argparse.Namespace, h: int, w: int) -> dict:
    Fast3R, criterion = import_official(args.official.resolve())
    cuda = args.device.startswith("cuda")
    info = {"runner": "official", "config": args.config, "views": args.views, "hw": [h, w], "batch": 1,
            "device": args.device, "gpu": torch.cuda.get_device_name() if cuda else None,
            "precision": "fp32 weights, bf16 autocast in attention blocks" if cuda else "fp32",
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "torch": torch.__version__}
    try:
        model = build(Fast3R, args.config, args.device, args.seed)
        info["params"] = sum(p.numel() for p in model.parameters())
        views = synthetic_views(args.views, h, w, args.device, args.seed + 1)
        info |= {"oom": False, **timed_steps(model, criterion, views, args.reps, args.device)}
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_oom(err):
            raise
        info |= {"oom": True, "error": str(err).strip().splitlines()[0][:300]}
    info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return info


if __name__ == "__main__":
    main()
