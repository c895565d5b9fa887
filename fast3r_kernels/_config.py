"""Where kernels may run, input checks shared by the launchers, and the dtype-dependent dot/cast helpers."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@torch.compiler.assume_constant_result  # read once per compile: Dynamo cannot trace Triton's knob lookup
def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels then run (slowly) on CPU tensors, for testing."""
    return bool(triton.knobs.runtime.interpret)


def check_device(name: str, tensor: torch.Tensor, device: torch.device | None = None) -> None:
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the other inputs are on {device}; move them together")
    if tensor.device.type == "cuda" or (tensor.device.type == "cpu" and interpreting()):
        return
    raise ValueError(
        f"{name} is on {tensor.device}: fast3r_kernels runs on CUDA GPUs, or on the CPU only under "
        "TRITON_INTERPRET=1 (slow; for tests). Move the tensors to a GPU or use the PyTorch op."
    )


def check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; supported: bfloat16, float16, float32")


def precision(dtype: torch.dtype) -> str:
    """How kernels on ``dtype`` tiles multiply and round; see ``mma`` and ``cast``."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpreting():
        return "interpret_bf16"
    return "native"


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    "native": tensor-core bf16/fp16. "ieee": true fp32 products (no tf32) for fp32
    inputs. "interpret_bf16": bf16 operands widened to fp32 first; only under
    TRITON_INTERPRET, whose dot multiplies raw bf16 bits (triton-lang/triton#11584).
    bf16 products are exact in fp32, so this computes what the tensor cores compute.
    """
    if PRECISION == "native":
        return tl.dot(a, b, acc)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def cast(x, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """x.to(dtype), rounding to nearest even as the GPU does.

    The interpreter truncates fp32 -> bf16; under "interpret_bf16" the fp32 bits are
    rounded to nearest even first, so CPU tests see GPU rounding.
    """
    if PRECISION == "interpret_bf16" and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while launching: Triton launches on the current CUDA device, not the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would compute in on ``device`` right now, or None when autocast is off there."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def traced(t: torch.Tensor) -> bool:
    """True for the fake / functional tensors torch.compile and torch.export trace the ops with."""
    return isinstance(t, (FakeTensor, FunctionalTensor))


def runs_kernels(t: torch.Tensor) -> bool:
    """Whether an op launches the kernels for t: on CUDA, and on real CPU tensors under TRITON_INTERPRET.

    On the CPU a traced tensor takes the op's PyTorch reference instead, so ``torch.compile``
    compiles the ops on a CPU too (Inductor cannot launch Triton kernels there).
    """
    return t.is_cuda or (interpreting() and not traced(t))


def launching(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context of a launcher's ``wrap_triton(kernel)[grid](...)`` calls.

    Traced (inside torch.compile / export), ``wrap_triton`` records each launch in the graph;
    on real tensors the kernels launch directly (wrap_triton's dispatch would add ~0.1-1 ms
    of host time per launch, which small scenes cannot afford), also when a launcher is
    called outside the op (the layers' inference path, benchmarks).
    """
    return contextlib.nullcontext() if traced(t) else set_wrap_triton_enabled(False)
