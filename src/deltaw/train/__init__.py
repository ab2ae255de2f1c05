"""Training: JSONL data -> the one loop (AdamW on the adapter only) -> checkpoints -> a PEFT-layout adapter.

    config.py      TrainConfig: every setting and its default (the `deltaw train` flags)
    data.py        JSONL -> token ids and loss masks
    losses.py      the chunked frozen-head cross-entropy
    loop.py        train(): the loop, validation, NaN stops
    checkpoint.py  crash-safe checkpoints and exact resume
    metrics.py     metrics.jsonl and loss.png
"""

from deltaw.train.config import TrainConfig
from deltaw.train.loop import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train"]
