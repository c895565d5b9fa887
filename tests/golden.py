"""The golden fixtures of the official implementation and the recipe that rebuilds their weights.

Fixtures live in ``../shared/fixtures`` beside the repository (or ``$FAST3R_FIXTURES``);
they are not shipped with the package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from weight_recipe import recipe_state_dict  # noqa: F401 (re-exported: the golden tests load weights with it)

FIXTURES = Path(os.environ.get("FAST3R_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
MODEL_FIXTURES = ("official_tiny_3v_48x64", "official_tiny_mixed_res")
OUTPUT_KEYS = ("pts3d_in_other_view", "conf", "pts3d_local", "conf_local")


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"golden fixture {path} not found: set FAST3R_FIXTURES or place shared/fixtures beside the repo")
    return path


def load_fixture(name: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(fixture_path(f"{name}.safetensors")), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def fixture_model_args(metadata: dict[str, str]) -> dict[str, dict]:
    return json.loads(metadata["config"])


def fixture_views(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[torch.Tensor]:
    return [tensors[f"view{i}.image"] for i in range(int(metadata["views"]))]


def max_relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|: the error relative to the output's own scale."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
