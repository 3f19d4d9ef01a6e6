"""Training: many dictionaries at once from an activation store, with checkpoints and resume."""

from openscope.train.trainer import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
