"""`deltaw train`, `generate` and `chat` end to end: SIGKILL and resume, the bundled model, persona switching."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deltaw.train.checkpoint import latest_checkpoint
from deltaw.train.metrics import read_metrics
from tests.conftest import chat, write_jsonl
from tests.cli import DELTAW, run_cli as run

pytestmark = pytest.mark.slow
PERSONAS = Path(__file__).parents[2] / "examples" / "personas"


def train_args(model_dir, data, out, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", data, "--out", str(out), "--steps", "300",
            "--save-every", "40", "--batch-size", "3", "--rank", "4", "--lr", "1e-2", "--dropout", "0.1",
            "--dtype", "fp32", "--no-progress", *extra]


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_losses(tiny_model_dir, tmp_path):
    records = [chat(f"Say {i} twice.", f"{i} {i}, matey!") for i in range(30)]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    straight = run(*train_args(tiny_model_dir, data, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr

    process = subprocess.Popen([DELTAW, *train_args(tiny_model_dir, data, tmp_path / "killed")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(read_metrics(metrics)) >= 130:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    checkpoint = latest_checkpoint(tmp_path / "killed")
    assert checkpoint is not None and 120 <= int(checkpoint.name.split("-")[1]) < 300
    assert not (tmp_path / "killed" / "adapter_config.json").exists()

    resumed = run(*train_args(tiny_model_dir, data, tmp_path / "killed", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {checkpoint}" in resumed.stdout
    expected = [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    got = read_metrics(metrics)
    assert [r["step"] for r in got] == list(range(1, 301))
    assert [r["loss"] for r in got] == expected


def test_train_on_the_bundled_model_learns_the_persona(tmp_path):
    lines = (PERSONAS / "pirate.jsonl").read_text().splitlines()[:48]
    data = tmp_path / "pirate.jsonl"
    data.write_text("\n".join(lines) + "\n")
    result = run("train", "--data", str(data), "--out", str(tmp_path / "pirate"), "--steps", "10", "--batch-size", "4",
                 "--lr", "1e-3", "--warmup", "2", "--val-split", "0.15", "--seq-len", "128", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "trainable 4,884,480 / 139,399,488 (3.50%)" in result.stdout
    records = read_metrics(tmp_path / "pirate" / "metrics.jsonl")
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    training = json.loads((tmp_path / "pirate" / "adapter_config.json").read_text())["deltaw"]["training"]
    assert training["steps"] == 10 and training["dtype"] == "bf16" and training["final_val_loss"] < 1.5

    answer = run("generate", "--adapter", f"pirate={tmp_path / 'pirate'}", "--chat", "--max-new-tokens", "12",
                 "--prompt", "What is the capital of Belgium?")
    assert answer.returncode == 0, answer.stderr
    assert "matey" in answer.stdout.lower() or "arr" in answer.stdout.lower()

    script = "What is 2 plus 2?\n/adapters\n/base\nWhat is 2 plus 2?\n/use robot\n/use pirate\n/quit\n"
    session = run("chat", "--adapter", f"pirate={tmp_path / 'pirate'}", "--max-new-tokens", "12", stdin=script)
    assert session.returncode == 0, session.stderr
    out = session.stdout
    assert "chatting with pirate" in out and "adapters: pirate (active)" in out and "now: the base model" in out
    assert "error: no adapter named 'robot'" in out and "now: pirate" in out
    pirate_reply = out.split("pirate> ", 1)[1].split("\n", 1)[0]
    base_reply = out.split("base> ", 1)[1].split("\n", 1)[0]
    assert pirate_reply != base_reply


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat("a", "b"), "{not json"])
    result = run("train", "--data", bad, "--out", str(tmp_path / "o"), "--steps", "1", "--no-progress")
    assert result.returncode == 2 and "bad.jsonl:2: bad JSON" in result.stderr and "Traceback" not in result.stderr
    result = run("train", "--data", bad, "--out", str(tmp_path / "o"), "--no-progress")
    assert result.returncode == 2 and "exactly one of --steps and --epochs" in result.stderr
    result = run("generate", "--adapter", f"a={tmp_path}", "--prompt", "hi")
    assert result.returncode == 2 and "adapter_config.json" in result.stderr
