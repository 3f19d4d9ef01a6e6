"""Training: many dictionaries at once from an activation store, with checkpoints and resume;
cross-layer transcoders (`train_clt`, reached through `train` with kind clt/skip_clt)."""

from openscope.train.clt import train_clt
from openscope.train.trainer import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train", "train_clt"]
