"""Training data at 512: views/s per CPU core from files on disk, and the DataLoader workers a GPU step needs.

    python benchmarks/bench_train_data.py [--out benchmarks/results/train_data_cpu.json] [--views 16]
        [--samples 3] [--sizes 1024x768 1920x1440]

A synthetic scene rendered at each source size (real-camera sizes, not the crop's) is written in
the folder format (PNG images and float32 .npy depth; JPEG images at quality 95 and .npy depth) and
as a COLMAP workspace (PNG images, binary depth maps). For each, ``build_dataset(..., size=512,
split="train")`` makes --samples samples of --views views (random aspect ratio, zoom, jitter), on
one thread; the time per view is split into reading (decode + depth), cropping (resize of the
image over the crop box, nearest depth), colour jitter and assembling (world points, tensors).
Process CPU time, best of 2 passes (the machine is shared). Every sample is checked: finite
points, valid depth nearly everywhere (the synthetic room is closed).

Workers: the large model's training step at 32 views of 512 x 384 takes 1.00 s on an H200
(shared/TRAINING.md, ours, triton backend, bf16), so the GPU eats 32 views/s; one worker (one core)
makes R views/s, so ceil(32 / R) workers keep up, plus one for jitter in decode times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fast3r.train.data import Scene, build_dataset, load_scene, save_scene, synthetic_scene
from fast3r.train.data.dataset import assemble
from fast3r.train.data.sampling import (
    RESOLUTIONS,
    color_jitter,
    crop_box,
    crop_intrinsics,
    resample_depth,
    resample_image,
)
from fast3r.train.data.synthetic import SyntheticReader

RESULTS = Path(__file__).resolve().parent / "results"
STEP_S, STEP_VIEWS = 1.00, 32  # shared/TRAINING.md: large model, 32 views of 512x384, one H200, triton, bf16
PASSES = 2


def source_scene(size: tuple[int, int], views: int, image_suffix: str) -> Scene:
    scene = synthetic_scene(7, views, size)
    cameras = [dataclasses.replace(c, name=c.name.replace(".png", image_suffix)) for c in scene.cameras]
    return Scene(scene.name, cameras, SyntheticReader(7, cameras))


def best_cpu(work) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(PASSES):
        start = time.process_time()
        out = work()
        best = min(best, time.process_time() - start)
    return best, out


def stages(scene: Scene, views: int) -> dict:
    """CPU seconds per view of each stage, on one 512 x 336 sample with the official zoom and jitter."""
    rng = np.random.default_rng(0)
    resolution = RESOLUTIONS[512][1]
    picks = rng.choice(len(scene), views, replace=False)
    read_s, loaded = best_cpu(lambda: [scene.view(int(j)) for j in picks])
    boxes = [crop_box(v["intrinsics"], v["image"].shape[:2], resolution, int(rng.integers(16)), v["name"])
             for v in loaded]
    crop_s, images = best_cpu(lambda: [(resample_image(v["image"], b), resample_depth(v["depth"], b))
                                       for v, b in zip(loaded, boxes)])
    jitter_s, jittered = best_cpu(lambda: [color_jitter(image, np.random.default_rng(1)) for image, _ in images])
    crops = [{"image": j, "depth": d, "intrinsics": crop_intrinsics(v["intrinsics"], b), "cam2world": v["cam2world"],
              "masked": 0, "name": v["name"]} for (_, d), j, v, b in zip(images, jittered, loaded, boxes)]
    assemble_s, _ = best_cpu(lambda: assemble(crops, scene.name))
    return {key: value / views for key, value in
            (("read", read_s), ("crop", crop_s), ("jitter", jitter_s), ("assemble", assemble_s))}


def measure(path: Path, fmt: str, views: int, samples: int) -> dict:
    dataset = build_dataset([{"format": fmt, "path": str(path), "samples": samples}], views=views, size=512,
                            batch_size=1, seed=0, split="train")
    seconds, drawn = best_cpu(lambda: [dataset[i] for i in range(samples)])
    for sample in drawn:
        assert sample["pts3d"].isfinite().all() and sample["valid_mask"].float().mean() > 0.99
        assert sample["images"].shape[:2] == (views, 3) and sample["images"].shape[3] == 512
    rate = samples * views / seconds
    return {"format": fmt, "views_per_s_per_core": rate, "cpu_s_per_view": seconds / (samples * views),
            "stages_cpu_s_per_view": stages(load_scene(path, fmt), views),
            "resolutions": sorted({tuple(s["images"].shape[2:]) for s in drawn}),
            "workers_for_one_step": math.ceil(STEP_VIEWS / STEP_S / rate)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "train_data_cpu.json")
    parser.add_argument("--views", type=int, default=16, help="views per sample (and in each source scene)")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["1024x768", "1920x1440"], help="source images, W x H")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.sizes:
            w, h = (int(x) for x in text.split("x"))
            for fmt, suffix, label in (("folder", ".png", "folder, PNG + npy"), ("folder", ".jpg", "folder, JPEG + npy"),
                                       ("colmap", ".png", "COLMAP, PNG + .bin")):
                path = save_scene(source_scene((h, w), args.views, suffix), Path(tmp) / f"{text}{suffix}{fmt}", fmt)
                case = {"source": f"{w}x{h}", "files": label} | measure(path, fmt, args.views, args.samples)
                cases.append(case)
                print(f"{w}x{h} {label}: {case['views_per_s_per_core']:.0f} views/s per core "
                      f"({', '.join(f'{k} {v * 1e3:.1f} ms' for k, v in case['stages_cpu_s_per_view'].items())}); "
                      f"{case['workers_for_one_step']} worker(s) for {STEP_VIEWS} views/s")
    slowest = min(c["views_per_s_per_core"] for c in cases)
    result = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "views_per_sample": args.views, "size": 512,
              "gpu_step": {"seconds": STEP_S, "views": STEP_VIEWS, "source": "shared/TRAINING.md (H200, large model, "
                           "triton backend, bf16, 512x384)"},
              "cases": cases,
              "workers_needed": {"slowest_views_per_s_per_core": slowest,
                                 "workers": math.ceil(STEP_VIEWS / STEP_S / slowest),
                                 "recommended": math.ceil(STEP_VIEWS / STEP_S / slowest) + 1}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    need = result["workers_needed"]
    print(f"slowest case {slowest:.0f} views/s per core: {STEP_VIEWS} views per {STEP_S:.2f} s step need "
          f"{need['workers']} worker(s); use {need['recommended']}. wrote {args.out}")


if __name__ == "__main__":
    main()
