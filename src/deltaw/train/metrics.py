"""Training metrics: one JSON object per optimizer step in metrics.jsonl, and a loss-curve PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    """Appends one JSON line per step; on resume, drops lines past the checkpoint's step first.

    Lines written after the checkpoint by a run that was then killed describe steps that will be
    computed again, so they are removed (the file is rewritten atomically) before appending.
    """

    def __init__(self, path: Path, keep_until_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in read_metrics(path) if line["step"] <= keep_until_step] if path.exists() else []
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(json.dumps(line) + "\n" for line in kept))
        os.replace(temporary, path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file, skipping a torn last line of a killed run."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_losses(metrics_path: Path, png_path: Path) -> Path:
    """Draw training loss (and validation loss where measured) against step into `png_path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", linewidth=1)
    validation = [r for r in records if "val_loss" in r]
    if validation:
        axes.plot([r["step"] for r in validation], [r["val_loss"] for r in validation], "o-", label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats/token)")
    axes.set_title(png_path.parent.name)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
    return png_path
