"""Time each fused kernel against the stock PyTorch ops, in one run, on one GPU.

Writes ``benchmarks/results/kernels_<gpu>.json`` (a list of records with ``kernel``,
``shape``, ``impl``, ``ms`` and ``tflops`` or ``gbs``) plus the measured ceilings, then
prints the table that README.md shows (``--table`` rebuilds it from a JSON file).
``--sweep`` also times alternative block configurations and records them as
``impl: "ours[config]"``, which is how the defaults in the launchers were chosen.

Shapes are those of Fast3R on 1500 views (SPEC.md): encoder attention 1500 x 196 tokens
(224 px) and 256 x 768 (512 x 384 px), fusion attention over 16k .. 294k tokens, 16 heads
of 64; LayerNorm over 294k x 1024; patch embedding of 1500 images of 224 x 224.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import gpu_name, measure_ceilings, median_ms

from fast3r.backends import Rope, rotate_rope
from fast3r_kernels.attention import attention_backward, attention_forward, rope_tables
from fast3r_kernels.layernorm import layer_norm_backward, layer_norm_forward
from fast3r_kernels.patch_embed import patch_embed_forward, patch_positions

RESULTS = Path(__file__).resolve().parent / "results"
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}
ATTENTION_SHAPES = {  # name: (batch, heads, tokens)
    "encoder_224": (1500, 16, 196),
    "encoder_512": (256, 16, 768),
    "fusion_16k": (1, 16, 16384),
    "fusion_64k": (1, 16, 65536),
    "fusion_294k": (1, 16, 294000),
}
HEAD_DIM = 64
WRONG_ERROR = 2e-2  # relative error against the PyTorch output that marks a record as a wrong result
# Sweeps (configurations that compile without spills for sm_90: benchmarks/compile_report.py).
# Round 1 swept 24 tile shapes; round 2 keeps the best few and adds the softmax options.
# Round 3 sweep. Lazy rescaling and an FMA share of exp2 (round 2) and Triton's warp specialization
# (round 3: wrong results and 2-4x slower) were removed; benchmarks/NOTES.md has the numbers.
FUSION_SWEEP = [
    {"BLOCK_M": 64, "BLOCK_N": bn, "num_warps": 4, "num_stages": st} for bn in (64, 128) for st in (2, 3)
]
ENCODER_SWEEP = [
    {"BLOCK_M": bm, "BLOCK_N": 64, "num_warps": w, "num_stages": st} for bm, w, st in ((64, 4, 3), (64, 4, 2), (128, 4, 3))
]
ROPE_SWEEP = [
    {"BLOCK_M": bm, "BLOCK_N": 64, "num_warps": w, "num_stages": st}
    for bm, w, st in ((256, 8, 3), (256, 16, 2), (128, 8, 3))
]
BWD_SWEEP = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
    for bm in (32, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3)
    if bm * bn <= 128 * 64
]
LN_SWEEP = [{"rows": r, "num_warps": w} for r in (2, 4, 8) for w in (4, 8, 16) if r * 1024 // (w * 32) >= 4]
LN_BWD_SWEEP = [{"rows": r, "num_warps": w, "rows_per_program": rpp}
                for r in (4, 8) for w in (4, 8) for rpp in (32, 64, 128, 256, 512)]
PATCH_SWEEP = [{"BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_K": 64, "num_warps": 8, "num_stages": st}
               for bm, bd in ((128, 256), (128, 128)) for st in (3, 4, 5)]


class Recorder:
    """Collects benchmark records; every measurement is checked against a reference output."""

    def __init__(self):
        self.records: list[dict] = []

    def measure(self, kernel: str, shape: str, impl: str, fn: Callable[[], object], *, flop: float = 0,
                bytes_moved: float = 0, ref: object = None, config: dict | None = None) -> object:
        """Time ``fn`` (median ms) and record its rate and error against ``ref``; failures become records."""
        try:
            out = fn()
            error = max_rel_err(out, ref) if ref is not None else None
            ms = median_ms(fn)
        except Exception as err:  # noqa: BLE001 - an unsupported backend, OOM or a config that does not compile
            torch.cuda.empty_cache()
            self.records.append({"kernel": kernel, "shape": shape, "impl": impl, "config": config,
                                 "error": str(err).strip().splitlines()[0][:300]})
            print(f"{kernel} {shape} {impl} {config}: FAILED {self.records[-1]['error']}", flush=True)
            return None
        rec = {"kernel": kernel, "shape": shape, "impl": impl, "ms": round(ms, 5)}
        if flop:
            rec["tflops"] = round(flop / ms / 1e9, 2)
        if bytes_moved:
            rec["gbs"] = round(bytes_moved / ms / 1e6, 1)
        if error is not None:
            rec["max_rel_err"] = float(f"{error:.3g}")
        if config:
            rec["config"] = config
        self.records.append(rec)
        print(json.dumps(rec), flush=True)
        return out


def max_rel_err(got, ref) -> float:
    """Largest ||got - ref|| / ||ref|| over paired tensors (tuples are compared element-wise)."""
    if isinstance(got, (tuple, list)):
        return max(max_rel_err(g, r) for g, r in zip(got, ref) if g is not None)
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def impl_name(base: str, cfg: dict | None) -> str:
    return base if cfg is None else f"{base}[sweep]"


# ------------------------------------------------------------------- attention
def packed_qkv(b: int, h: int, l: int) -> torch.Tensor:
    return torch.randn(b, l, 3, h, HEAD_DIM, device="cuda", dtype=torch.bfloat16)


def sdpa(q, k, v, backend: str, scale: float):
    with sdpa_kernel(SDPA_BACKENDS[backend]):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def bench_attention_forward(rec: Recorder, sweep: bool) -> None:
    for b, h, l in ATTENTION_SHAPES.values():
        if not sweep:
            configs = []
        elif l < 4096:
            configs = ENCODER_SWEEP
        else:
            configs = FUSION_SWEEP
        attention_forward_shape(rec, b, h, l, configs)
        torch.cuda.empty_cache()


def attention_forward_shape(rec: Recorder, b: int, h: int, l: int, configs: list[dict]) -> None:
    qkv = packed_qkv(b, h, l)
    q, k, v = qkv.unbind(2)  # BLHD views, as the model produces them
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # SDPA's own layout
    flop, shape, scale = 4 * b * h * l * l * HEAD_DIM, f"{b}x{h}x{l}x{HEAD_DIM}", HEAD_DIM**-0.5
    ref = None
    for backend in SDPA_BACKENDS:
        out = rec.measure("attention_fwd", shape, f"torch_{backend}", lambda be=backend: sdpa(qh, kh, vh, be, scale),
                          flop=flop)
        ref = out.transpose(1, 2) if ref is None and out is not None else ref
    for cfg in [None, *configs]:
        rec.measure("attention_fwd", shape, impl_name("ours", cfg),
                    lambda c=cfg: attention_forward(q, k, v, scale, "BLHD", **(c or {}))[0],
                    flop=flop, ref=ref, config=cfg)


def bench_attention_rope(rec: Recorder, sweep: bool) -> None:
    """Encoder attention with RoPE-2D: fused kernel vs the official path (transpose, RoPE, SDPA, transpose)."""
    attention_rope_shape(rec, *ATTENTION_SHAPES["encoder_224"], (14, 14), sweep)
    attention_rope_shape(rec, *ATTENTION_SHAPES["encoder_512"], (24, 32), sweep)


def attention_rope_shape(rec: Recorder, b: int, h: int, l: int, grid: tuple[int, int], sweep: bool) -> None:
    qkv = packed_qkv(b, h, l)
    pos = patch_positions(*grid, "cuda").expand(b, -1, -1)
    flop, shape, scale = 4 * b * h * l * l * HEAD_DIM, f"{b}x{h}x{l}x{HEAD_DIM}+rope", HEAD_DIM**-0.5
    rope = Rope(pos, max(grid), 100.0)

    def official(backend: str):
        qh, kh, vh = qkv.transpose(1, 3).unbind(2)
        out = sdpa(rotate_rope(qh, rope), rotate_rope(kh, rope), vh, backend, scale)
        return out.transpose(1, 2).reshape(b, l, h * HEAD_DIM)

    ref = None
    for backend in ("flash", "cudnn"):
        out = rec.measure("attention_fwd_rope", shape, f"official_path_{backend}", lambda be=backend: official(be),
                          flop=flop)
        ref = out if ref is None else ref
    q, k, v = qkv.unbind(2)
    tables = (pos, *rope_tables(max(grid), HEAD_DIM, 100.0, pos.device))
    for cfg in [None] + (ROPE_SWEEP if sweep else []):
        rec.measure("attention_fwd_rope", shape, impl_name("ours", cfg),
                    lambda c=cfg: attention_forward(q, k, v, scale, "BLHD", tables, **(c or {}))[0].view(b, l, -1),
                    flop=flop, ref=ref, config=cfg)


def bench_attention_backward(rec: Recorder, sweep: bool) -> None:
    b, h, l = ATTENTION_SHAPES["fusion_16k"]
    shape, flop, scale = f"{b}x{h}x{l}x{HEAD_DIM}", 2.5 * 4 * b * h * l * l * HEAD_DIM, HEAD_DIM**-0.5
    leaves = [torch.randn(b, h, l, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for _ in range(3)]
    do = torch.randn(b, h, l, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    ref = None
    for backend in SDPA_BACKENDS:
        try:
            out = sdpa(*leaves, backend, scale)
        except RuntimeError as err:
            rec.records.append({"kernel": "attention_bwd", "impl": f"torch_{backend}", "error": str(err)[:300]})
            continue
        grads = rec.measure("attention_bwd", shape, f"torch_{backend}",
                            lambda o=out: torch.autograd.grad(o, leaves, do, retain_graph=True), flop=flop)
        ref = grads if ref is None else ref
    q, k, v = (t.detach() for t in leaves)
    out, lse = attention_forward(q, k, v, scale, "BHLD", return_lse=True)
    for cfg in [None] + (BWD_SWEEP if sweep else []):
        rec.measure("attention_bwd", shape, impl_name("ours", cfg),
                    lambda c=cfg: attention_backward(do, q, k, v, out, lse, scale, "BHLD", **(c or {})),
                    flop=flop, ref=ref, config=cfg)


# ------------------------------------------------------------------- LayerNorm
LN_ROWS, LN_WIDTH = 294000, 1024


def bench_layer_norm(rec: Recorder, sweep: bool) -> None:
    layer_norm_forward_dtype(rec, torch.bfloat16, sweep)
    layer_norm_forward_dtype(rec, torch.float32, False)
    add_layer_norm(rec)
    layer_norm_backward_bf16(rec, sweep)


def layer_norm_forward_dtype(rec: Recorder, dtype: torch.dtype, sweep: bool) -> None:
    n, shape = LN_WIDTH, f"{LN_ROWS}x{LN_WIDTH}"
    x = torch.randn(LN_ROWS, n, device="cuda", dtype=dtype)
    w, bias = torch.randn(n, device="cuda", dtype=dtype), torch.randn(n, device="cuda", dtype=dtype)
    kernel, moved = "layer_norm_fwd" + ("" if dtype == torch.bfloat16 else "_fp32"), 2 * x.nbytes
    ref = rec.measure(kernel, shape, "torch", lambda: F.layer_norm(x, (n,), w, bias, 1e-6), bytes_moved=moved)
    for cfg in [None] + (LN_SWEEP if sweep else []):
        rec.measure(kernel, shape, impl_name("ours", cfg),
                    lambda c=cfg: layer_norm_forward(x, w, bias, 1e-6, **(c or {}))[0],
                    bytes_moved=moved, ref=ref, config=cfg)


def add_layer_norm(rec: Recorder) -> None:
    n, shape = LN_WIDTH, f"{LN_ROWS}x{LN_WIDTH}"
    x, res = (torch.randn(LN_ROWS, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w, bias = torch.randn(n, device="cuda", dtype=torch.bfloat16), torch.randn(n, device="cuda", dtype=torch.bfloat16)

    def eager():
        s = x + res
        return F.layer_norm(s, (n,), w, bias, 1e-6), s

    moved = 4 * x.nbytes  # the minimum: read x and residual, write the sum and the norm
    ref = rec.measure("add_layer_norm_fwd", shape, "torch_eager", eager, bytes_moved=moved)
    rec.measure("add_layer_norm_fwd", shape, "ours", lambda: layer_norm_forward(x, w, bias, 1e-6, res)[:2],
                bytes_moved=moved, ref=ref)


def layer_norm_backward_bf16(rec: Recorder, sweep: bool) -> None:
    n, shape = LN_WIDTH, f"{LN_ROWS}x{LN_WIDTH}"
    x, dy = (torch.randn(LN_ROWS, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w, bias = torch.randn(n, device="cuda", dtype=torch.bfloat16), torch.randn(n, device="cuda", dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
    out = F.layer_norm(*leaves[:1], (n,), *leaves[1:], 1e-6)
    moved = 3 * x.nbytes  # read x and dy, write dx
    ref = rec.measure("layer_norm_bwd", shape, "torch", lambda: torch.autograd.grad(out, leaves, dy, retain_graph=True),
                      bytes_moved=moved)
    _, _, mean, rstd = layer_norm_forward(x, w, bias, 1e-6)
    for cfg in [None] + (LN_BWD_SWEEP if sweep else []):
        rec.measure("layer_norm_bwd", shape, impl_name("ours", cfg),
                    lambda c=cfg: layer_norm_backward(dy, x, w, mean, rstd, **(c or {})),
                    bytes_moved=moved, ref=ref, config=cfg)


# ------------------------------------------------------------- patch embedding
def bench_patch_embed(rec: Recorder, sweep: bool) -> None:
    n, size, p, d = 1500, 224, 16, 1024
    shape = f"{n}x3x{size}x{size}->{d}"
    flop = 2 * n * (size // p) ** 2 * 3 * p * p * d
    w = torch.randn(d, 3, p, p, device="cuda", dtype=torch.bfloat16) / 28
    b = torch.randn(d, device="cuda", dtype=torch.bfloat16)
    images = torch.rand(n, 3, size, size, device="cuda", dtype=torch.bfloat16) * 2 - 1
    u8 = torch.randint(0, 256, (n, 3, size, size), device="cuda", dtype=torch.uint8)

    def conv():
        return F.conv2d(images, w, b, stride=p).flatten(2).transpose(1, 2).contiguous()

    def matmul():
        patches = images.view(n, 3, size // p, p, size // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3 * p * p)
        return torch.addmm(b, patches, w.view(d, -1).t()).view(n, -1, d)

    ref = rec.measure("patch_embed", shape, "torch_conv2d", conv, flop=flop)
    rec.measure("patch_embed", shape, "torch_reshape_matmul", matmul, flop=flop, ref=ref)
    ref_u8 = F.conv2d(u8.to(torch.bfloat16) / 127.5 - 1, w, b, stride=p).flatten(2).transpose(1, 2)
    for cfg in [None] + (PATCH_SWEEP if sweep else []):
        rec.measure("patch_embed", shape, impl_name("ours_bf16", cfg),
                    lambda c=cfg: patch_embed_forward(images, w, b, p, **(c or {})), flop=flop, ref=ref, config=cfg)
        rec.measure("patch_embed", shape, impl_name("ours_uint8", cfg),
                    lambda c=cfg: patch_embed_forward(u8, w, b, p, **(c or {})), flop=flop, ref=ref_u8, config=cfg)


BENCHES = {"attention": bench_attention_forward, "attention_rope": bench_attention_rope,
           "attention_bwd": bench_attention_backward, "layer_norm": bench_layer_norm,
           "patch_embed": bench_patch_embed}


# ----------------------------------------------------------------------- table
def table(doc: dict) -> str:
    """Markdown table: our best default record per (kernel, shape) against every torch impl."""
    ceilings = doc["ceilings"]
    rows = ["| kernel | shape | ours | torch (same run) | ours / torch | of ceiling |", "|---|---|---|---|---|---|"]
    recs = [r for r in doc["records"] if "ms" in r and "[sweep]" not in r["impl"]]
    keys = dict.fromkeys((r["kernel"], r["shape"]) for r in recs)
    for kernel, shape in keys:
        group = [r for r in recs if (r["kernel"], r["shape"]) == (kernel, shape)]
        for mine in (r for r in group if r["impl"].startswith("ours")):
            unit = "tflops" if "tflops" in mine else "gbs"
            ceiling = ceilings["matmul_bf16_tflops"] if unit == "tflops" else ceilings["copy_gbs"]
            others = [r for r in group if not r["impl"].startswith("ours")]
            rate = f"{mine[unit]:.0f} {'TFLOP/s' if unit == 'tflops' else 'GB/s'} ({mine['ms']:.3g} ms)"
            torch_rates = ", ".join(f"{r['impl']} {r[unit]:.0f}" for r in others)
            ratios = ", ".join(f"{r['ms'] / mine['ms']:.2f}x {r['impl'].removeprefix('torch_')}" for r in others)
            rows.append(f"| {kernel} | {shape} | {mine['impl']}: {rate} | {torch_rates} | {ratios} | "
                        f"{mine[unit] / ceiling:.0%} |")
    wrong = [r for r in doc["records"] if r.get("max_rel_err", 0) > WRONG_ERROR]
    rows += [f"\nWRONG RESULT (error {r['max_rel_err']}): {r['kernel']} {r['shape']} {r['impl']} {r.get('config')}"
             for r in wrong]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="benchmarks to run (default: all)")
    parser.add_argument("--sweep", action="store_true", help="also time alternative block configurations")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/kernels_<gpu>.json)")
    parser.add_argument("--table", type=Path, help="print the table of an existing JSON file and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py times CUDA kernels: run it on a GPU (see benchmarks/gpu_check.py)")
    torch.manual_seed(0)
    rec = Recorder()
    doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "ceilings": measure_ceilings()}
    print(json.dumps(doc), flush=True)
    for name in args.only or BENCHES:
        BENCHES[name](rec, args.sweep)
    doc["records"] = rec.records
    out = args.out or RESULTS / f"kernels_{gpu_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(table(doc))


if __name__ == "__main__":
    main()
