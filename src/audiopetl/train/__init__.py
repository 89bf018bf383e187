"""Training: the per-split loop, run orchestration, checkpoints and precision choice."""

from .config import LEARNING_RATES, TrainConfig
from .run import ADAPTER, METRICS, is_finished, resolve, resume_run, run_training

__all__ = [
    "ADAPTER", "LEARNING_RATES", "METRICS", "TrainConfig", "is_finished", "resolve", "resume_run", "run_training",
]
