"""One fusion layer's attention sharded over P GPUs: our ring and Ulysses against PyTorch's context_parallel.

    torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py [--tokens 294000 65536]
    torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py --smoke    # CPU, gloo, tiny

For each token count N, with 1 x 16 heads x N tokens x 64 in bf16 (q, k, v strided views of
one packed qkv, as the model's projection gives them), sharded as torch.chunk shards them:
- one GPU (rank 0, before the distributed part): our Triton kernel and cuDNN SDPA on all N;
- on P GPUs: ring and Ulysses over our kernel and over the torch backend (cuDNN), and
  ``torch.distributed.tensor.experimental.context_parallel`` over cuDNN SDPA with both of
  its K/V rotation methods, the baseline (an error there is recorded, not raised);
- the ring again on a second NCCL group with high-priority streams ("ring_hipri_*"), to see
  whether the transfers then stop slowing the concurrent attention kernel;
- per ring step: the local kernel on one shard's queries and keys, the LSE merge, and the
  transfer of one packed K+V shard alone (a ring send/receive); and Ulysses' q/k/v all-to-all:
  the inputs of a scaling model (a ring step costs max(compute, transfer) + merge).
Each timing is the median of --repeats runs after a warm-up, the slowest rank's wall time.
Each distributed result is checked against the single-GPU result of the same kernel for
this rank's query rows (attention rows are independent, so these are the rows of the full
single-GPU output): max |out - ref| / max |ref| over all ranks.

Rank 0 writes JSON (--out, default benchmarks/results/context_parallel_<gpu>_p<P>.json) and
prints a table. ``--smoke`` runs the same code on the CPU with gloo, fp32 and the torch
backend only, without context_parallel (the CI test runs it with 2 processes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import gpu_name

from fast3r import parallel

RESULTS = Path(__file__).resolve().parent / "results"
GPU_TOKENS = (294000, 65536)  # 1500 views @224 (196 tokens each); a 64k-token scene
SMOKE_TOKENS = (301, 128)  # uneven and even shards
# NVLink multicast stays off on the lent machines (/work/shared/DISTRIBUTED.md says why).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class Timer:
    """Wall-clock medians across ranks: barrier, run, device sync; the slowest rank counts."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def local(self, fn: Callable[[], object]) -> float:
        """Median seconds of fn() on this rank alone, after one warm-up."""
        fn()
        samples = []
        for _ in range(self.repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    def ranks(self, fn: Callable[[], object], warm: bool = False) -> float:
        """Median over repeats of the slowest rank's seconds for fn(), all ranks starting together.

        One warm-up run first, unless the caller has just run fn (``warm``).
        """
        if not warm:
            fn()
        samples = []
        for _ in range(self.repeats):
            self.sync()
            dist.barrier()
            start = time.perf_counter()
            fn()
            self.sync()
            samples.append(time.perf_counter() - start)
        return statistics.median(self.max_over_ranks(samples))

    def max_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()


def chunk_lengths(total: int, world: int) -> list[int]:
    """Token counts of torch.chunk's shards, which is how context_parallel shards the sequence."""
    return [len(c) for c in torch.arange(total).chunk(world)]


def relative_error(out: torch.Tensor, ref: torch.Tensor, timer: Timer) -> float:
    """max |out - ref| / max |ref| over every rank's rows."""
    diff = (out.float() - ref.float()).abs().max()
    scale = ref.float().abs().max()
    worst = timer.max_over_ranks([float(diff), float(scale)])
    return worst[0] / worst[1]


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure(fn: Callable[[], torch.Tensor], ref: torch.Tensor, timer: Timer, device: torch.device) -> dict:
    """Seconds, relative error and peak memory of one distributed method; its error text if it fails."""
    try:
        reset_peak(device)
        error = relative_error(fn(), ref, timer)
        seconds = timer.ranks(fn, warm=True)
        peaks = timer.max_over_ranks([peak_gib(device) or 0.0])
    except Exception as err:  # noqa: BLE001 - recorded: one failing method must not end the run
        return {"error": f"{type(err).__name__}: {err}"}
    return {"seconds": seconds, "rel_error": error, "peak_gib": peaks[0] if device.type == "cuda" else None}


def context_parallel_methods(q, k, v, scale: float, ref: torch.Tensor, timer: Timer, device: torch.device,
                             sdpa_name: str) -> dict:
    """PyTorch's context_parallel over SDPA (cuDNN on CUDA), with each of its K/V rotation methods."""
    name = f"context_parallel_{sdpa_name.removesuffix('_sdpa')}"
    world = dist.get_world_size()
    if device.type == "cpu":
        # On gloo, DTensor gathers K/V for the CPU SDPA kernel (no ring), and with torch 2.13 a process
        # that ran it aborts at exit ("terminate called without an active exception") about once in 30.
        return {name: {"skipped": "context_parallel is measured on CUDA only"}}
    if q.shape[1] % world:  # its K/V rotation splits gathered buffers evenly; uneven shards would desynchronize ranks
        return {name: {"skipped": f"context_parallel needs the token count divisible by the {world} ranks"}}
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import _cp_options, set_rotate_method

        mesh = init_device_mesh(device.type, (world,))
    except Exception as err:  # noqa: BLE001 - an older or newer torch without this experimental API
        return {name: {"error": f"{type(err).__name__}: {err}"}}
    results = {}
    for rotate in ("allgather", "alltoall"):
        # The context shards these (B, H, N, D) buffers in place; its head-tail load balancer
        # is for causal masks (it refuses non-causal attention), Fast3R's attention has none.
        qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        balance = _cp_options.enable_load_balance
        try:
            set_rotate_method(rotate)
            _cp_options.enable_load_balance = False
            with sdpa_backend(device), context_parallel(
                mesh, buffers=[qf, kf, vf], buffer_seq_dims=[2, 2, 2], no_restore_buffers={qf, kf, vf}
            ):
                results[f"{name}_{rotate}"] = measure(
                    lambda q=qf, k=kf, v=vf: F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2),
                    ref, timer, device)
        except Exception as err:  # noqa: BLE001 - the baseline's failure is a result, recorded
            results[f"{name}_{rotate}"] = {"error": f"{type(err).__name__}: {err}"}
        finally:
            _cp_options.enable_load_balance = balance
    return results


def step_times(q_local, kernels: dict, timer: Timer, device: torch.device, dtype: torch.dtype,
               lengths: list[int], heads: int, head_dim: int, scale: float) -> dict:
    """One ring step's pieces at this shard size: local attention, LSE merge, K+V transfer; Ulysses' all-to-all."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n = lengths[rank]
    block = torch.randn(2, 1, n, heads, head_dim, device=device, dtype=dtype)  # packed K+V, as the ring sends it
    steps: dict = {}
    for name, kernel in kernels.items():
        steps[f"compute_{name}_s"] = timer.ranks(lambda kernel=kernel: kernel(q_local, block[0], block[1], scale))
    out, lse = kernels["torch"](q_local, block[0], block[1], scale)
    acc, acc_lse = out.float(), lse.clone()
    steps["merge_s"] = timer.ranks(lambda: parallel._merge_into(acc, acc_lse, out, lse))
    if world > 1:
        incoming = torch.empty(2, 1, lengths[(rank - 1) % world], heads, head_dim, device=device, dtype=dtype)

        def ring_step() -> None:
            for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, block, (rank + 1) % world),
                                                dist.P2POp(dist.irecv, incoming, (rank - 1) % world)]):
                work.wait()

        steps["kv_transfer_s"] = timer.ranks(ring_step)
        steps["kv_bytes"] = block.nbytes
        steps["kv_transfer_gbs"] = block.nbytes / steps["kv_transfer_s"] / 1e9
        if heads % world == 0:
            send = torch.randn(world * n, 3, 1, heads // world, head_dim, device=device, dtype=dtype)
            gathered = torch.empty(sum(lengths), 3, 1, heads // world, head_dim, device=device, dtype=dtype)
            steps["alltoall_qkv_s"] = timer.ranks(lambda: dist.all_to_all_single(
                gathered, send, output_split_sizes=lengths, input_split_sizes=[n] * world))
            steps["alltoall_qkv_bytes"] = send.nbytes
    return steps


def high_priority_group() -> tuple[dist.ProcessGroup | None, str | None]:
    """A second NCCL group over all ranks on high-priority CUDA streams, or (None, why not).

    With it a ring step's send/receive kernel is scheduled as soon as it is ready instead of
    queueing behind the attention kernel's blocks (the "ring_hipri_*" methods measure this).
    """
    try:
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = True
        return dist.new_group(backend="nccl", pg_options=options), None
    except Exception as err:  # noqa: BLE001 - a build without this option: recorded, the plain ring still runs
        return None, f"{type(err).__name__}: {err}"


def bench_tokens(total: int, args, timer: Timer, device: torch.device, dtype: torch.dtype,
                 high_priority: dist.ProcessGroup | None = None) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    heads, head_dim = args.heads, args.head_dim
    scale = head_dim**-0.5
    lengths = chunk_lengths(total, world)
    rows = slice(sum(lengths[:rank]), sum(lengths[: rank + 1]))
    generator = torch.Generator(device).manual_seed(args.seed + total)  # the same full tensors on every rank
    qkv = torch.randn(1, total, 3, heads, head_dim, generator=generator, device=device, dtype=dtype)
    q, k, v = qkv.unbind(2)
    q_local, k_local, v_local = q[:, rows], k[:, rows], v[:, rows]
    kernels = {"torch": parallel.torch_attention_with_lse}
    if not args.smoke:
        kernels["triton"] = parallel.triton_attention_with_lse
    sdpa_name = "cudnn_sdpa" if device.type == "cuda" else "torch_sdpa"
    record: dict = {"tokens": total, "shard_lengths": lengths, "single_gpu": {}, "methods": {}}

    def log(text: str) -> None:
        if rank == 0:
            print(f"[N={total}] {text}", flush=True)

    if rank == 0:  # one GPU, the whole sequence, before anything distributed
        record["single_gpu"] = single_gpu(q, k, v, scale, "triton" in kernels, sdpa_name, timer, device)
        log(f"one GPU: {record['single_gpu']}")
    dist.barrier()
    one_gpu = timer_broadcast([record["single_gpu"].get("triton_s"), record["single_gpu"].get(f"{sdpa_name}_s")],
                              device)
    baseline = {"triton": one_gpu[0], "torch": one_gpu[1]}

    methods = record["methods"]
    variants = [("ring", parallel.ring_attention, None), ("ulysses", parallel.ulysses_attention, None)]
    if high_priority is not None:
        variants.append(("ring_hipri", parallel.ring_attention, high_priority))
    for kernel_name, kernel in kernels.items():
        try:  # the single-GPU result of this kernel, for this rank's rows
            ref = kernel(q_local, k, v, scale)[0]
        except Exception as err:  # noqa: BLE001 - recorded for this kernel's methods; the run goes on
            for method_name, _, _ in variants:
                methods[f"{method_name}_{kernel_name}"] = {"error": f"reference: {type(err).__name__}: {err}",
                                                           "kernel": kernel_name}
            continue
        for method_name, method, group in variants:
            name = f"{method_name}_{kernel_name}"
            methods[name] = measure(
                lambda method=method, kernel=kernel, group=group: method(
                    q_local, k_local, v_local, scale=scale, group=group, local_attention=kernel,
                    shard_lengths=lengths),
                ref, timer, device)
            methods[name]["kernel"] = kernel_name
            log(f"{name}: {methods[name]}")
        if kernel_name == "torch":
            for name, result in context_parallel_methods(q, k, v, scale, ref, timer, device, sdpa_name).items():
                methods[name] = {**result, "kernel": "torch"}
                log(f"{name}: {methods[name]}")
        del ref
    for result in methods.values():
        if "seconds" in result:
            if baseline.get(result["kernel"]):
                result["speedup_vs_1gpu"] = baseline[result["kernel"]] / result["seconds"]
            if baseline["torch"]:
                result["speedup_vs_sdpa_1gpu"] = baseline["torch"] / result["seconds"]
    if args.smoke:
        for name in ("ring_triton", "ulysses_triton"):
            methods[name] = {"skipped": "--smoke runs the torch backend only", "kernel": "triton"}
    record["step"] = step_times(q_local, kernels, timer, device, dtype, lengths, heads, head_dim, scale)
    log(f"step: {record['step']}")
    return record


def single_gpu(q, k, v, scale: float, triton: bool, sdpa_name: str, timer: Timer, device: torch.device) -> dict:
    """Seconds of our kernel and of SDPA on the whole sequence on this GPU; an error is recorded, not raised."""
    single: dict = {}
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    runs = {f"{sdpa_name}_s": lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=scale)}
    if triton:
        from fast3r_kernels import attention

        runs["triton_s"] = lambda: attention(q, k, v, scale=scale, layout="BLHD")
    with sdpa_backend(device):
        for key, run in runs.items():
            try:
                single[key] = timer.local(run)
            except Exception as err:  # noqa: BLE001 - rank 0 must reach the barrier the others wait at
                single[key.removesuffix("_s") + "_error"] = f"{type(err).__name__}: {err}"
        if len(single) == 2 and triton:
            full_sdpa = runs[f"{sdpa_name}_s"]().transpose(1, 2).float()
            single["triton_vs_sdpa_rel_error"] = float(
                (runs["triton_s"]().float() - full_sdpa).abs().max() / full_sdpa.abs().max())
    return single


def sdpa_backend(device: torch.device):
    """cuDNN SDPA on CUDA (the baseline's kernel); PyTorch's default choice on the CPU."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)


def timer_broadcast(values: list[float | None], device: torch.device) -> list[float | None]:
    """Rank 0's single-GPU seconds on every rank (None where not measured)."""
    t = torch.tensor([-1.0 if v is None else v for v in values], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return [None if v < 0 else v for v in t.tolist()]


def write_json(doc: dict, path: Path) -> None:
    """Write via a temporary file, so an interrupted run leaves no half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def print_table(doc: dict) -> None:
    print(f"\n{doc['gpu']} x {doc['P']}, {doc['dtype']}, {doc['heads']} heads x {doc['head_dim']}")
    for rec in doc["records"]:
        single = ", ".join(f"{k} {_fmt(v)}" for k, v in rec["single_gpu"].items())
        print(f"N={rec['tokens']}  shards {rec['shard_lengths']}  one GPU: {single}")
        for name, r in rec["methods"].items():
            if "seconds" in r:
                print(f"  {name:36s} {r['seconds']:9.4f} s  x{r.get('speedup_vs_1gpu', float('nan')):5.2f} vs 1 GPU  "
                      f"rel.err {r['rel_error']:.2e}")
            else:
                print(f"  {name:36s} {r.get('error') or r.get('skipped')}")
        print("  step: " + ", ".join(f"{k} {_fmt(v)}" for k, v in rec["step"].items()))


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float | int) else str(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", help=f"sequence lengths (default {GPU_TOKENS})")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=180, help="seconds before a stuck collective fails the run")
    parser.add_argument("--smoke", action="store_true", help="CPU + gloo, fp32, tiny sequences, torch backend only")
    parser.add_argument("--out", type=Path, help="JSON path (default results/context_parallel_<gpu>_p<P>.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for name, value in MULTICAST_OFF.items():
        os.environ.setdefault(name, value)
    if "RANK" not in os.environ:
        sys.exit("run under torchrun: torchrun --nproc-per-node P benchmarks/bench_context_parallel.py [--smoke]")
    use_cuda = torch.cuda.is_available() and not args.smoke
    if not use_cuda and not args.smoke:
        sys.exit("no CUDA GPU: pass --smoke for the CPU (gloo) run of the same code")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=args.timeout),
                            device_id=device if use_cuda else None)
    try:
        dtype = torch.bfloat16 if use_cuda else torch.float32
        timer = Timer(device, args.repeats)
        tokens = args.tokens or (SMOKE_TOKENS if args.smoke else GPU_TOKENS)
        high_priority, why_not = high_priority_group() if use_cuda else (None, "CUDA only")
        records = [bench_tokens(n, args, timer, device, dtype, high_priority) for n in tokens]
        if dist.get_rank() == 0:
            doc = {
                "gpu": torch.cuda.get_device_name(device) if use_cuda else "cpu",
                "P": dist.get_world_size(),
                "backend": dist.get_backend(),
                "torch": torch.__version__,
                "dtype": str(dtype).removeprefix("torch."),
                "batch": 1, "heads": args.heads, "head_dim": args.head_dim, "scale": args.head_dim**-0.5,
                "repeats": args.repeats,
                "env": {name: os.environ.get(name) for name in MULTICAST_OFF},
                "high_priority_nccl_group": why_not or "ring_hipri_* methods",
                "records": records,
            }
            name = gpu_name() if use_cuda else "cpu"
            out = args.out or RESULTS / f"context_parallel_{name}_p{doc['P']}.json"
            write_json(doc, out)
            print_table(doc)
            print(f"\nwrote {out}")
        dist.barrier()  # leave together: no rank tears down its connections while rank 0 still writes
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
