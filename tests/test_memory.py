"""The memory plans of the inference forward (fast3r.memory): chunk sizes, "fast" vs "lean", what stays where.

CPU: the lean plan gives the fast plan's outputs bit for bit where its chunks fall on 16-row multiples
(then every GEMM, LayerNorm and attention row is computed by the same kernel in the same order; this
CPU's BLAS picks other kernels for other row counts, so ragged chunks differ in the last bits, within
1e-5 of the output's scale in fp32); the device-resident bytes of the fusion, counted by tests/live_bytes.py,
equal ``plan_bytes``; "auto" chooses from the memory left. GPU (-m gpu): the same outputs at a real size,
the heads reading pinned host layers, and the 1500-view peak at 224 px.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from live_bytes import LiveBytes

from fast3r import Fast3R, Fast3RConfig, layers, memory
from fast3r.layers import InPlace

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("pts3d_in_other_view", "conf", "pts3d_local", "conf_local")
RAGGED_TOLERANCE = 1e-5  # fp32, max |lean - fast| / max |fast| where the BLAS rounds a chunk's rows otherwise
GIB = 2**30
LARGE_WEIGHTS = 647_551_368 * 2  # bytes of the large preset in bf16


def test_chunks_are_bounded_by_the_budget_and_by_free_memory(monkeypatch):
    cuda = torch.device("cuda")
    per_view = 10 * 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * 2**30, 80 * 2**30))
    assert memory.chunk_size(cuda, per_view, 256, 8) == memory.CHUNK_MEMORY_BUDGET // per_view
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (400 * 2**20, 80 * 2**30))
    assert memory.chunk_size(cuda, per_view, 256, 8) == 10  # a quarter of 400 MiB
    assert memory.chunk_size(cuda, 10 * 2**30, 256, 8) == 1  # never below one view
    assert memory.chunk_size(torch.device("cpu"), per_view, 256, 8) == 8


def test_per_view_estimates_grow_with_the_work():
    large, tiny = Fast3RConfig.preset("large"), Fast3RConfig.preset("tiny")
    assert memory.encoder_bytes_per_view(large, 768, 2) > memory.encoder_bytes_per_view(large, 196, 2)
    assert memory.encoder_bytes_per_view(large, 196, 2) > memory.encoder_bytes_per_view(tiny, 196, 2)
    assert memory.head_bytes_per_view(large, 384 * 512, 2) == 384 * 512 * (3 * 128 * 2 + 64)


def test_forward_accepts_explicit_chunks_and_gives_the_same_result():
    model = Fast3R("tiny").eval()
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        a = model(images, encoder_chunk=2, head_chunk=3)
        b = model(images)
    torch.testing.assert_close(a[4]["pts3d_local"], b[4]["pts3d_local"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ lean == fast
@pytest.fixture
def small_chunks(monkeypatch):
    """Lean chunks of 16 queries and 16-token MLP bands, so a few views make several chunks."""
    monkeypatch.setattr(memory, "LEAN_QUERY_TOKENS", 16)
    monkeypatch.setattr(memory, "LEAN_MLP_TOKENS", 16)


SCENES = {
    "12 views": lambda: torch.rand(12, 3, 32, 32) * 2 - 1,  # 48 tokens: 3 chunks
    "2 scenes": lambda: torch.rand(2, 6, 3, 32, 32) * 2 - 1,  # (B=2, 24 tokens): chunks per scene
    "uint8": lambda: torch.randint(0, 256, (8, 3, 64, 32), dtype=torch.uint8),  # 64 tokens
}


@pytest.mark.parametrize("scene", list(SCENES))
def test_lean_gives_the_fast_outputs_bit_for_bit(small_chunks, scene):
    model = Fast3R("tiny").eval()
    images = SCENES[scene]()
    with torch.inference_mode():
        fast, lean = model(images, memory="fast"), model(images, memory="lean")
    assert len(fast) == len(lean)
    for i, (f, g) in enumerate(zip(fast, lean)):
        assert set(g) == set(OUTPUTS)
        for key in OUTPUTS:
            assert torch.equal(f[key], g[key]), f"view {i} {key}"


def test_lean_with_ragged_chunks_stays_within_fp32_rounding(small_chunks):
    """Mixed sizes (4 + 2 + 4 + ... = 22 tokens): the last chunk has 6 rows, and the BLAS rounds those otherwise."""
    model = Fast3R("tiny").eval()
    views = [torch.rand(3, *hw) * 2 - 1 for hw in [(32, 32), (16, 32)] * 3 + [(32, 32)]]
    with torch.inference_mode():
        fast, lean = model(views, memory="fast"), model(views, memory="lean", output_device="cpu")
    for i, (f, g) in enumerate(zip(fast, lean)):
        for key in OUTPUTS:
            err = ((f[key] - g[key]).abs().max() / f[key].abs().max()).item()
            assert err <= RAGGED_TOLERANCE, f"view {i} {key}: {err:.2e}"


def test_lean_fusion_on_the_triton_kernels_matches_fast():
    """The fusion stage alone on the triton backend (interpreter), queries and MLP in chunks of 16 rows.

    Within fp32 rounding, not bit for bit: the block's products go to the CPU's BLAS and the interpreter's
    tl.dot to numpy's, whose rounding may depend on the row count and on where a tile starts. On an AMD
    EPYC host both do (1 ulp from the first block on; a chunk of queries that starts at row 16 differs from
    rows 16-31 of the whole by 3e-7), where an earlier host gave equal bits and this test asserted them."""
    model = Fast3R("tiny", backend="triton").eval()
    tokens = torch.randn(1, 48, 128)
    ids = torch.arange(12)[None]
    with torch.inference_mode():
        fast = model.decoder(tokens.clone(), [4] * 12, ids)
        lean = model.decoder(tokens.clone(), [4] * 12, ids, None, InPlace(queries=16, mlp=16))
    assert len(lean) == 4
    for i, (f, g) in enumerate(zip(fast, lean)):
        err = ((f - g).abs().max() / f.abs().max()).item()
        assert err <= RAGGED_TOLERANCE, f"hook layer {i}: {err:.2e}"


# ------------------------------------------------------------------------------- what goes where
def _fusion_peak(model: Fast3R, batch: int, views: int, view_tokens: int, plan: InPlace | None):
    """Peak bytes the fusion holds outside host memory, its hook layers, and the tokens it was given."""
    tokens = torch.randn(batch, views * view_tokens, model.config.enc_dim)
    given = tokens.clone()
    tracker = LiveBytes()
    with torch.inference_mode(), tracker:
        tracker.track(tokens)
        hooks = model.decoder(tokens, [view_tokens] * views, torch.arange(views).expand(batch, views), None, plan)
    host = tuple(hooks) if plan is not None else ()
    return tracker.peak(exclude=host), hooks, given


@pytest.mark.parametrize("batch, views", [(1, 16), (2, 8)])
def test_lean_fusion_holds_x_k_v_and_one_chunk_as_planned(batch, views):
    model = Fast3R("tiny").eval()
    plan = InPlace(queries=64, mlp=16)
    work = memory.Workload(batch=batch, views=views, tokens=views * 16, view_tokens=16, view_pixels=16 * 256,
                           elem_bytes=4, outputs_on_device=True)
    token_buffer = batch * views * 16 * 128 * 4
    peak, hooks, tokens = _fusion_peak(model, batch, views, 16, plan)
    planned = memory.plan_bytes(model.config, "lean", work, plan)["fusion"]
    # The plan leaves out only LayerNorm statistics and the like: a few bytes per token.
    assert planned <= peak <= planned + batch * views * 16 * 16
    assert peak < 4 * token_buffer  # x, K, V and less than one buffer of chunk transients
    # What the fusion returns lives apart from the device buffers: the 4 layers, the first the encoder tokens.
    assert len(hooks) == 4 and torch.equal(hooks[0], tokens)
    assert len({h.untyped_storage().data_ptr() for h in hooks}) == 4


@pytest.mark.parametrize("band, buffers", [(layers.MLP_TOKEN_CHUNK, None), (16, 10)])
def test_fast_fusion_holds_what_the_plan_says(monkeypatch, band, buffers):
    """Fast: the MLP over the whole (short) sequence sets the peak; with short bands, the 10 token buffers do."""
    monkeypatch.setattr(layers, "MLP_TOKEN_CHUNK", band)
    model = Fast3R("tiny").eval()
    work = memory.Workload(batch=1, views=16, tokens=256, view_tokens=16, view_pixels=16 * 256, elem_bytes=4,
                           outputs_on_device=True)
    peak, _, _ = _fusion_peak(model, 1, 16, 16, None)
    planned = memory.plan_bytes(model.config, "fast", work)["fusion"]
    assert planned <= peak <= planned + 256 * 16
    if buffers:  # the image-index embedding is freed once added (it was held through the fusion before)
        assert planned == buffers * 256 * 128 * 4


def test_the_plan_reproduces_todays_measured_peaks_and_meets_the_targets():
    """Fast at 1500 @224 and 1000 @512x384 (H200, weights + uint8 images + plan): 7.07 and 16.45 GiB measured."""
    cfg = Fast3RConfig.preset("large")

    def peak(mode: str, views: int, h: int, w: int) -> float:
        tokens = (h // 16) * (w // 16)
        work = memory.Workload(batch=1, views=views, tokens=views * tokens, view_tokens=tokens, view_pixels=h * w,
                               elem_bytes=2, outputs_on_device=False)
        return (memory.plan_peak(cfg, mode, work) + LARGE_WEIGHTS + views * 3 * h * w) / GIB

    assert peak("fast", 1500, 224, 224) == pytest.approx(7.07, rel=0.01)
    assert peak("fast", 1000, 384, 512) == pytest.approx(16.45, rel=0.01)
    assert peak("lean", 1500, 384, 512) <= 12 and peak("lean", 1500, 224, 224) <= 4
    assert peak("lean", 5000, 384, 512) <= 40 and peak("lean", 10_000, 224, 224) <= 24
    assert peak("lean", 2000, 384, 512) <= 22 < peak("fast", 2000, 384, 512)


# ----------------------------------------------------------------------------------- choosing
def _work(views: int, h: int = 384, w: int = 512) -> memory.Workload:
    tokens = (h // 16) * (w // 16)
    return memory.Workload(batch=1, views=views, tokens=views * tokens, view_tokens=tokens, view_pixels=h * w,
                           elem_bytes=2, outputs_on_device=False)


def test_auto_is_fast_where_it_fits_and_lean_where_not(monkeypatch):
    cfg, cuda = Fast3RConfig.preset("large"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 22 * GIB)  # a 24 GB card
    assert memory.choose(cfg, "auto", cuda, _work(100)) == "fast"
    assert memory.choose(cfg, "auto", cuda, _work(2000)) == "lean"
    assert memory.choose(cfg, "fast", cuda, _work(2000)) == "fast"  # asked for: not second-guessed
    monkeypatch.setattr(memory, "available_bytes", lambda device: 130 * GIB)  # an idle H200
    assert memory.choose(cfg, "auto", cuda, _work(2000)) == "fast"
    assert memory.choose(cfg, "auto", torch.device("cpu"), _work(5000)) == "fast"


def test_auto_queries_no_memory_while_a_cuda_graph_is_captured(monkeypatch):
    def no_query(device):
        raise AssertionError("available_bytes called during capture")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(memory, "available_bytes", no_query)
    assert memory.choose(Fast3RConfig.preset("large"), "auto", torch.device("cuda"), _work(5000)) == "fast"


def test_available_memory_counts_the_cache_and_the_process_cap(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * GIB, 140 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 8 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 5 * GIB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    assert memory.available_bytes(torch.device("cuda")) == 103 * GIB  # free + cached but unused
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 0.25)
    assert memory.available_bytes(torch.device("cuda")) == 30 * GIB  # 35 GiB cap, 5 allocated


@pytest.mark.parametrize("heads, sms", [(16, 132), (16, 114), (2, 132)])
def test_lean_query_chunks_fill_whole_waves(monkeypatch, heads, sms):
    class Properties:
        multi_processor_count = sms

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Properties())
    queries = memory.lean_chunks(torch.device("cuda"), heads).queries
    programs = heads * queries // memory.QUERY_TILE
    assert queries % memory.QUERY_TILE == 0 and programs % (memory.WAVE_PROGRAMS_PER_SM * sms) == 0
    assert abs(queries - memory.LEAN_QUERY_TOKENS) <= memory.LEAN_QUERY_TOKENS // 2
    assert memory.lean_chunks(torch.device("cpu"), heads).queries == memory.LEAN_QUERY_TOKENS


# ------------------------------------------------------------------------------------- refusals
def test_memory_modes_are_checked_and_lean_refuses_what_it_cannot_run():
    model = Fast3R("tiny").eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode(), pytest.raises(ValueError, match=r"memory='small'.*'auto', 'fast', 'lean'"):
        model(images, memory="small")
    with torch.inference_mode(), pytest.raises(ValueError, match="cuda_graph=True captures the fast plan"):
        model(images, memory="lean", cuda_graph=True)
    with pytest.raises(ValueError, match="inference in the model's own dtype"):
        model(images, memory="lean")  # autograd on: lean updates tensors in place
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError,
                                                                                            match="autocast"):
        model(images, memory="lean")


def test_training_keeps_its_path_under_auto():
    """Autograd on: "auto" is the fast (training) path, so gradients flow as before."""
    model = Fast3R("tiny")
    out = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    out[1]["pts3d_in_other_view"].sum().backward()
    assert model.decoder.dec_blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ GPU
def _scale_views():
    spec = importlib.util.spec_from_file_location("scale_views", ROOT / "benchmarks" / "scale_views.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def large_bf16():
    torch.manual_seed(0)
    return Fast3R("large", backend="triton").to("cuda", torch.bfloat16).eval()


@pytest.mark.gpu
def test_gpu_lean_matches_fast_and_the_heads_read_pinned_host_layers(large_bf16):
    """400 views at 224 px: 78k tokens, two query chunks on our attention kernel (>= 64k keys)."""
    model = large_bf16
    seen: dict = {}

    def keep(key, value) -> None:  # returns None: a hook that returns a value replaces the module's input or output
        seen.setdefault(key, value)

    handles = [model.decoder.register_forward_hook(lambda m, a, out: keep("hooks", out)),
               model.downstream_head.register_forward_pre_hook(lambda m, a: keep("head_in", a[0]))]
    images = torch.randint(0, 256, (400, 3, 224, 224), dtype=torch.uint8, device="cuda")
    try:
        with torch.inference_mode():
            fast = model(images, memory="fast", output_device="cpu")
            seen.clear()
            lean = model(images, memory="lean", output_device="cpu")
    finally:
        for handle in handles:
            handle.remove()
    assert all(h.device.type == "cpu" and h.is_pinned() for h in seen["hooks"])
    assert all(t.is_cuda for t in seen["head_in"])
    bitwise = all(torch.equal(f[k], g[k]) for f, g in zip(fast, lean) for k in OUTPUTS)
    worst = max(((f[k] - g[k]).abs().max() / f[k].abs().max()).item() for f, g in zip(fast, lean) for k in OUTPUTS)
    print(f"lean vs fast, 400 views @224, bf16: bitwise={bitwise}, max relative difference {worst:.2e}")
    assert worst <= 3e-2  # the bf16 tolerance between two forwards (tests/test_gpu_model.py)


@pytest.mark.gpu
def test_gpu_lean_peak_at_1500_views_224_is_within_4_gib(large_bf16):
    """Every fusion block peaks alike, so one block of the 24 (all weights resident) gives the true peak."""
    model = large_bf16
    spare = _scale_views().run_fewer_fusion_layers(model, 1)
    images = torch.randint(0, 256, (1500, 3, 224, 224), dtype=torch.uint8, device="cuda")
    try:
        torch.cuda.synchronize()
        # What else this pytest process holds (earlier tests' fixtures, the caching allocator's leftovers) is not
        # the scene's: it read 4.21 GiB here against 3.55 GiB in scale_views' fresh process. Count only the
        # scene's own bytes: the weights, the images and what the forward allocates.
        held = [*model.parameters(), *model.buffers(), *(p for block in spare for p in block.parameters())]
        resident = sum(t.numel() * t.element_size() for t in held)
        unrelated = torch.cuda.memory_allocated() - resident - images.numel()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            out = model(images, memory="lean", output_device="cpu")
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - unrelated) / GIB
    finally:
        model.decoder.dec_blocks = torch.nn.ModuleList([*model.decoder.dec_blocks, *spare])
        model.decoder.hooks = model.config.head_hooks
    assert len(out) == 1500 and torch.isfinite(out[-1]["pts3d_in_other_view"]).all()
    print(f"lean, 1500 views @224, one fusion block: peak {peak:.2f} GiB (besides {unrelated / GIB:.2f} GiB of "
          "other tensors alive in this process)")
    assert peak <= 4.0
