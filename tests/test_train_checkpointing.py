"""Activation checkpointing and the training precisions, on the CPU.

Checkpointing only changes what is kept for the backward, never the arithmetic: the gradients of every
parameter under ``blocks`` and ``full`` equal those without checkpointing to 1e-6 of the largest gradient
(on the CPU they are bit-identical; the recomputation runs the same kernels on the same inputs).
"""

import copy
import dataclasses

import pytest
import torch
import train_cases
from op_log import OpLog

from fast3r import Fast3R, fast3r_loss
from fast3r.config import Fast3RConfig
from fast3r.layers import Attention
from fast3r.train.activation_checkpointing import apply_activation_checkpointing, attention_ops
from fast3r.train.precision import apply_precision


@pytest.fixture(autouse=True)
def one_thread():
    yield from train_cases.one_cpu_thread()


VIEWS, SIZE = 3, 64


def batch(generator):
    images = torch.randint(0, 256, (2, VIEWS, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    gts = []
    for _ in range(VIEWS):
        pose = torch.eye(4).repeat(2, 1, 1)
        q, _ = torch.linalg.qr(torch.randn(2, 3, 3, generator=generator))
        pose[:, :3, :3] = q * torch.linalg.det(q)[:, None, None]
        pose[:, :3, 3] = torch.randn(2, 3, generator=generator)
        gts.append({"pts3d": torch.randn(2, SIZE, SIZE, 3, generator=generator) * 3, "camera_pose": pose,
                    "valid_mask": torch.rand(2, SIZE, SIZE, generator=generator) > 0.2})
    return images, gts


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Fast3R(Fast3RConfig.from_dict(train_cases.SMALL_MODEL)).train()


def step(model, mode, precision, images, gts, saved=None):
    """Gradients (name -> tensor) of one forward + backward; ``saved`` collects bytes kept outside checkpoints."""
    model = copy.deepcopy(model)
    report = apply_activation_checkpointing(model, mode)
    autocast = apply_precision(model, precision)

    def pack(t):
        if saved is not None:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        preds = model(images, image_ids=torch.arange(VIEWS)[None].expand(2, -1), encoder_chunk=2, head_chunk=2)
    loss, _ = fast3r_loss(preds, gts)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, report


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_checkpointing_gives_the_same_gradients(model, precision, fresh_seed):
    images, gts = batch(torch.Generator().manual_seed(fresh_seed))
    reference, _ = step(model, "none", precision, images, gts)
    assert len(reference) == sum(1 for n, _ in model.named_parameters() if "refinenet4.resConfUnit1" not in n)
    largest = max(g.abs().max() for g in reference.values())
    for mode in ("blocks", "full"):
        grads, _ = step(model, mode, precision, images, gts)
        assert grads.keys() == reference.keys()
        for name, grad in grads.items():
            assert (grad - reference[name]).abs().max() <= 1e-6 * largest, (mode, name)


def test_checkpointing_keeps_less(model):
    """What autograd keeps outside the checkpointed units shrinks: none > blocks > full."""
    images, gts = batch(torch.Generator().manual_seed(1))
    kept, reports = {}, {}
    for mode in ("none", "blocks", "full"):
        saved = {}
        _, reports[mode] = step(model, mode, "fp32", images, gts, saved)
        kept[mode] = sum(saved.values())
    assert kept["none"] > 2 * kept["blocks"] and kept["blocks"] > kept["full"], kept
    assert reports["blocks"] == {"encoder_blocks": 2, "fusion_blocks": 4, "heads": 2, "encoder": 0}
    assert reports["full"] == {"encoder_blocks": 2, "fusion_blocks": 4, "heads": 2, "encoder": 1}
    assert reports["none"] == dict.fromkeys(reports["full"], 0)


def test_checkpointed_model_is_unchanged_for_inference_and_state(model):
    images, _ = batch(torch.Generator().manual_seed(2))
    wrapped = copy.deepcopy(model)
    apply_activation_checkpointing(wrapped, "full")
    assert wrapped.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        ours, theirs = wrapped.eval()(images), copy.deepcopy(model).eval()(images)
    for a, b in zip(ours, theirs):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="already applied"):
        apply_activation_checkpointing(wrapped, "blocks")
    with pytest.raises(ValueError, match="checkpointing='some'"):
        apply_activation_checkpointing(copy.deepcopy(model), "some")


def test_official_precision_runs_only_the_attention_in_bf16(model):
    """q, k, v reach every attention in bf16 and its output returns to fp32; the rest of the step is fp32."""
    images, gts = batch(torch.Generator().manual_seed(3))
    spied = copy.deepcopy(model)
    seen = []
    for module in spied.modules():
        if isinstance(module, Attention):
            inner = module.ops.attention

            def spy(q, k, v, scale, rope=None, inner=inner):
                seen.append((q.dtype, k.dtype, v.dtype))
                return inner(q, k, v, scale, rope)

            module.ops = dataclasses.replace(module.ops, attention=spy)
    autocast = apply_precision(spied, "official")
    with autocast():
        preds = spied(images)
    assert len(seen) == 6 and set(seen) == {(torch.bfloat16,) * 3}  # 2 encoder + 4 fusion blocks
    assert preds[0]["pts3d_in_other_view"].dtype == torch.float32
    official, _ = step(model, "none", "official", images, gts)
    exact, _ = step(model, "none", "fp32", images, gts)
    largest = max(g.abs().max() for g in exact.values())
    errors = [(official[n] - exact[n]).abs().max() / largest for n in exact]
    assert 0 < max(errors) < 0.05  # bf16 rounding of q, k, v: visible, and small


def test_precision_refuses_reduced_precision_weights(model):
    with pytest.raises(ValueError, match="fp32 master weights"):
        apply_precision(copy.deepcopy(model).to(torch.bfloat16), "bf16-mixed")


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_blocks_keeps_the_fusion_attention_and_full_recomputes_it(model, mode):
    """The backward of ``blocks`` recomputes every encoder attention but no fusion attention (its outputs were
    kept); ``full`` recomputes both."""
    images, gts = batch(torch.Generator().manual_seed(3))
    wrapped = copy.deepcopy(model)
    apply_activation_checkpointing(wrapped, mode)
    preds = wrapped(images, image_ids=torch.arange(VIEWS)[None].expand(2, -1), encoder_chunk=2, head_chunk=2)
    loss, _ = fast3r_loss(preds, gts)
    with OpLog() as log:
        loss.backward()
    # the sequence length of each forward attention op run: every view's tokens (fusion) or one view's (encoder)
    lengths = [max(shape[-3:-1]) for op, shape in log.ops if op in attention_ops()]
    fusion_length, view_tokens = VIEWS * (SIZE // 16) ** 2, (SIZE // 16) ** 2
    fusion_depth, encoder_depth = len(wrapped.decoder.dec_blocks), len(wrapped.encoder.enc_blocks)
    recomputed_fusion = lengths.count(fusion_length)
    encoder_passes = 2 if mode == "full" else 1  # full re-runs the encoder, then its blocks inside
    assert recomputed_fusion == (0 if mode == "blocks" else fusion_depth)
    assert lengths.count(view_tokens) == encoder_passes * encoder_depth * 2  # two encoder chunks (3 views, 2 a chunk)
