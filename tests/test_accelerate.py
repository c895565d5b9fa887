"""accelerate(): module swapping on Fast3R and on a tree shaped like the official code (interpreter)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fast3r import Fast3R
from fast3r_kernels import FusedAttention, FusedLayerNorm, FusedPatchEmbed, accelerate


# ---- a small model with the official module structure and attribute names -----------------------
class OfficialStyleRoPE(nn.Module):
    """Same math as the official RoPE2D: rotate-half on each half of the head, by y then x."""

    def __init__(self, freq: float = 100.0):
        super().__init__()
        self.base = freq

    def forward(self, tokens, positions):
        d = tokens.shape[-1] // 2
        inv = 1.0 / (self.base ** (torch.arange(0, d, 2).float() / d))
        out = []
        for half, coord in zip(tokens.float().chunk(2, dim=-1), (0, 1)):
            angles = positions[..., coord, None].float() * inv
            cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
            a, b = half.chunk(2, dim=-1)
            out.append(half * cos + torch.cat([-b, a], -1) * sin)
        return torch.cat(out, -1).to(tokens.dtype)


class OfficialStyleAttention(nn.Module):
    def __init__(self, dim, num_heads, rope=None, temperature=False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attn_bias_for_inference_enabled = temperature
        self.attn_bias_scale = self.scale * math.sqrt(math.log(137) / math.log(20))
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x, xpos):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).transpose(1, 3)
        q, k, v = (qkv[:, :, i] for i in range(3))
        if self.rope is not None:
            q, k = self.rope(q, xpos), self.rope(k, xpos)
        scale = self.attn_bias_scale if (self.attn_bias_for_inference_enabled and not self.training) else self.scale
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class OfficialStyleBlock(nn.Module):
    def __init__(self, dim, heads, rope=None, temperature=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = OfficialStyleAttention(dim, heads, rope, temperature)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x, xpos):
        x = x + self.attn(self.norm1(x), xpos)
        return x + self.mlp(self.norm2(x))


class OfficialStylePatchEmbed(nn.Module):
    """ManyAR-style: forward(img, true_shape) -> (tokens, positions); landscape views only here."""

    def __init__(self, dim, patch=16):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, img, true_shape):
        x = self.proj(img)
        h, w = x.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = torch.stack([ys.flatten(), xs.flatten()], -1).expand(img.shape[0], -1, -1)
        return x.flatten(2).transpose(1, 2), pos


class OfficialStyleModel(nn.Module):
    def __init__(self, dim=128, heads=2):
        super().__init__()
        self.patch_embed = OfficialStylePatchEmbed(dim)
        self.rope = OfficialStyleRoPE(100.0)
        self.enc_blocks = nn.ModuleList(OfficialStyleBlock(dim, heads, self.rope) for _ in range(2))
        self.enc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dec_blocks = nn.ModuleList(OfficialStyleBlock(dim, heads, temperature=True) for _ in range(2))

    def forward(self, img, true_shape):
        x, pos = self.patch_embed(img, true_shape=true_shape)
        for blk in self.enc_blocks:
            x = blk(x, pos)
        x = self.enc_norm(x).reshape(1, -1, x.shape[-1])
        for blk in self.dec_blocks:
            x = blk(x, None)
        return x


def test_official_structure_tree_is_accelerated_without_changing_outputs_or_state():
    model = OfficialStyleModel().eval()
    images = torch.rand(3, 3, 32, 48) * 2 - 1
    true_shape = torch.tensor([[32, 48]] * 3)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(images, true_shape)
    assert accelerate(model) is model
    assert isinstance(model.patch_embed, FusedPatchEmbed)
    assert all(isinstance(b.attn, FusedAttention) and isinstance(b.norm1, FusedLayerNorm) for b in model.enc_blocks)
    assert model.enc_blocks[0].attn.rope is model.rope and model.dec_blocks[0].attn.rope is None
    assert model.state_dict().keys() == state_before.keys()
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        got = model(images, true_shape)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    model.train()  # the fusion temperature applies in eval mode only, in both implementations
    assert model.dec_blocks[0].attn.softmax_scale() == model.dec_blocks[0].attn.scale


def test_a_fast3r_model_keeps_its_backend_built_layers_and_says_why():
    """Fast3R picks its backend when built; accelerate() must not swap layers whose forward differs."""
    torch.manual_seed(0)
    model = Fast3R("tiny").eval()
    images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)
    with torch.inference_mode():
        before = model(images)
    with pytest.warns(UserWarning, match="left"):
        accelerate(model)
    report = model.acceleration_report
    assert not report.swapped["attention"] and not report.swapped["layer_norm"]
    assert "forward(x, xpos)" in report.skipped["encoder.enc_blocks.0.attn"]
    assert "overrides nn.LayerNorm.forward" in report.skipped["decoder.dec_norm"]
    with torch.inference_mode():
        after = model(images)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for a, b in zip(after, before) for k in a)


def test_swapping_is_idempotent_and_reported():
    model = OfficialStyleModel().eval()
    accelerate(model)
    report = model.acceleration_report
    assert len(report.swapped["attention"]) == len(model.enc_blocks) + len(model.dec_blocks)
    assert report.swapped["patch_embed"] == ["patch_embed"] and not report.skipped
    before = list(model.modules())
    accelerate(model)
    assert list(model.modules()) == before
    assert "attention: " in str(report)


@pytest.mark.parametrize("change, fragment", [
    ("proj_drop", "proj_drop has p=0.1"),
    ("q_norm", "children ['q_norm']"),
    ("rope_d32", "head dim 32 with RoPE"),
    ("patch_norm", "children ['norm']"),
    ("patch_returns_map", "does not return (tokens"),
])
def test_what_cannot_be_reproduced_exactly_is_refused_with_the_reason(change, fragment):
    model = OfficialStyleModel().eval()
    target = "enc_blocks.0.attn"
    if change == "proj_drop":
        model.enc_blocks[0].attn.proj_drop = nn.Dropout(0.1)
    elif change == "q_norm":
        model.enc_blocks[0].attn.q_norm = nn.LayerNorm(64)
    elif change == "rope_d32":
        attn = OfficialStyleAttention(64, 2, rope=model.rope)
        model.enc_blocks[0].attn = attn
    elif change == "patch_norm":
        model.patch_embed.norm = nn.LayerNorm(128)
        target = "patch_embed"
    else:
        model.patch_embed.forward = lambda images, true_shape=None: images  # a feature map, not tokens
        target = "patch_embed"
    original = model.get_submodule(target)
    with pytest.warns(UserWarning, match="unchanged"):
        accelerate(model)
    assert model.get_submodule(target) is original
    assert fragment in model.acceleration_report.skipped[target]


def test_what_is_not_supported_is_left_alone():
    dropout_attn = OfficialStyleAttention(128, 2)
    dropout_attn.attn_drop = nn.Dropout(0.1)
    odd_heads = OfficialStyleAttention(96, 2)  # head dim 48
    two_d_norm = nn.LayerNorm((4, 8))
    tree = nn.ModuleDict({"a": dropout_attn, "b": odd_heads, "c": two_d_norm})
    accelerate(tree)
    assert tree["a"] is dropout_attn and tree["b"] is odd_heads and tree["c"] is two_d_norm
    assert isinstance(accelerate(nn.LayerNorm(8)), FusedLayerNorm)


def test_triton_backend_matches_torch_backend_on_the_tiny_preset():
    torch.manual_seed(0)
    reference = Fast3R("tiny").eval()
    fast = Fast3R("tiny", backend="triton").eval()
    fast.load_state_dict(reference.state_dict())
    images = torch.randint(0, 256, (3, 3, 32, 48), dtype=torch.uint8)
    with torch.inference_mode():
        want, got = reference(images), fast(images)
    for a, b in zip(got, want):
        for key in ("pts3d_in_other_view", "conf", "pts3d_local", "conf_local"):
            assert ((a[key] - b[key]).norm() / b[key].norm()).item() < 1e-4, key
