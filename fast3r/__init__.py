"""Fast3R in PyTorch: reference model, checkpoint loading, training loss."""

from .checkpoint import CheckpointError
from .config import Fast3RConfig
from .images import load_images
from .loss import fast3r_loss
from .model import Fast3R

__all__ = ["CheckpointError", "Fast3R", "Fast3RConfig", "fast3r_loss", "load_images"]
