"""Training: run config, optimizer, schedules, checkpoints, the loop (DDP/FSDP: parallel/)."""

from hybridlm.train.config import TrainConfig, load_train_config
from hybridlm.train.trainer import NonFiniteError, TrainResult, train

__all__ = ["NonFiniteError", "TrainConfig", "TrainResult", "load_train_config", "train"]
