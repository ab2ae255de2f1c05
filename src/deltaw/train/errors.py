"""The error a training run stops with (its own module so that the loop and the distributed set-up share it)."""


class TrainingError(RuntimeError):
    """Training stopped; the message says why, where the last good checkpoint is, and what to try."""
