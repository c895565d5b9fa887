"""The environment report of ``python -m fast3r_kernels``: versions, devices, and a check of every kernel.

Each public kernel (attention with and without RoPE-2D, layer_norm with and without a
residual, patch_embed on uint8 and float images, upsample_bilinear) runs forward and backward on small random
inputs with ragged tails, and is compared with PyTorch in float64, on the first CUDA GPU,
or without one in Triton's interpreter. That answers "do the kernels work with this torch,
Triton, driver and GPU?" before a long run does. ``main`` returns 1 if any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable

import numpy
import torch
import torch.nn.functional as F
import triton

from . import versions
from ._config import interpreting
from .attention import attention, rope_tables
from .layernorm import layer_norm
from .patch_embed import normalize_uint8, patch_embed
from .upsample import upsample_bilinear

# ||kernel - float64 reference|| / ||reference||, per output and gradient; the kernel tests' bounds.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
ROPE_BASE = 100.0


@dataclasses.dataclass
class KernelCheck:
    """One kernel's result: ``error`` is the worst relative error, or the exception when it did not run."""

    name: str
    passed: bool
    dtype: str
    tolerance: float
    seconds: float
    error: float | None = None
    failure: str | None = None


@dataclasses.dataclass
class Case:
    """Inputs, the kernel call and its PyTorch reference; ``grads`` names the inputs gradients are checked for."""

    inputs: dict[str, torch.Tensor]
    kernel: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    reference: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    grads: tuple[str, ...]


def _rotate(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """RoPE-2D on (B, L, H, D): the first half of each head turns by the y position, the second by x."""
    cos, sin = (table.to(t.dtype) for table in rope_tables(int(pos.max()) + 1, t.shape[-1], ROPE_BASE, t.device))
    halves = []
    for axis, half in enumerate(t.chunk(2, dim=-1)):
        c, s = cos[pos[..., axis]][:, :, None], sin[pos[..., axis]][:, :, None]
        first, second = half.chunk(2, dim=-1)
        halves.append(torch.cat([first * c - second * s, second * c + first * s], dim=-1))
    return torch.cat(halves, dim=-1)


def _torch_attention(q, k, v, pos=None):
    if pos is not None:
        q, k = _rotate(q, pos), _rotate(k, pos)
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def _attention_case(device: torch.device, dtype: torch.dtype, rope: bool) -> Case:
    b, tokens, heads, d = 1, 77, 2, 64  # 77 tokens: a ragged last tile; a 7 x 11 patch grid for RoPE
    qkv = torch.randn(b, tokens, 3, heads, d, device=device, dtype=dtype)
    inputs = {"q": qkv[:, :, 0], "k": qkv[:, :, 1], "v": qkv[:, :, 2]}  # strided views, as the model passes
    if rope:
        grid = torch.stack(torch.meshgrid(torch.arange(7), torch.arange(11), indexing="ij"), -1).reshape(1, -1, 2)
        inputs["pos"] = grid.to(device)
    return Case(inputs, lambda q, k, v, pos=None: attention(q, k, v, rope_pos=pos, rope_base=ROPE_BASE),
                _torch_attention, ("q", "k", "v"))


def _layer_norm_case(device: torch.device, dtype: torch.dtype, residual: bool) -> Case:
    shape = (3, 50, 200)  # a row width that is not a power of two
    inputs = {"x": torch.randn(shape, device=device, dtype=dtype),
              "weight": 1 + 0.1 * torch.randn(shape[-1], device=device, dtype=dtype),
              "bias": 0.1 * torch.randn(shape[-1], device=device, dtype=dtype)}
    if residual:
        inputs["residual"] = torch.randn(shape, device=device, dtype=dtype)

    def reference(x, weight, bias, residual=None):
        total = x if residual is None else x + residual
        out = F.layer_norm(total, total.shape[-1:], weight, bias, eps=1e-6)
        return out if residual is None else (total, out)

    return Case(inputs, lambda x, weight, bias, residual=None: layer_norm(x, weight, bias, 1e-6, residual),
                reference, tuple(inputs))


def _patch_embed_case(device: torch.device, dtype: torch.dtype, uint8: bool) -> Case:
    n, height, width, p, channels = 2, 32, 48, 16, 72  # 72 channels: not a multiple of the channel tile
    images = (torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8) if uint8
              else torch.rand(n, 3, height, width) * 2 - 1)
    inputs = {"images": images.to(device) if uint8 else images.to(device, dtype),
              "weight": torch.randn(channels, 3, p, p, device=device, dtype=dtype) / (3 * p),
              "bias": torch.randn(channels, device=device, dtype=dtype)}

    def reference(images, weight, bias):
        pixels = normalize_uint8(images.to(weight.dtype)) if images.dtype == torch.uint8 else images
        return F.conv2d(pixels, weight, bias, stride=p).flatten(2).transpose(1, 2)

    return Case(inputs, lambda images, weight, bias: patch_embed(images, weight, bias, p), reference,
                ("weight", "bias"))


def _upsample_case(device: torch.device, dtype: torch.dtype) -> Case:
    maps = torch.randn(2, 72, 5, 7, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return Case({"x": maps}, lambda x: upsample_bilinear(x, scale_factor=2),
                lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True), ("x",))


CASES: dict[str, Callable[[torch.device, torch.dtype], Case]] = {
    "attention": lambda device, dtype: _attention_case(device, dtype, rope=False),
    "attention + RoPE-2D": lambda device, dtype: _attention_case(device, dtype, rope=True),
    "layer_norm": lambda device, dtype: _layer_norm_case(device, dtype, residual=False),
    "layer_norm + residual": lambda device, dtype: _layer_norm_case(device, dtype, residual=True),
    "patch_embed uint8": lambda device, dtype: _patch_embed_case(device, dtype, uint8=True),
    "patch_embed float": lambda device, dtype: _patch_embed_case(device, dtype, uint8=False),
    "upsample_bilinear": _upsample_case,
}


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    scale = ref.norm()
    diff = (got.double() - ref).norm()
    return (diff / scale).item() if scale > 0 else diff.item()


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def _worst_error(case: Case) -> float:
    """Forward outputs and the gradients of ``case.grads`` under one random upstream gradient, vs float64."""
    ours = {k: v.detach().requires_grad_(k in case.grads) for k, v in case.inputs.items()}
    ref = {k: v.detach().double().requires_grad_(k in case.grads) if v.is_floating_point() else v
           for k, v in case.inputs.items()}
    got, want = _outputs(case.kernel(**ours)), _outputs(case.reference(**ref))
    upstream = [torch.randn_like(w) for w in want]
    got_grads = torch.autograd.grad(got, [ours[k] for k in case.grads], [u.to(g.dtype) for u, g in zip(upstream, got)])
    want_grads = torch.autograd.grad(want, [ref[k] for k in case.grads], upstream)
    return max(_relative_error(g, w) for g, w in zip(got + got_grads, want + want_grads))


def check_kernel(name: str, device: torch.device, dtype: torch.dtype) -> KernelCheck:
    """Run one entry of CASES; any exception (a compile error, say) is a failed check carrying its message."""
    tolerance = TOLERANCE[dtype]
    start = time.perf_counter()
    try:
        error = _worst_error(CASES[name](device, dtype))  # .item() waits for the GPU: the time is complete
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the other checks
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return KernelCheck(name, False, str(dtype), tolerance, time.perf_counter() - start, failure=detail)
    passed = error <= tolerance
    failure = None if passed else f"relative error {error:.1e} is above the tolerance {tolerance:.0e}"
    return KernelCheck(name, passed, str(dtype), tolerance, time.perf_counter() - start, error, failure)


def kernel_device() -> torch.device:
    """Where the kernels run here: the current CUDA GPU, or the CPU under TRITON_INTERPRET=1."""
    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_dtype(device: torch.device) -> torch.dtype:
    """bfloat16, what the model runs in; float16 on GPUs without bfloat16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _nvml() -> dict:
    """Driver and per-GPU memory from NVML (nvidia-ml-py); ``available: False`` with the reason otherwise."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver, no library: the report says so
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    try:
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append({"index": i, "name": pynvml.nvmlDeviceGetName(handle),
                         "memory_used_gib": round(memory.used / 2**30, 2),
                         "memory_total_gib": round(memory.total / 2**30, 2)})
        return {"available": True, "driver": pynvml.nvmlSystemGetDriverVersion(),
                "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}", "gpus": gpus}
    finally:
        pynvml.nvmlShutdown()


def _gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    return [{"index": i, "name": torch.cuda.get_device_name(i),
             "compute_capability": "{}.{}".format(*torch.cuda.get_device_capability(i))}
            for i in range(torch.cuda.device_count())]


def collect() -> dict:
    """Everything the report shows, as JSON-ready data (the ``--json`` output)."""
    device = kernel_device()
    dtype = check_dtype(device)
    nvml = _nvml()
    checks = [check_kernel(name, device, dtype) for name in CASES]
    return {
        "python": {"version": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}"},
        "numpy": numpy.__version__,
        "torch": {"version": torch.__version__, "cuda_build": torch.version.cuda},
        "triton": {"version": triton.__version__, "tested": versions.is_tested(triton.__version__),
                   "tested_versions": list(versions.TESTED_TRITON)},
        "cuda": {"runtime": torch.version.cuda, "driver": nvml.get("cuda_driver"),
                 "available": torch.cuda.is_available()},
        "gpus": _gpus(),
        "nvml": nvml,
        "kernel_device": "cpu (Triton interpreter)" if device.type == "cpu" else str(device),
        "kernels": [dataclasses.asdict(check) for check in checks],
        "passed": all(check.passed for check in checks),
    }


def format_report(report: dict) -> str:
    """The human-readable report: one line per fact, one per kernel check (``passed`` or ``FAILED``)."""
    torch_info, triton_info, cuda = report["torch"], report["triton"], report["cuda"]
    tested = "tested" if triton_info["tested"] else f"UNTESTED; tested: {', '.join(triton_info['tested_versions'])}"
    gpus = "; ".join(f"{g['index']}: {g['name']} (compute capability {g['compute_capability']})"
                     for g in report["gpus"]) or "none"
    nvml = report["nvml"]
    if nvml["available"]:
        nvml_line = f"driver {nvml['driver']}; " + "; ".join(
            f"{g['index']}: {g['memory_used_gib']} / {g['memory_total_gib']} GiB used" for g in nvml["gpus"])
    else:
        nvml_line = f"unavailable ({nvml['reason']})"
    gpu_state = "a GPU is available" if cuda["available"] else "no GPU available to torch"
    build = f"CUDA {torch_info['cuda_build']}" if torch_info["cuda_build"] else "CPU-only"
    lines = [
        "fast3r_kernels environment",
        f"  python   {report['python']['version']} ({report['python']['platform']}), numpy {report['numpy']}",
        f"  torch    {torch_info['version']} ({build} build)",
        f"  triton   {triton_info['version']} ({tested})",
        f"  CUDA     runtime {cuda['runtime'] or 'none'}, driver {cuda['driver'] or 'none'}, {gpu_state}",
        f"  GPU      {gpus}",
        f"  NVML     {nvml_line}",
        f"kernels on {report['kernel_device']}, forward and backward against PyTorch in float64:",
    ]
    width = max(len(check["name"]) for check in report["kernels"])
    for check in report["kernels"]:
        if check["passed"]:
            lines.append(f"  {check['name']:<{width}}  passed  {check['dtype']}, relative error {check['error']:.1e} "
                         f"<= {check['tolerance']:.0e}, {check['seconds']:.1f} s")
        else:
            detail = check["failure"].replace("\n", "\n      ")
            lines.append(f"  {check['name']:<{width}}  FAILED  {check['dtype']}: {detail}")
    failed = sum(not check["passed"] for check in report["kernels"])
    total = len(report["kernels"])
    lines.append(f"all {total} kernel checks passed" if not failed else f"{failed} of {total} kernel checks FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the report (``--json``: as JSON); 1 when a kernel check fails, else 0."""
    parser = argparse.ArgumentParser(prog="python -m fast3r_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    sys.stdout.flush()
    return 0 if report["passed"] else 1
