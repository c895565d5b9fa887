"""Fast3R in PyTorch: reference model, checkpoint loading, training loss."""

from . import export, metrics
from .cameras import estimate_cameras
from .checkpoint import CheckpointError
from .config import Fast3RConfig
from .images import load_images
from .loss import fast3r_loss
from .model import Fast3R

__all__ = ["CheckpointError", "Fast3R", "Fast3RConfig", "estimate_cameras", "export", "fast3r_loss", "load_images",
           "metrics"]
