"""Compile the kernels for sm_90 on any machine (no GPU needed) and report their resources.

    python benchmarks/compile_report.py

For each configuration: registers per thread, spilled stack bytes, shared memory, and
counts of the instructions that matter on Hopper (wgmma, TMA loads, exp2). A config that
spills or lacks wgmma/TMA is not worth device time; this is how the sweep lists in
bench_kernels.py were pruned before running on the H100.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
attention = importlib.import_module("fast3r_kernels.attention")

CUOBJDUMP = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
HOPPER = GPUTarget("cuda", 90, 32)


def report(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int) -> str:
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    start = time.time()
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=HOPPER,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    ptx = compiled.asm["ptx"]
    shown = {k: v for k, v in constexprs.items() if v is not None and k not in ("PRECISION", "HEAD_DIM")}
    return (f"{kernel.__name__} {shown} w{num_warps} s{num_stages}: {regs.group(0)} smem={compiled.metadata.shared} "
            f"wgmma={ptx.count('wgmma.mma_async')} tma_loads={ptx.count('cp.async.bulk.tensor')} "
            f"ex2={ptx.count('ex2.approx')} shared_ld/st={ptx.count('ld.shared')}/{ptx.count('st.shared')} "
            f"warps={compiled.metadata.num_warps} setmaxnreg={ptx.count('setmaxnreg')} "
            f"({time.time() - start:.1f}s)")


def desc(dtype: str, block: list[int]) -> str:
    return f"tensordesc<{dtype}[{','.join(map(str, block))}]>"


def attention_forward(bm: int, bn: int, d: int, rope: bool, w: int, s: int, dtype: str = "bf16") -> str:
    blk = lambda rows, cols: desc(dtype, [1, rows, 1, cols])
    sig = {"q_desc": blk(bm, d), "k_desc": blk(bn, d), "v_desc": blk(bn, d), "o_desc": blk(bm, d),
           "q4_desc": blk(bm, d // 4) if rope else "constexpr", "k4_desc": blk(bn, d // 4) if rope else "constexpr",
           "LSE": "*fp32", "POS": "*i64" if rope else "constexpr", "COS": "*fp32" if rope else "constexpr",
           "SIN": "*fp32" if rope else "constexpr", "spos_b": "i32", "spos_l": "i32", "spos_c": "i32",
           "H": "i32", "L_Q": "i32", "L_K": "i32", "m_tiles": "i32", "qk_scale": "fp32"}
    consts = {"HEAD_DIM": d, "BLOCK_M": bm, "BLOCK_N": bn, "BHLD": False, "ROPE": rope, "RETURN_LSE": False,
              "PRECISION": "native"}
    if not rope:
        consts.update({"q4_desc": None, "k4_desc": None, "POS": None, "COS": None, "SIN": None})
    return report(attention._attn_fwd, sig, consts, w, s)


if __name__ == "__main__":
    for bm, bn, w, s, rope in [(64, 64, 4, 3, False), (64, 128, 4, 3, False), (128, 128, 8, 3, False),
                               (128, 128, 4, 3, False), (256, 64, 8, 3, True), (64, 64, 4, 3, True)]:
        print(attention_forward(bm, bn, 64, rope, w, s), flush=True)
