"""``TrainConfig``: every setting of a training run, read from YAML and checked once, before any work.

The keys are flat (``views``, ``lr``, ``checkpointing`` ...) as ``fast3r train --set key=value``
writes them; the dataclass groups them by what they control. An unknown key is an error that
names the nearest valid key (a typo must not silently train with a default); a bad value is an
error that names the key, the value and what is allowed. PyYAML reads ``1e-4`` as a string
(YAML 1.1 wants ``1.0e-4``): numeric strings are accepted for numeric keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import Fast3RConfig

PRESETS = ("large", "tiny")
BACKENDS = ("auto", "torch", "triton")
DEVICES = ("auto", "cpu", "cuda")
SIZES = (224, 512)
# bf16-mixed: fp32 master weights, the forward under bf16 autocast. official: fp32 everywhere except the
# attention, whose q, k, v are cast to bf16 inside every block (as the official training runs).
# fp32: no reduced precision at all (CPU runs, gradient checks).
PRECISIONS = ("bf16-mixed", "official", "fp32")
CHECKPOINTING = ("none", "blocks", "full")  # fast3r.train.activation_checkpointing says what each keeps
FREEZABLE = ("encoder", "fusion", "head", "local_head")
IMAGE_IDS = ("random", "sequential")
VAL_CAMERAS = ("procrustes", "pnp")
# Keys a resumed run may change: they steer logging and bookkeeping, not the arithmetic of a step.
# ``steps`` may grow too, but it reshapes the cosine schedule (the loop warns).
RESUMABLE_KEYS = ("steps", "val_every", "save_every", "log_every", "workers", "keep_checkpoints",
                  "max_bad_batches", "out")


class ConfigError(ValueError):
    """A training config key or value is wrong; the message names it and what would be accepted."""


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Defaults follow the official Fast3R training where it has one."""

    # ---- the model
    model: str | dict = "large"  # a preset ("large", "tiny"), a checkpoint directory / hub id, or Fast3RConfig fields
    backend: str = "auto"  # auto: triton on a GPU, torch on the CPU
    device: str = "auto"
    # ---- data (entries for fast3r.train.data.build_dataset)
    data: tuple[dict, ...] = ()
    val_data: tuple[dict, ...] = ()
    views: int = 20  # per training sample (official: 20)
    val_views: int = 10  # per validation sample (official: 10)
    size: int = 512
    batch_size: int = 1  # samples per rank per micro-step
    workers: int = 4  # DataLoader worker processes per rank
    shuffle: bool = True
    image_ids: str = "random"  # official training: view 0 -> 0, the others drawn from 1..999
    # ---- optimization (official: AdamW 1e-4, betas (0.9, 0.95), wd 0.05, warm-up then cosine to 1e-6)
    steps: int = 1000
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup: int = 0  # steps of linear warm-up
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_accum: int = 1
    clip: float | None = None  # max gradient norm; None: no clipping (as the official training)
    freeze: tuple[str, ...] = ()
    # ---- memory
    precision: str = "bf16-mixed"
    checkpointing: str = "none"
    encoder_chunk: int | None = None  # views per encoder pass (default: from free memory)
    head_chunk: int | None = None  # views per head pass (default: from free memory)
    # ---- speed
    # Fast3R.compile(): each encoder block, fusion block and head compiled (regional torch.compile); the first
    # steps pay the compilation, a new view count or resolution recompiles once.
    compile: bool = False
    # ---- bookkeeping
    out: str = "runs/fast3r"
    seed: int = 0
    # Deterministic kernels (torch.use_deterministic_algorithms): needed for bit-exact resume; without it, CPU
    # convolution weight gradients reduce across threads in varying order and differ in the last bits.
    deterministic: bool = False
    log_every: int = 10
    val_every: int = 0  # 0: validate only before the first and after the last step (if val_data is given)
    val_cameras: str = "procrustes"
    save_every: int = 1000
    keep_checkpoints: int = 2
    max_bad_batches: int = 10  # batches with NaN/Inf ground truth skipped before the run stops

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _CHECKS[f.name](f.name, getattr(self, f.name)))
        if not self.data:
            raise ConfigError("data is empty: list at least one dataset entry, e.g. "
                              "data: [{format: synthetic, scenes: 64}] or [{format: colmap, path: DIR}]")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr={self.min_lr} is above lr={self.lr}; the cosine schedule decays from lr "
                              "to min_lr")
        if self.warmup >= self.steps:
            raise ConfigError(f"warmup={self.warmup} must be below steps={self.steps}")

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        if not isinstance(values, Mapping):
            raise ConfigError(f"a training config is a mapping of keys to values, got {type(values).__name__}")
        for key in values:
            check_key(key)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
        """Read a YAML file of training keys, then apply ``key=value`` overrides; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(values, Mapping):
            raise ConfigError(f"{path} holds a YAML {type(values).__name__}; expected a mapping of training keys")
        try:
            return cls.from_dict({**values, **parse_overrides(overrides)})
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    def with_overrides(self, assignments: Sequence[str]) -> TrainConfig:
        """Apply ``key=value`` strings (values in YAML syntax: ``lr=3e-5``, ``freeze=[encoder]``)."""
        return TrainConfig.from_dict({**self.to_dict(), **parse_overrides(assignments)})

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = [dict(v) for v in value] if f.name in ("data", "val_data") else \
                list(value) if isinstance(value, tuple) else value
        return out

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # ---------------------------------------------------------------- the model
    def model_config(self) -> Fast3RConfig | None:
        """The architecture to build from scratch, or None when ``model`` names a checkpoint to fine-tune."""
        return architecture(self.model)


def architecture(model: str | Mapping[str, Any]) -> Fast3RConfig | None:
    """A preset name or a mapping of Fast3RConfig fields (optionally ``preset: NAME`` plus overrides) -> config."""
    if isinstance(model, Mapping):
        values = dict(model)
        base = values.pop("preset", None)
        return Fast3RConfig.from_dict({**(Fast3RConfig.preset(base).to_dict() if base else {}), **values})
    return Fast3RConfig.preset(model) if model in PRESETS else None


KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def parse_overrides(assignments: Sequence[str]) -> dict[str, Any]:
    """``["lr=3e-5", "freeze=[encoder]"]`` -> {"lr": "3e-5", "freeze": ["encoder"]} (values read as YAML)."""
    values = {}
    for text in assignments:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set lr=3e-5")
        key = key.strip()
        check_key(key)
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {text!r}: the value is not valid YAML ({err})") from err
    return values
# What other trainers (and the official Hydra configs) call some of our keys; spelling is not close enough for difflib.
ALIASES = {"learning_rate": "lr", "num_views": "views", "num_views_val": "val_views", "max_steps": "steps",
           "batch_size_per_device": "batch_size", "num_workers": "workers", "gradient_clip_val": "clip",
           "accumulate_grad_batches": "grad_accum", "warmup_steps": "warmup", "eta_min": "min_lr",
           "output_dir": "out", "resolution": "size", "activation_checkpointing": "checkpointing"}


def check_key(key: object) -> None:
    if key in KEYS:
        return
    nearest = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(str(key), KEYS, n=1, cutoff=0.5)
    if not nearest:
        nearest = difflib.get_close_matches(str(key), list(ALIASES), n=1, cutoff=0.6)
        nearest = [ALIASES[nearest[0]]] if nearest else []
    hint = f"did you mean {nearest[0]!r}? " if nearest else ""
    raise ConfigError(f"unknown training config key {key!r}; {hint}valid keys: {', '.join(KEYS)}")


# ------------------------------------------------------------------------------------ value checks
def _integer(minimum: int, optional: bool = False):
    def check(key: str, value: Any):
        if value is None and optional:
            return None
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            allowed = f"an integer >= {minimum}" + (" or null" if optional else "")
            raise ConfigError(f"{key}={value!r} is not {allowed}")
        return value

    return check


def _number(minimum: float, *, above: bool = False, optional: bool = False):
    def check(key: str, value: Any):
        if value is None and optional:
            return None
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or number < minimum or (above and number == minimum):
            allowed = f"a number {'>' if above else '>='} {minimum:g}" + (" or null" if optional else "")
            raise ConfigError(f"{key}={value!r} is not {allowed}")
        return float(number)

    return check


def _choice(choices: Sequence[Any]):
    def check(key: str, value: Any):
        if value not in choices:
            raise ConfigError(f"{key}={value!r}; choose one of {', '.join(map(str, choices))}")
        return value

    return check


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not true or false")
    return value


def _text(key: str, value: Any) -> str:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(f"{key}={value!r} is not a path")
    return str(value)


def _model(key: str, value: Any) -> str | dict:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping):
        try:
            architecture(value)  # the fields are checked now, not when the run has started
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model: {err}") from err
        return dict(value)
    raise ConfigError(f"model={value!r}: give a preset ({', '.join(PRESETS)}), a checkpoint directory or hub id, "
                      "or a mapping of Fast3RConfig fields (optionally with preset: NAME)")


def _entries(key: str, value: Any) -> tuple[dict, ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ConfigError(f"{key} must be a list of dataset entries (mappings with a 'format' key), got {value!r}")
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping) or "format" not in entry:
            raise ConfigError(f"{key}[{i}]={entry!r} is not a dataset entry: a mapping with a 'format' key, e.g. "
                              "{format: colmap, path: DIR} or {format: synthetic, scenes: 64}")
    return tuple(dict(entry) for entry in value)


def _betas(key: str, value: Any) -> tuple[float, float]:
    numbers = _number(0.0)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ConfigError(f"{key}={value!r} is not a pair [beta1, beta2], e.g. [0.9, 0.95]")
    betas = tuple(numbers(key, v) for v in value)
    if not all(b < 1 for b in betas):
        raise ConfigError(f"{key}={value!r}: both betas must be in [0, 1)")
    return betas


def _freeze(key: str, value: Any) -> tuple[str, ...]:
    if value is None or value == "none":
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or any(part not in FREEZABLE for part in value):
        raise ConfigError(f"{key}={value!r}; list parts to freeze from {', '.join(FREEZABLE)} (e.g. [encoder])")
    return tuple(dict.fromkeys(value))


_CHECKS = {
    "model": _model, "backend": _choice(BACKENDS), "device": _choice(DEVICES),
    "data": _entries, "val_data": _entries, "views": _integer(1), "val_views": _integer(2),
    "size": _choice(SIZES), "batch_size": _integer(1), "workers": _integer(0), "shuffle": _boolean,
    "image_ids": _choice(IMAGE_IDS),
    "steps": _integer(1), "lr": _number(0.0, above=True), "min_lr": _number(0.0), "warmup": _integer(0),
    "weight_decay": _number(0.0), "betas": _betas, "grad_accum": _integer(1),
    "clip": _number(0.0, above=True, optional=True), "freeze": _freeze,
    "precision": _choice(PRECISIONS), "checkpointing": _choice(CHECKPOINTING),
    "encoder_chunk": _integer(1, optional=True), "head_chunk": _integer(1, optional=True), "compile": _boolean,
    "out": _text, "seed": _integer(0), "deterministic": _boolean, "log_every": _integer(1), "val_every": _integer(0),
    "val_cameras": _choice(VAL_CAMERAS), "save_every": _integer(1), "keep_checkpoints": _integer(1),
    "max_bad_batches": _integer(0),
}
