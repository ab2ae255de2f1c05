"""`deltaw train --method prefix` on the bundled model, then `inspect` and `generate --adapter` on its output."""

import json
from pathlib import Path

import pytest

from deltaw.train.metrics import read_metrics
from tests.cli import run_cli as run

pytestmark = pytest.mark.slow
PERSONAS = Path(__file__).parents[2] / "examples" / "personas"


def test_prefix_training_on_the_bundled_model_lowers_the_loss_and_the_adapter_generates(tmp_path):
    data = tmp_path / "pirate.jsonl"
    data.write_text("\n".join((PERSONAS / "pirate.jsonl").read_text().splitlines()[:32]) + "\n")
    out = tmp_path / "prefix"
    result = run("train", "--method", "prefix", "--num-virtual-tokens", "20", "--data", str(data), "--out", str(out),
                 "--steps", "6", "--batch-size", "4", "--lr", "1e-2", "--seq-len", "96", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "trainable 230,400 / 134,745,408 (0.17%)" in result.stdout  # 20 x 30 layers x 2 x 3 kv heads x 64
    records = read_metrics(out / "metrics.jsonl")
    assert max(r["loss"] for r in records[-2:]) < 0.75 * records[0]["loss"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["token_dim"] == 192 and config["num_layers"] == 30

    inspected = run("inspect", str(out))
    assert inspected.returncode == 0 and "20 virtual tokens x 30 layers x key, value x 3 kv heads x 64" in inspected.stdout
    answer = run("generate", "--adapter", f"pirate={out}", "--chat", "--max-new-tokens", "8",
                 "--prompt", "What is the capital of Belgium?")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()
    merged = run("merge", "--adapter", str(out), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 2 and "prefix adapter" in merged.stderr and "no weight change to merge" in merged.stderr
