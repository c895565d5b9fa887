"""Where does a Fast3R trained from scratch stall? The learning run's question, small enough for 2 CPU cores.

    python benchmarks/pose_study_cpu.py                                  # ~30 min on 2 cores: 1500 steps
    python benchmarks/pose_study_cpu.py --curriculum 2:400,3:300         # windows of 2, then 3 views first
    python benchmarks/pose_study_cpu.py --scenes 8 --steps 20 --val-every 10   # a smoke run (~1 minute)

The GPU learning runs (benchmarks/learning_run.py, 224 px, 13M parameters) learn depth and layout and no
cameras. Each try there costs a device call; this study asks the same question at 128 px with a 1.2M-parameter
model (64 wide, 2 encoder + 4 fusion blocks), 2 views a sample drawn from ``--window`` consecutive views of a
scene's 24-view trajectory, 16 samples a step, AdamW 1e-3 (warm-up, cosine), clip 1.0, all scenes rendered
into memory first (~3 minutes for 1024). Its own short loop rather than ``fast3r train``: the package trains
at the official 224 and 512 px only, and a 224 px step of this model takes ~4x as long.

What it records (``results/train/pose_study_cpu_<name>.json``, a PNG beside it): the training loss and its
point distances split by ``fast3r.train.distances`` (each view in its own frame; view 0; views 1.. in view 0's
frame) every 50 steps; every ``--val-every`` steps on 64 held-out samples (32 scenes) and 32 training
samples, the loss, RRA@15 / RTA@15 / mAA@30 of the cameras ``estimate_cameras`` (procrustes) recovers and the
median rotation and translation-direction errors; and once, floors to read them against: what identity
cameras score, what a flat depth map scores on the local term, and how much of a view its neighbours
1..7 views along the trajectory see (the rest is occluded or out of frame).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fast3r import Fast3R, estimate_cameras, fast3r_loss
from fast3r.config import Fast3RConfig
from fast3r.fusion import sample_image_indices
from fast3r.metrics import pose_metrics, relative_pose_errors
from fast3r.train.data.dataset import assemble, collate, to_model_inputs
from fast3r.train.data.sampling import crop_view, world_points
from fast3r.train.data.synthetic import synthetic_scene
from fast3r.train.distances import PARTS, point_distances
from fast3r.train.evaluate import POSE_METRICS, identity_pose_metrics

TRAJECTORY = 24  # views a scene's camera path has (the package's synthetic default)
HELD_OUT_SCENES, HELD_OUT_SEED, PROBE_SAMPLES = 32, 100_000, 32
MARGIN = 16  # rendered this many pixels larger than --res, so that the random crops can zoom


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--res", type=int, default=128, help="square views of this size (default 128)")
    parser.add_argument("--scenes", type=int, default=1024, help="training scenes (default 1024)")
    parser.add_argument("--window", type=int, default=4, help="consecutive views a sample is drawn from, in the "
                        "held-out set and after the curriculum (default 4)")
    parser.add_argument("--curriculum", default="", help="training windows before --window, as WINDOW:STEPS,...")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dim", type=int, default=64, help="encoder and fusion width (heads: dim / 32, at least 4)")
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--name", default="default", help="results/train/pose_study_cpu_<name>.json")
    parser.add_argument("--out", type=Path, help="results JSON instead (a PNG beside it)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    train_scenes = [render(seed, args.res) for seed in range(args.scenes)]
    held_out_scenes = [render(HELD_OUT_SEED + seed, args.res) for seed in range(HELD_OUT_SCENES)]
    print(f"rendered {args.scenes} + {HELD_OUT_SCENES} scenes in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    held_out = [draw(views, np.random.default_rng([7, i, k]), args, args.window, augment=False)
                for i, views in enumerate(held_out_scenes) for k in range(2)]
    probe = [draw(views, np.random.default_rng([8, i]), args, args.window, augment=False)
             for i, views in enumerate(train_scenes[:PROBE_SAMPLES])]
    floors = {"identity_poses": identity_pose_metrics(held_out),
              "flat_depth_local_distance": flat_depth_floor(held_out_scenes, args.res),
              "visible_share_by_gap": overlap_by_gap(held_out_scenes)}
    print(json.dumps(floors), file=sys.stderr)
    model = Fast3R(Fast3RConfig(enc_dim=args.dim, enc_depth=2, enc_heads=max(4, args.dim // 32), fusion_dim=args.dim,
                                fusion_depth=4, fusion_heads=max(4, args.dim // 32), head_feature_dim=32,
                                head_layer_dims=(16, 32, 64, 128), img_size=args.res, random_image_index=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(args.steps))
    windows = curriculum(args.curriculum)
    out = args.out or Path(__file__).resolve().parent / "results" / "train" / f"pose_study_cpu_{args.name}.json"
    document = {"args": {**vars(args), "out": str(out)}, "parameters": sum(p.numel() for p in model.parameters()), "floors": floors,
                "train": [], "validations": []}
    rng, ids, recent = np.random.default_rng(0), torch.Generator().manual_seed(0), []
    for step in range(args.steps + 1):
        if step % args.val_every == 0 or step == args.steps:
            document["validations"].append({"step": step, "held_out": evaluate(model, held_out, args.views),
                                            "training_samples": evaluate(model, probe, args.views),
                                            "seconds": round(time.perf_counter() - started)})
            print(json.dumps(document["validations"][-1]), file=sys.stderr)
            write(document, out)
        if step == args.steps:
            break
        window = next((w for w, until in windows if step < until), args.window)
        batch = collate([draw(train_scenes[int(rng.integers(args.scenes))], rng, args, window, augment=True)
                         for _ in range(args.batch)])
        images, gts = to_model_inputs(batch)
        loss, details = fast3r_loss(model(images, image_ids=sample_image_indices(args.batch, args.views, ids)), gts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent.append({"loss": loss.item(), **point_distances(details)})
        if (step + 1) % 50 == 0:
            document["train"].append({"step": step + 1, "window": window, "seconds": round(time.perf_counter() - started),
                                      **{k: _mean([r[k] for r in recent]) for k in ("loss", *PARTS)}})
            recent = []
            print(json.dumps(document["train"][-1]), file=sys.stderr)
    write(document, out)
    plot(document, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0


def render(seed: int, res: int) -> list[dict]:
    scene = synthetic_scene(seed=seed, views=TRAJECTORY, size=(res + MARGIN, res + MARGIN))
    return [scene.view(j) for j in range(TRAJECTORY)]


def draw(views: list[dict], rng: np.random.Generator, args, window: int, augment: bool) -> dict:
    """A sample as the package's datasets make one: views from a window of the trajectory, in view 0's frame."""
    start = int(rng.integers(0, TRAJECTORY - window + 1))
    picks = start + rng.choice(window, args.views, replace=False)
    return assemble([crop_view(views[int(j)], (args.res, args.res), rng if augment else None) for j in picks], "study")


def curriculum(text: str) -> list[tuple[int, int]]:
    """'2:400,3:300' -> [(2, 400), (3, 700)]: window 2 before step 400, 3 before step 700."""
    windows, until = [], 0
    for part in filter(None, text.split(",")):
        window, steps = (int(x) for x in part.split(":"))
        until += steps
        windows.append((window, until))
    return windows


def schedule(steps: int):
    warmup = max(1, min(200, steps // 10))
    return lambda s: (s + 1) / warmup if s < warmup else \
        0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def evaluate(model: Fast3R, samples: list[dict], views: int) -> dict[str, float]:
    model.eval()
    rows = []
    for i, sample in enumerate(samples):
        preds = model(sample["images"][None], image_ids=sample_image_indices(1, views, torch.Generator().manual_seed(i)))
        gts = [{key: sample[key][v][None] for key in ("pts3d", "valid_mask", "camera_pose")} for v in range(views)]
        loss, details = fast3r_loss(preds, gts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untrained model's focal estimates
            found = estimate_cameras([{k: x[0].float() for k, x in view.items()} for view in preds],
                                     method="procrustes")["cam2world"].double()
        truth = sample["camera_pose"].double()
        rotation, translation = relative_pose_errors(found, truth)
        rows.append({"loss": float(loss), **point_distances(details), **_pose(found, truth),
                     "rotation_error_deg": float(rotation.nan_to_num(180).median()),
                     "translation_error_deg": float(translation.nan_to_num(90).median())})
    model.train()
    means = {key: _mean([r[key] for r in rows]) for key in rows[0] if not key.endswith("_deg")}
    return {**means, **{f"median_{key}": round(float(np.median([r[key] for r in rows])), 2)
                        for key in ("rotation_error_deg", "translation_error_deg")}}


def flat_depth_floor(scenes: list[list[dict]], res: int) -> float:
    """The local term's distance for a constant depth map (what a model that learned no depth scores), 3 views a scene."""
    distances = []
    for views in scenes:
        for j in (0, 7, 15):
            sample = assemble([crop_view(views[j], (res, res), None)], "floor")
            points, valid = sample["pts3d"][0].double(), sample["valid_mask"][0]
            flat = torch.from_numpy(world_points(np.ones((res, res)), sample["intrinsics"][0].double().numpy(), np.eye(4)))
            flat = flat / flat[valid].norm(dim=-1).mean()
            distances.append(float((flat - points / points[valid].norm(dim=-1).mean()).norm(dim=-1)[valid].mean()))
    return _mean(distances)


def overlap_by_gap(scenes: list[list[dict]]) -> dict[int, dict[str, float]]:
    """Of view i's valid pixels, the share that view i + gap sees (in frame and not occluded: depth within 3%)."""
    shares = {gap: [] for gap in range(1, 8)}
    for views in scenes:
        for start in (0, 8, 16):
            for gap, found in shares.items():
                if start + gap < len(views):
                    found.append(_visible_share(views[start], views[start + gap]))
    return {gap: {"median": round(float(np.median(s)), 3), "below_10_percent": round(float(np.mean(np.less(s, 0.1))), 3)}
            for gap, s in shares.items()}


def _visible_share(seen: dict, source: dict) -> float:
    depth = source["depth"].astype(np.float64)
    h, w = depth.shape
    p = world_points(depth, source["intrinsics"], np.linalg.inv(seen["cam2world"]) @ source["cam2world"])
    z = np.where(p[..., 2] > 1e-2, p[..., 2], np.nan)
    u = seen["intrinsics"][0, 0] * p[..., 0] / z + seen["intrinsics"][0, 2]
    v = seen["intrinsics"][1, 1] * p[..., 1] / z + seen["intrinsics"][1, 2]
    inside = (depth > 0) & np.isfinite(z) & (u > -0.5) & (u < w - 0.5) & (v > -0.5) & (v < h - 0.5)
    col, row = np.round(np.nan_to_num(u)).astype(int).clip(0, w - 1), np.round(np.nan_to_num(v)).astype(int).clip(0, h - 1)
    return float((inside & (np.abs(seen["depth"][row, col] - z) < 0.03 * np.nan_to_num(z))).sum() / max((depth > 0).sum(), 1))


def _pose(cam2world: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    metrics = pose_metrics(cam2world, truth, thresholds=(15,))
    return {key: metrics[key] for key in POSE_METRICS}


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def write(document: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(document, indent=1))
    partial.replace(path)


def plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    train, vals = document["train"], document["validations"]
    for key, label in (("regr_local", "each view, own frame"), ("regr_anchor", "view 0"),
                       ("regr_others", "views 1.., view 0's frame")):
        axes[0].plot([r["step"] for r in train], [r[key] for r in train], label=label)
    axes[0].axhline(document["floors"]["flat_depth_local_distance"], color="gray", linestyle=":",
                    label="flat depth (local)")
    axes[0].set_title("training point distance")
    for ax, key in zip(axes[1:], ("RRA@15", "RTA@15")):
        for split in ("held_out", "training_samples"):
            ax.plot([v["step"] for v in vals], [v[split][key] for v in vals], "o-", label=split.replace("_", " "))
        ax.axhline(document["floors"]["identity_poses"][key], color="gray", linestyle=":", label="identity poses")
        ax.set_title(key)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(f"pose study on the CPU: {document['args']['res']} px, {document['parameters'] / 1e6:.1f}M parameters, "
                 f"window {document['args']['window']}, curriculum {document['args']['curriculum'] or 'none'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
