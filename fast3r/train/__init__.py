"""Fine-tuning Fast3R: ``TrainConfig`` (what to run) and ``train(config)`` (the loop).

    from fast3r.train import TrainConfig, train
    summary = train(TrainConfig.from_yaml("configs/train/finetune_official.yaml"))

``train`` is imported on first use (PEP 562), so that ``fast3r.cli`` can register ``fast3r train``
without importing the loop, its data formats and their libraries.
"""

from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    if name == "train":
        from .loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
