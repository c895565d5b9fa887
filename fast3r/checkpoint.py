"""Reading and writing Fast3R checkpoints in the official format.

A checkpoint is a directory with ``config.json`` (the official three argument dicts)
and ``model.safetensors`` (or a ``.pth``/``.bin`` state dict, read without running any
pickled code). Loading is strict: every parameter must be present with its exact shape.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from .config import Fast3RConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "model.pth", "model.bin", "pytorch_model.pth")


class CheckpointError(ValueError):
    """The checkpoint does not match the model: names the offending keys."""


def resolve(path_or_repo_id: str | os.PathLike) -> tuple[Path, Path | None]:
    """-> (weights file, config.json or None) for a local directory/file or a Hugging Face hub id."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        weights = _weights_in(path)
        config = path / CONFIG_NAME
        return weights, config if config.is_file() else None
    if path.is_file():
        config = path.parent / CONFIG_NAME
        return path, config if config.is_file() else None
    return _download(str(path_or_repo_id))


def _weights_in(directory: Path) -> Path:
    for name in (SAFETENSORS_NAME, *PICKLE_NAMES):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"no weights in {directory}: expected {SAFETENSORS_NAME} or one of {', '.join(PICKLE_NAMES)}"
    )


def _download(repo_id: str) -> tuple[Path, Path | None]:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise FileNotFoundError(f"{repo_id!r} is neither an existing file or directory nor a hub id like 'org/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path; to download it from the Hugging Face hub, "
            "`pip install huggingface_hub` (or download the files and pass their directory)"
        ) from err
    directory = Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, *PICKLE_NAMES]))
    weights = _weights_in(directory)
    config = directory / CONFIG_NAME
    return weights, config if config.is_file() else None


def read_config(path: Path) -> Fast3RConfig:
    with open(path) as f:
        raw = json.load(f)
    try:
        return Fast3RConfig.from_official_args(raw["encoder_args"], raw["decoder_args"], raw["head_args"])
    except KeyError as err:
        raise CheckpointError(f"{path} lacks {err}; expected the official encoder_args/decoder_args/head_args") from err


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that needs code execution to unpickle "
            f"({str(err).splitlines()[0]}). Re-save it as a plain state dict or as safetensors."
        ) from err
    return _unwrap(state, path)


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one nested under 'model' / 'state_dict' (training checkpoints)."""
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` (which may live on the meta device: tensors are assigned, not copied).

    Raises one error naming every missing, extra or mis-shaped key.

    Parameters the model shares under two names (the DPT ``layer1_rn`` / ``layer_rn.0``
    convolutions) need only one of the names in the checkpoint, as safetensors writes them.
    """
    expected = model.state_dict()
    groups = _alias_groups(model)
    missing = sorted(g[0] for g in groups if not any(name in state for name in g))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:
        parts = [f"{title} ({len(keys)}): {', '.join(keys)}" for title, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshaped)) if keys]
        raise CheckpointError(f"checkpoint {source} does not fit this Fast3R config; " + "; ".join(parts))
    # Where a checkpoint holds several aliases, the last one wins, as with nn.Module.load_state_dict.
    complete = {name: state[[n for n in g if n in state][-1]] for g in groups for name in g}
    model.load_state_dict(complete, strict=True, assign=True)


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the parameter object they refer to (works on meta tensors too)."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(name)
    return list(by_tensor.values())


def save(model: nn.Module, config: Fast3RConfig, directory: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors; each file is staged beside the target and moved in whole."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with open(staging / CONFIG_NAME, "w") as f:
            json.dump(config.to_official_args(), f, indent=2)
        save_model(model, str(staging / SAFETENSORS_NAME), metadata={"format": "pt"})
        target.mkdir(exist_ok=True)
        for name in (CONFIG_NAME, SAFETENSORS_NAME):
            os.replace(staging / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
