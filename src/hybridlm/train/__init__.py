"""Training: optimizer, learning-rate schedule, the training loop."""

from hybridlm.train.trainer import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
