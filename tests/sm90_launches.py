"""Compile, for sm_90, exactly what the launchers would launch, and report each kernel's shared memory.

    python tests/sm90_launches.py   # one JSON line per launch; run by tests/test_tuning.py

Runs on any machine (no GPU): the launchers are called on small CPU tensors, and every
``kernel[grid](...)`` they make is captured instead of launched, turned into a Triton
signature (tensors -> pointers, tensor descriptors -> block types, None -> constexpr) and
compiled for Hopper. The interpreter does not model shared memory, so this is how CI
catches a block configuration that cannot launch on the GPU (fp32 tiles are twice as large).
Must run without TRITON_INTERPRET (the kernels have to be JIT functions).
"""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

attention = importlib.import_module("fast3r_kernels.attention")  # the module; the package exports the function
layernorm = importlib.import_module("fast3r_kernels.layernorm")
patch_embed = importlib.import_module("fast3r_kernels.patch_embed")
upsample = importlib.import_module("fast3r_kernels.upsample")

HOPPER = GPUTarget("cuda", 90, 32)
H100_SHARED_MEMORY = 232448  # bytes per block, the limit the launch reported on the H100
TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
              torch.int32: "i32", torch.uint8: "u8"}


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPE_NAMES[value.dtype]
    if isinstance(value, TensorDescriptor):
        return f"tensordesc<{TYPE_NAMES[value.base.dtype]}[{','.join(map(str, value.block_shape))}]>"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value)}")


@functools.cache
def _compile(kernel: JITFunction, signature: tuple, constexprs: tuple, attrs: tuple, options: tuple):
    return triton.compile(ASTSource(fn=kernel, signature=dict(signature), constexprs=dict(constexprs),
                                    attrs=dict(attrs)), target=HOPPER, options=dict(options))


def compile_launch(kernel: JITFunction, args: tuple, kwargs: dict) -> dict:
    params = [p.name for p in kernel.params]
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    options = {k: v for k, v in kwargs.items() if k not in params}
    # As the launcher specializes: None and ints equal to 1 become constants; 16-byte-aligned pointers and
    # ints divisible by 16 get the divisibility hint (it decides vectorized, pipelined loads, so shared memory).
    constexprs = {p.name: bound[p.name] for p in kernel.params
                  if p.is_constexpr or bound[p.name] is None or (type(bound[p.name]) is int and bound[p.name] == 1)}
    signature = {name: "constexpr" if name in constexprs else _type(bound[name]) for name in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(params) if name not in constexprs and (
        (isinstance(bound[name], torch.Tensor) and bound[name].data_ptr() % 16 == 0)
        or (type(bound[name]) is int and bound[name] % 16 == 0))}
    compiled = _compile(kernel, tuple(signature.items()), tuple(constexprs.items()),
                        tuple((k, tuple(map(tuple, v))) for k, v in attrs.items()), tuple(options.items()))
    shown = {k: v for k, v in constexprs.items() if isinstance(v, (int, str)) and not isinstance(v, bool)}
    return {"kernel": kernel.__name__, "shared": compiled.metadata.shared, "config": {**shown, **options}}


def captured(launcher, *args, **kwargs) -> list[dict]:
    """Call a launcher with kernel launches captured, and compile each of them for sm_90."""
    launches = []
    real_getitem = JITFunction.__getitem__
    JITFunction.__getitem__ = lambda self, grid: lambda *a, **k: launches.append((self, a, k))
    try:
        launcher(*args, **kwargs)
    finally:
        JITFunction.__getitem__ = real_getitem
    return [compile_launch(*launch) for launch in launches]


def cases():
    """(case name, launcher, args): the model's shapes in every dtype, head dim and option."""
    for dtype, d, rope, keys in itertools.product((torch.float32, torch.float16, torch.bfloat16), attention.HEAD_DIMS,
                                                  (False, True), (196, 40_000)):
        if rope and (d not in attention.ROPE_HEAD_DIMS or keys > 1000):
            continue
        q, k, v = (torch.randn(1, keys, 2, d, dtype=dtype) for _ in range(3))
        tables = (torch.zeros(1, keys, 2, dtype=torch.int64), *attention.rope_tables(16, d, 100.0, q.device)) \
            if rope else None
        name = f"attention {dtype} D={d} rope={rope} keys={keys}"
        yield f"{name} fwd", attention.attention_forward, (q, k, v, 0.125, "BLHD", tables, True)
        out, lse = torch.randn_like(q), torch.randn(1, 2, keys)
        yield f"{name} bwd", attention.attention_backward, (torch.randn_like(q), q, k, v, out, lse, 0.125, "BLHD",
                                                             tables)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w, b = torch.randn(1024, 3, 16, 16, dtype=dtype), torch.randn(1024, dtype=dtype)
        for images in (torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8), torch.randn(2, 3, 32, 48,
                                                                                            dtype=dtype)):
            yield (f"patch_embed {dtype} images={images.dtype}", patch_embed.patch_embed_forward, (images, w, b, 16))
            yield (f"patch_embed bwd {dtype} images={images.dtype}", patch_embed.patch_embed_backward_weight,
                   (torch.randn(2, 6, 1024, dtype=dtype), images, 16))
        x, lw, lb = torch.randn(8, 1024, dtype=dtype), torch.randn(1024, dtype=dtype), torch.randn(1024, dtype=dtype)
        yield f"layer_norm {dtype}", layernorm.layer_norm_forward, (x, lw, lb, 1e-6, torch.randn_like(x))
        stats = torch.randn(8), torch.rand(8)
        yield f"layer_norm bwd {dtype}", layernorm.layer_norm_backward, (torch.randn_like(x), x, lw, *stats,
                                                                         torch.randn_like(x))
        maps = torch.randn(2, 256, 7, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
        yield f"upsample {dtype}", upsample.upsample_forward, (maps, (14, 14))
        yield f"upsample bwd {dtype}", upsample.upsample_backward, (torch.randn(2, 256, 14, 14, dtype=dtype), (7, 7))


def main() -> None:
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("run without TRITON_INTERPRET: the kernels must be JIT functions to compile for sm_90")
    for name, launcher, args in cases():
        for launch in captured(launcher, *args):
            print(json.dumps({"case": name, **launch, "limit": H100_SHARED_MEMORY}), flush=True)


if __name__ == "__main__":
    main()
