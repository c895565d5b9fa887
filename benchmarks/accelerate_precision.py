"""Where accelerate()'s error on the official model in fp32 comes from: one swapped module kind at a time.

    python benchmarks/accelerate_precision.py --peers .peers --views 16 --out results/accelerate_precision.json

Runs the OFFICIAL model (its own package, also named ``fast3r``: this process imports it, and only
``fast3r_kernels`` of ours) on the GPU in fp32 with random perturbed weights, and compares each variant's
outputs with an exact fp32 forward (attention in fp32, TF32 off in matmuls and convolutions), as max |error| /
max |exact| per output: the official demo path (bf16 attention inside its blocks), accelerate() with every
kernel, and with only attention, only LayerNorm, only the patch embedding. One JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("pts3d_in_other_view", "pts3d_local", "conf", "conf_local")


@contextlib.contextmanager
def exact_fp32(blocks_module):
    """The official blocks' bf16 autocast turned off, and no TF32 anywhere: the reference forward."""
    real, real_backends = blocks_module.torch.autocast, torch.nn.attention.sdpa_kernel
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    blocks_module.torch.autocast = lambda *a, **k: contextlib.nullcontext()
    torch.nn.attention.sdpa_kernel = lambda *a, **k: contextlib.nullcontext()  # flash has no fp32 kernel
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        blocks_module.torch.autocast, torch.nn.attention.sdpa_kernel = real, real_backends
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=Path, required=True, help="a copy of shared/peers")
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path[:0] = [str(args.peers), str(args.peers / "fast3r-official"), str(ROOT)]
    import fast3r.croco.models.blocks as official_blocks  # the OFFICIAL package
    import run_official  # the peers' builder of the official model

    from fast3r_kernels import accelerate

    torch.manual_seed(0)
    model, _ = run_official.build("large")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.02)
    model = model.cuda().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(args.views, 1, 3, args.size, args.size, generator=g) * 2 - 1).cuda()
    views = [{"img": images[i], "true_shape": torch.tensor([[args.size, args.size]], device="cuda")}
             for i in range(args.views)]

    def forward(m) -> list[dict]:
        with torch.no_grad():
            return [{k: v.float() for k, v in p.items() if k in OUTPUTS} for p in m(views)]

    with exact_fp32(official_blocks):
        exact = forward(model)

    def errors(preds) -> dict[str, float]:
        return {k: max(((p[k] - e[k]).abs().max() / e[k].abs().max()).item() for p, e in zip(preds, exact))
                for k in OUTPUTS}

    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "views": args.views,
              "size": args.size, "variants": {}}
    report["variants"]["official demo (bf16 attention in blocks)"] = errors(forward(model))
    variants = {"accelerate: all": {}, "accelerate: attention only": {"layer_norm": False, "patch_embed": False},
                "accelerate: layer_norm only": {"attention": False, "patch_embed": False},
                "accelerate: patch_embed only": {"attention": False, "layer_norm": False}}
    for name, flags in variants.items():
        fresh, _ = run_official.build("large")
        fresh.load_state_dict(state)
        fresh = accelerate(fresh.cuda().eval(), **flags)
        report["variants"][name] = errors(forward(fresh))
        with exact_fp32(official_blocks):
            report["variants"][name + ", TF32 off"] = errors(forward(fresh))
        del fresh
        torch.cuda.empty_cache()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
