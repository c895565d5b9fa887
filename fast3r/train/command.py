"""``fast3r train CONFIG.yaml [--resume RUN_DIR] [--set key=value ...]``: the training loop from the shell.

``--set`` overrides config keys (values in YAML syntax: ``--set lr=3e-5 --set freeze=[encoder]``).
``--resume RUN_DIR`` continues a run from its latest checkpoint; CONFIG.yaml may then be left out
(the run's saved config is used), and may change only the bookkeeping keys (``steps``, ``val_every``,
...). Under ``torchrun --nproc-per-node N`` every rank runs this. Errors that name bad input are
printed as ``fast3r train: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..checkpoint import CheckpointError
from .config import ConfigError, TrainConfig


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train", help="fine-tune or train Fast3R from a YAML config (fast3r.train)",
        description="Train Fast3R as CONFIG.yaml says (keys: fast3r.train.TrainConfig); writes checkpoints, "
                    "metrics.jsonl, TensorBoard events, curves.png and the final weights (RUN_DIR/model) to out.")
    parser.add_argument("config", nargs="?", type=Path, metavar="CONFIG.yaml",
                        help="training config (optional with --resume: the run's own config.yaml)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run from its latest checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set lr=3e-5 (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Run ``fast3r train``; -> exit status."""
    from .data import DataError
    from .loop import BadGroundTruthError, TrainingDivergedError, train
    from .memory_plan import TrainingOutOfMemoryError
    from .state import ResumeError

    errors = (ConfigError, ResumeError, DataError, CheckpointError, FileNotFoundError, TrainingOutOfMemoryError,
              BadGroundTruthError, TrainingDivergedError)
    try:
        if args.config is None and args.resume is None:
            raise ConfigError("pass a CONFIG.yaml, or --resume RUN_DIR to continue a run")
        config = None
        if args.config is not None:
            config = TrainConfig.from_yaml(args.config, args.overrides)
        elif args.overrides:  # the run's own config, changed
            config = TrainConfig.from_yaml(args.resume / "config.yaml", args.overrides)
        summary = train(config, resume=args.resume)
    except errors as err:
        print(f"fast3r train: error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        print(json.dumps(summary, indent=2))
    return 0
