"""Shared pieces of the training tests: a small model and a config that trains it on the CPU in seconds."""

from __future__ import annotations

import torch

from fast3r.train import TrainConfig

# Small enough for 0.3 s steps on 2 CPU cores at 4 views of 224 x 224; every part of the large model is there
# (RoPE encoder, fusion with hooks at 0, 2, 3, 4, both DPT heads).
SMALL_MODEL = {"enc_dim": 64, "enc_depth": 2, "enc_heads": 2, "fusion_dim": 64, "fusion_depth": 4, "fusion_heads": 2,
               "head_feature_dim": 32, "head_layer_dims": [16, 32, 64, 128]}
SCENES = [{"format": "synthetic", "scenes": 2, "seed": 0}]
HELD_OUT = [{"format": "synthetic", "scenes": 2, "seed": 100}]
ONE_HELD_OUT_SAMPLE = [{"format": "synthetic", "scenes": 1, "seed": 100, "samples": 1}]  # a validation in ~1 s


def small_config(out, **changes) -> TrainConfig:
    values = {"model": SMALL_MODEL, "data": SCENES, "views": 4, "val_views": 4, "size": 224, "steps": 10,
              "lr": 1e-3, "warmup": 0, "precision": "fp32", "backend": "torch", "device": "cpu", "workers": 0,
              "out": str(out), "log_every": 1, "save_every": 1000}
    return TrainConfig.from_dict({**values, **changes})


def one_cpu_thread():
    """For a test's duration, one intra-op thread: on a shared 2-core machine, OpenMP's spinning threads make
    these small steps 6x slower with 2 threads than with 1 (measured); CI's cores are shared the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
