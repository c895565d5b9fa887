"""Fast3R model configuration: presets, YAML files and the official ``config.json`` form.

The official checkpoint stores its configuration as three argument dicts
(``encoder_args``, ``decoder_args``, ``head_args``). ``Fast3RConfig`` is the flat,
typed view of what those dicts mean for the released architecture; it converts to and
from them so a checkpoint written by either codebase loads in the other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_OFFICIAL_DEPTH_MODE = ["exp", -math.inf, math.inf]
_OFFICIAL_CONF_MODE = ["exp", 1, math.inf]


@dataclass(frozen=True)
class Fast3RConfig:
    """Architecture of a Fast3R model (the released model is the ``large`` preset)."""

    patch_size: int = 16
    enc_dim: int = 1024
    enc_depth: int = 24
    enc_heads: int = 16
    fusion_dim: int = 1024
    fusion_depth: int = 24
    fusion_heads: int = 16
    mlp_ratio: float = 4.0
    rope_base: float = 100.0
    head_feature_dim: int = 256
    head_layer_dims: tuple[int, int, int, int] = (96, 192, 384, 768)
    with_local_head: bool = True
    random_image_index: bool = False
    img_size: int = 512

    def __post_init__(self) -> None:
        for name in ("enc", "fusion"):
            dim, heads = getattr(self, f"{name}_dim"), getattr(self, f"{name}_heads")
            if dim % heads or (dim // heads) % 4:
                raise ValueError(
                    f"{name}_dim={dim} must split into {name}_heads={heads} heads whose "
                    "size is a multiple of 4 (RoPE-2D rotates quarters of each head)"
                )
        if self.fusion_depth < 4:
            raise ValueError(f"fusion_depth={self.fusion_depth}: the DPT heads read 4 distinct layers, need >= 4")
        object.__setattr__(self, "head_layer_dims", tuple(self.head_layer_dims))

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> Fast3RConfig:
        """``large``: the released Fast3R_ViT_Large_512; ``tiny``: the golden fixtures' model."""
        if name == "large":
            return cls()
        if name == "tiny":
            return cls(enc_dim=128, enc_depth=2, enc_heads=2, fusion_dim=128, fusion_depth=10, fusion_heads=2)
        raise ValueError(f"unknown preset {name!r}; choose 'large' or 'tiny'")

    @property
    def head_hooks(self) -> tuple[int, int, int, int]:
        """Fusion-layer indices the DPT heads read: 0 is the encoder output, depth is after dec_norm."""
        d = self.fusion_depth
        return (0, d * 2 // 4, d * 3 // 4, d)

    # -------------------------------------------------------------------- YAML
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Fast3RConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown Fast3RConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["head_layer_dims"] = list(self.head_layer_dims)
        return out

    @classmethod
    def from_yaml(cls, path: str | Path) -> Fast3RConfig:
        """Read a YAML file holding either ``preset: large|tiny`` plus overrides, or all fields."""
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise TypeError(f"{path}: expected a mapping of Fast3RConfig fields, got {type(values).__name__}")
        base = values.pop("preset", None)
        if base is None:
            return cls.from_dict(values)
        return cls.from_dict({**cls.preset(base).to_dict(), **values})

    def to_yaml(self, path: str | Path) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    # ------------------------------------------------------- official config.json
    @classmethod
    def from_official_args(cls, encoder_args: dict, decoder_args: dict, head_args: dict) -> Fast3RConfig:
        """Build from the three dicts of the official ``config.json`` (CroCo encoder, fast3r decoder, DPT heads)."""
        _expect(encoder_args, "encoder_type", "croco")
        _expect(encoder_args, "patch_embed_cls", "ManyAR_PatchEmbed")
        _expect(decoder_args, "decoder_type", "fast3r")
        _expect(head_args, "head_type", "dpt")
        _expect(head_args, "output_mode", "pts3d")
        for key, official in (("depth_mode", _OFFICIAL_DEPTH_MODE), ("conf_mode", _OFFICIAL_CONF_MODE)):
            if key in head_args and list(head_args[key]) != official:
                raise ValueError(f"head_args[{key!r}]={head_args[key]} is not supported; only {official} is")
        pos_embed = encoder_args.get("pos_embed", "RoPE100")
        if not pos_embed.startswith("RoPE"):
            raise ValueError(f"encoder_args['pos_embed']={pos_embed!r}: only RoPE<base> is supported")
        if encoder_args.get("patch_size", 16) != head_args.get("patch_size", 16):
            raise ValueError("encoder_args and head_args disagree on patch_size")
        if float(encoder_args.get("mlp_ratio", 4)) != float(decoder_args.get("mlp_ratio", 4.0)):
            raise ValueError("encoder and decoder mlp_ratio differ; Fast3RConfig has one mlp_ratio")
        if decoder_args.get("enc_embed_dim", encoder_args["embed_dim"]) != encoder_args["embed_dim"]:
            raise ValueError("decoder_args['enc_embed_dim'] must equal encoder_args['embed_dim']")
        if not decoder_args.get("qkv_bias", True):
            raise ValueError("decoder_args['qkv_bias']=False is not supported (the released model uses True)")
        return cls(
            patch_size=int(encoder_args.get("patch_size", 16)),
            enc_dim=int(encoder_args["embed_dim"]),
            enc_depth=int(encoder_args["depth"]),
            enc_heads=int(encoder_args["num_heads"]),
            fusion_dim=int(decoder_args["embed_dim"]),
            fusion_depth=int(decoder_args["depth"]),
            fusion_heads=int(decoder_args["num_heads"]),
            mlp_ratio=float(decoder_args.get("mlp_ratio", 4.0)),
            rope_base=float(pos_embed[len("RoPE"):]),
            with_local_head=bool(head_args.get("with_local_head", False)),
            random_image_index=bool(decoder_args.get("random_image_idx_embedding", False)),
            img_size=int(encoder_args.get("img_size", 512)),
        )

    def to_official_args(self) -> dict[str, dict]:
        """The ``config.json`` content the official ``Fast3R.from_pretrained`` expects."""
        rope = f"RoPE{self.rope_base:g}"
        return {
            "encoder_args": {
                "encoder_type": "croco",
                "img_size": self.img_size,
                "patch_size": self.patch_size,
                "patch_embed_cls": "ManyAR_PatchEmbed",
                "embed_dim": self.enc_dim,
                "num_heads": self.enc_heads,
                "depth": self.enc_depth,
                "mlp_ratio": self.mlp_ratio,
                "pos_embed": rope,
                "attn_implementation": "flash_attention",
            },
            "decoder_args": {
                "decoder_type": "fast3r",
                "random_image_idx_embedding": self.random_image_index,
                "enc_embed_dim": self.enc_dim,
                "embed_dim": self.fusion_dim,
                "num_heads": self.fusion_heads,
                "depth": self.fusion_depth,
                "mlp_ratio": self.mlp_ratio,
                "qkv_bias": True,
                "drop": 0.0,
                "attn_drop": 0.0,
                "attn_implementation": "flash_attention",
            },
            "head_args": {
                "head_type": "dpt",
                "output_mode": "pts3d",
                "landscape_only": True,
                "depth_mode": list(_OFFICIAL_DEPTH_MODE),
                "conf_mode": list(_OFFICIAL_CONF_MODE),
                "patch_size": self.patch_size,
                "with_local_head": self.with_local_head,
            },
        }


def _expect(args: dict, key: str, value: Any) -> None:
    if key in args and args[key] != value:
        raise ValueError(f"{key}={args[key]!r} is not supported; fast3r implements {key}={value!r}")
