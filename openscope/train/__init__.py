"""Training: many dictionaries at once from an activation store, with checkpoints and resume;
cross-layer transcoders (`train_clt`, reached through `train` with kind clt/skip_clt). Both trainers
run on `openscope.train.loop`; their steps are in `openscope.train.steps`."""

from openscope.train.clt import train_clt
from openscope.train.config import TrainConfig, TrainResult
from openscope.train.trainer import train

__all__ = ["TrainConfig", "TrainResult", "train", "train_clt"]
