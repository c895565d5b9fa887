"""What peak each memory target implies, by arithmetic (fast3r.memory.plan_bytes), before any GPU run.

    python benchmarks/memory_plan.py [--out benchmarks/results/memory_plan.json]

For each scene of issue 17 (large preset, bf16, uint8 images on the GPU as scale_views.py puts them,
outputs to the CPU): the token buffer T = tokens x 1024 x 2 bytes, the weights and the images, then per
plan the bytes of each stage at its peak (encoder: the tokens of every view + one encoder chunk; fusion:
fast 10 T, lean x + K + V = 3 T + one query chunk's transients; heads: fast 4 hook layers + one head
chunk, lean one head chunk and its hook rows twice) and the peak against the target. The lean query
chunk is the H200's (132 SMs: 65,472 queries); MLP bands of 16,384 tokens. Writes JSON, prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fast3r import Fast3R, Fast3RConfig, memory
from fast3r.layers import InPlace

RESULTS = Path(__file__).resolve().parent / "results"
H200_SMS = 132
# name, views, (H, W), target GiB (None: today's measured point, for checking the arithmetic)
SCENES = [
    ("1500 views @224", 1500, (224, 224), 4.0),
    ("1500 views @512x384", 1500, (384, 512), 12.0),
    ("2000 views @512x384, capped at 24 GB", 2000, (384, 512), 24e9 / 2**30),
    ("5000 views @512x384", 5000, (384, 512), 40.0),
    ("10,000 views @224", 10_000, (224, 224), 24.0),
    ("1000 views @512x384 (measured fast: 16.45 GiB)", 1000, (384, 512), None),
]


def plan(cfg: Fast3RConfig, weights: int, views: int, hw: tuple[int, int], target: float | None) -> dict:
    h, w = hw
    patch = cfg.patch_size
    tokens = (h // patch) * (w // patch)
    work = memory.Workload(batch=1, views=views, tokens=views * tokens, view_tokens=tokens, view_pixels=h * w,
                           elem_bytes=2, outputs_on_device=False)
    chunk_unit = memory.WAVE_PROGRAMS_PER_SM * H200_SMS * memory.QUERY_TILE // cfg.fusion_heads
    chunks = InPlace(queries=round(memory.LEAN_QUERY_TOKENS / chunk_unit) * chunk_unit, mlp=memory.LEAN_MLP_TOKENS)
    images = views * 3 * h * w
    gib = 2**30
    row = {"views": views, "image_hw": list(hw), "tokens": views * tokens,
           "token_buffer_gib": views * tokens * cfg.fusion_dim * 2 / gib, "weights_gib": weights / gib,
           "images_gib": images / gib, "lean_query_chunk": chunks.queries, "target_gib": target}
    for mode in ("fast", "lean"):
        stages = memory.plan_bytes(cfg, mode, work, chunks)
        row[mode] = {stage: (b + weights + images) / gib for stage, b in stages.items()}
        row[mode]["peak"] = max(row[mode].values())
    row["lean_meets_target"] = None if target is None else row["lean"]["peak"] <= target
    return row


def table(rows: list[dict]) -> str:
    lines = [("| scene | T GiB | weights + images | fast: encoder / fusion / heads = peak | "
              "lean: encoder / fusion / heads = peak | target |"), "|---|---|---|---|---|---|"]
    for name, r in zip((s[0] for s in SCENES), rows):
        cells = []
        for mode in ("fast", "lean"):
            p = r[mode]
            cells.append(f"{p['encoder']:.2f} / {p['fusion']:.2f} / {p['heads']:.2f} = **{p['peak']:.2f}**")
        verdict = "met" if r["lean_meets_target"] else "MISSED"
        target = "-" if r["target_gib"] is None else f"<= {r['target_gib']:.2f} ({verdict})"
        lines.append(f"| {name} | {r['token_buffer_gib']:.3f} | {r['weights_gib']:.2f} + {r['images_gib']:.2f} | "
                     f"{cells[0]} | {cells[1]} | {target} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "memory_plan.json")
    args = parser.parse_args()
    cfg = Fast3RConfig.preset("large")
    with torch.device("meta"):
        weights = sum(p.numel() for p in Fast3R(cfg).parameters()) * 2
    rows = [plan(cfg, weights, views, hw, target) for _, views, hw, target in SCENES]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": "large", "dtype": "bfloat16", "outputs_to_cpu": True,
                                    "images_on_gpu": True, "gpu_sms": H200_SMS,
                                    "scenes": [{"scene": s[0], **r} for s, r in zip(SCENES, rows)]}, indent=1))
    print(table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
