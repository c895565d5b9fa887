"""Reading and writing Fast3R checkpoints in the official format.

A checkpoint is a directory with ``config.json`` (the official three argument dicts)
and ``model.safetensors`` (or a ``.pth``/``.bin`` state dict, read without running any
pickled code). Loading is strict: every parameter must be present with its exact shape.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from .config import Fast3RConfig

CONFIG_NAME = "config.json"
# Beside config.json where the official format cannot describe the architecture (it fixes the heads' widths):
# our full Fast3RConfig, which from_pretrained prefers.
ARCHITECTURE_NAME = "fast3r_config.yaml"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "model.pth", "model.bin", "pytorch_model.pth")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not match the model; the message names the file and key."""


class StateDictError(CheckpointError, RuntimeError):
    """A state dict does not fit the model (keys, shapes) or holds NaN / Inf; a RuntimeError too, as torch's is."""


def resolve(path_or_repo_id: str | os.PathLike) -> tuple[Path, Path | None]:
    """-> (weights file, config.json or None) for a local directory/file or a Hugging Face hub id.

    An existing local file or directory always wins. Otherwise a string that is a hub id by form (``owner/name``:
    exactly two names of letters, digits, '-', '_' and '.', no leading './', '../', '/' or '~', no file
    extension) is downloaded, and any other string or ``os.PathLike`` is a missing local path. Because
    ``checkpoints/fast3r`` and ``jedyang97/Fast3R_ViT_Large_512`` have the same form, every error about a hub id
    also says that no such local path exists.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        weights = _weights_in(path)
        config = path / CONFIG_NAME
        return weights, config if config.is_file() else None
    if path.is_file():
        weights_format(path)  # a config or other non-weights file fails here, before its config is looked for
        config = path.parent / CONFIG_NAME
        return path, config if config.is_file() else None
    if isinstance(path_or_repo_id, str) and is_hub_id(path_or_repo_id):
        return _download(path_or_repo_id)
    resolved = f" (resolved to {path.absolute()})" if str(path.absolute()) != str(path_or_repo_id) else ""
    raise FileNotFoundError(
        f"{str(path_or_repo_id)!r} does not exist locally{resolved}{_nearest_existing(path)}. Pass a "
        "checkpoint directory, a weights file, or a Hugging Face hub id of the form 'owner/name'."
    )


HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
FILE_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt", ".ckpt", *CONFIG_SUFFIXES)


def is_hub_id(name: str) -> bool:
    """``owner/name`` as the hub spells ids; a name ending in a weights or config extension is a file path."""
    return HUB_NAME.fullmatch(name) is not None and Path(name).suffix.lower() not in FILE_SUFFIXES


def _nearest_existing(path: Path) -> str:
    """'; data/ exists and holds: a, b' for the deepest existing ancestor of a missing path (typos show up)."""
    parent = path.absolute().parent
    while not parent.is_dir():
        parent = parent.parent
    entries = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    return f"; {parent}{os.sep} exists and holds: {shown or 'nothing'}"


def _weights_in(directory: Path) -> Path:
    for name in (SAFETENSORS_NAME, *PICKLE_NAMES):
        if (directory / name).is_file():
            weights_format(directory / name)
            return directory / name
    raise FileNotFoundError(
        f"no weights in {directory}: expected {SAFETENSORS_NAME} or one of {', '.join(PICKLE_NAMES)}"
    )


def _download(repo_id: str) -> tuple[Path, Path | None]:
    local = Path(repo_id).absolute()
    # An existing owner directory means a mistyped local path far more often than a hub id: show what it holds.
    nearby = _nearest_existing(local) if local.parent.is_dir() else ""
    missing = f"{repo_id!r} is not a local file or directory ({local} does not exist{nearby})"
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise FileNotFoundError(
            f"{missing}; to download it as a Hugging Face hub id, `pip install huggingface_hub` "
            "(or download the files and pass their directory)"
        ) from err
    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, *PICKLE_NAMES]))
    except (OSError, ValueError) as err:  # hub and network errors derive from these
        raise FileNotFoundError(
            f"{missing}, and downloading it as a Hugging Face hub id failed: {str(err).splitlines()[0]}"
        ) from err
    weights = _weights_in(directory)
    config = directory / CONFIG_NAME
    return weights, config if config.is_file() else None


def read_config(path: Path) -> Fast3RConfig:
    """The official config.json -> Fast3RConfig; any parse or content error names the file."""
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err}); it should hold the official encoder_args, decoder_args and "
            "head_args: save the checkpoint again or download its config.json again"
        ) from err
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(raw).__name__}; expected an object with encoder_args, decoder_args and head_args"
        )
    sections = ("encoder_args", "decoder_args", "head_args")
    missing = [k for k in sections if not isinstance(raw.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path} lacks the object(s) {', '.join(missing)}; expected the official "
                              "encoder_args, decoder_args and head_args")
    try:
        return Fast3RConfig.from_official_args(*(raw[k] for k in sections))
    except KeyError as err:
        raise CheckpointError(f"{path} lacks {err}; expected the official encoder_args/decoder_args/head_args") from err
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from err


def weights_format(path: Path) -> str:
    """'safetensors' or 'torch' (a torch.save file), told by the file's first bytes; anything else is refused."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(10)
    suffix = path.suffix.lower()
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or copy? Download or save it again")
    if suffix == ".safetensors" or (int.from_bytes(head[:8], "little") + 8 <= size and head[8:10] == b'{"'):
        return "safetensors"  # an 8-byte header length, then the JSON header
    if head.startswith((b"PK\x03\x04", b"\x80")):  # zip (torch.save) or a legacy pickle
        return "torch"
    if suffix in CONFIG_SUFFIXES or head.lstrip()[:1] in (b"{", b"["):
        raise CheckpointError(
            f"{path} is a config file, not weights; pass the checkpoint directory ({path.parent}), which holds "
            f"{CONFIG_NAME} and {SAFETENSORS_NAME}"
        )
    raise CheckpointError(
        f"{path} is neither safetensors nor a torch.save checkpoint (it starts with {head[:8]!r}); pass "
        f"{SAFETENSORS_NAME}, a .pth/.bin state dict, or the checkpoint directory"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; a damaged or truncated file raises CheckpointError naming it."""
    damaged = f"cannot read {path} ({{}}): the file is damaged or truncated (an interrupted download?); download or save it again"
    if weights_format(path) == "safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise CheckpointError(damaged.format(err)) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise CheckpointError(damaged.format(str(err).splitlines()[0])) from err
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that needs code execution to unpickle "
            f"({str(err).splitlines()[0]}). Re-save it as a plain state dict or as safetensors."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(damaged.format(str(err).splitlines()[0] if str(err) else type(err).__name__)) from err
    return _unwrap(state, path)


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one nested under 'model' / 'state_dict' (training checkpoints)."""
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, *, assign: bool = True):
    """Load ``state`` into ``model``; with ``assign`` (for a model on the meta device) tensors are assigned, not copied.

    Raises one StateDictError naming every missing, extra or mis-shaped key, or every tensor that
    holds NaN or Inf (one such weight makes every output NaN). Parameters the model shares under two
    names (the DPT ``layer1_rn`` / ``layer_rn.0`` convolutions) need only one of the names, as
    safetensors writes them. Returns what ``nn.Module.load_state_dict`` returns.
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
        raise StateDictError(f"checkpoint {source} does not fit this Fast3R config; " + "; ".join(parts))
    nonfinite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if nonfinite:
        shown = ", ".join(nonfinite[:8]) + (f" and {len(nonfinite) - 8} more" if len(nonfinite) > 8 else "")
        raise StateDictError(f"checkpoint {source} holds NaN or Inf in {len(nonfinite)} tensor(s): {shown}; every "
                             "output would be NaN. The file is damaged or comes from a diverged training run: use an "
                             "earlier checkpoint (or download it again)")
    # Where a checkpoint holds several aliases, the last one wins, as with nn.Module.load_state_dict.
    complete = {name: state[[n for n in g if n in state][-1]] for g in groups for name in g}
    return nn.Module.load_state_dict(model, complete, strict=True, assign=assign)


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the parameter object they refer to (works on meta tensors too)."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(name)
    return list(by_tensor.values())


def save(model: nn.Module, config: Fast3RConfig, directory: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors; each file is staged beside the target and moved in whole.

    Plus ``fast3r_config.yaml`` where config.json cannot say it all (the DPT heads' widths), which
    ``Fast3R.from_pretrained`` prefers; a stale one from an earlier save is removed.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with open(staging / CONFIG_NAME, "w") as f:
            json.dump(config.to_official_args(), f, indent=2)
        save_model(model, str(staging / SAFETENSORS_NAME), metadata={"format": "pt"})
        names = [CONFIG_NAME, SAFETENSORS_NAME]
        if not official_form_describes(config):
            config.to_yaml(staging / ARCHITECTURE_NAME)
            names.append(ARCHITECTURE_NAME)
        target.mkdir(exist_ok=True)
        (target / ARCHITECTURE_NAME).unlink(missing_ok=True)
        for name in names:
            os.replace(staging / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def official_form_describes(config: Fast3RConfig) -> bool:
    """Whether config.json alone rebuilds this architecture (the official format fixes the heads' widths)."""
    return Fast3RConfig.from_official_args(**config.to_official_args()) == config
