"""Training data for Fast3R: scenes with ground truth, and samples cut from them as the official training does.

    from fast3r.train.data import Scene, load_scene, synthetic_scene, build_dataset, collate, to_model_inputs

- ``load_scene(path, format="colmap" | "folder")``: a COLMAP dense workspace (pycolmap) or a folder of
  images, depth maps and ``cameras.json``; ``save_scene`` writes both. ``synthetic_scene(seed)``: a
  procedural room rendered with exact depth by a small torch ray caster.
- ``build_dataset(entries, views, size, batch_size, seed, split)``: a ``torch.utils.data.Dataset`` whose
  ``dataset[i]`` depends on (seed, i) only; ``collate`` makes batches, ``to_model_inputs`` the model's
  images and the ground truth ``fast3r.fast3r_loss`` takes.
- Bad data raises ``DataError`` naming the scene, file and field; NaN / negative depth is masked and
  counted in each sample's ``masked_pixels``.
"""

from .dataset import SceneDataset, build_dataset, collate, to_model_inputs
from .formats import FORMATS, load_scene, save_scene
from .scene import Camera, DataError, Scene
from .synthetic import synthetic_scene

__all__ = ["FORMATS", "Camera", "DataError", "Scene", "SceneDataset", "build_dataset", "collate", "load_scene",
           "save_scene", "synthetic_scene", "to_model_inputs"]
