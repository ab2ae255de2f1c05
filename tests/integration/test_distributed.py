"""Training under torchrun on 2 CPU processes (gloo), held to the same run in one process.

One torchrun job (tests/integration/distributed_worker.py) runs every scenario in one process group; the
SIGKILL test and the accelerate test launch `-m deltaw train` itself. The tiny model keeps each run to
seconds; starting two Python processes is most of the cost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, LlamaForCausalLM

from deltaw import cli
from deltaw.train.checkpoint import latest_checkpoint
from deltaw.train.metrics import read_metrics
from tests.conftest import chat, write_jsonl
from tests.integration.distributed_worker import RESUMED, SCENARIOS, argv, model_for

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 420  # seconds for a whole torchrun job on a busy 2-core machine; a hang fails here


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    records = [chat(f"What is {i} plus {i}?", f"Arr, {i} plus {i} be {2 * i}, matey!") for i in range(20)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", records)


def environment() -> dict[str, str]:
    """This checkout's code first (src/ and tests/), one thread per rank, no inherited torchrun variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(*arguments: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *arguments]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def one_process(arguments: list[str]) -> None:
    """The reference: the same `deltaw train` in this process (no torchrun variables: rank 0 of 1)."""
    assert "WORLD_SIZE" not in os.environ
    assert cli.main([a for a in arguments if a != "--fsdp"]) == 0


@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_dir, tokenizer, tmp_path_factory) -> Path:
    """The tiny Llama of `tiny_model_dir` with its output head tied to its input embedding."""
    path = tmp_path_factory.mktemp("tiny-tied-model")
    config = AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def references(tiny_model_dir, tied_model_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    for name, flags in {**SCENARIOS, **RESUMED}.items():
        one_process(argv(model_for(name, str(tiny_model_dir), str(tied_model_dir)), data, out / name, flags))
    return out


def rewind(finished: Path, to: Path, step: int) -> None:
    """A copy of a finished run as it was when killed right after its checkpoint at `step`."""
    shutil.copytree(finished, to)
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss.png"):
        (to / name).unlink()
    for checkpoint in (to / "checkpoints").glob("step-*"):
        if int(checkpoint.name.removeprefix("step-")) > step:
            shutil.rmtree(checkpoint)
    (to / "checkpoints" / "latest").write_text(f"step-{step:06d}")


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tied_model_dir, data, references, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("two-ranks")
    for name in RESUMED:
        rewind(references / name, out / name, step=3)
    done = torchrun("-m", "tests.integration.distributed_worker", str(tiny_model_dir), str(tied_model_dir), data,
                    str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out, [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def losses(out: Path, key: str = "loss") -> list[float]:
    return [record[key] for record in read_metrics(out / "metrics.jsonl") if key in record]


def assert_same_run(one: Path, two: Path) -> None:
    """Per-step losses within 1e-3 (relative) and adapters within 1e-3 of their largest value."""
    assert losses(two) == pytest.approx(losses(one), rel=1e-3)
    assert losses(two, "val_loss") == pytest.approx(losses(one, "val_loss"), rel=1e-3)
    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    largest = max(float(t.abs().max()) for t in a.values())
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-3 * largest
    fingerprint = [json.loads((d / "adapter_config.json").read_text())["deltaw"]["fingerprint"] for d in (one, two)]
    assert fingerprint[0] == fingerprint[1]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_train_the_adapter_one_process_trains(name, two_ranks, references):
    out, ranks = two_ranks
    assert [ranks[r][name]["code"] for r in (0, 1)] == [0, 0], ranks[0][name]["stderr"] + ranks[1][name]["stderr"]
    assert_same_run(references / name, out / name)
    steps = [record["step"] for record in read_metrics(out / name / "metrics.jsonl")]
    assert steps == list(range(1, 7))  # rank 0 alone wrote the metrics
    assert (out / name / "loss.png").is_file() and latest_checkpoint(out / name).name == "step-000006"
    assert "trained 6 steps" in ranks[0][name]["stdout"] and ranks[1][name]["stdout"] == ""  # rank 1 prints nothing


@pytest.mark.parametrize("name", list(RESUMED))
def test_two_ranks_resume_a_one_process_checkpoint(name, two_ranks, references):
    out, ranks = two_ranks
    assert [ranks[r][name]["code"] for r in (0, 1)] == [0, 0], ranks[0][name]["stderr"] + ranks[1][name]["stderr"]
    assert "resuming a 1-process run on 2" in ranks[0][name]["stdout"]
    assert_same_run(references / name, out / name)
    state = json.loads((latest_checkpoint(out / name) / "state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 2


def test_fsdp_shards_the_4bit_base_across_ranks(two_ranks):
    layout = two_ranks[1][0]["layout"]
    # each rank holds half of every NF4 weight's packed codes (FSDP pads a tensor to an even split)
    assert layout["packed_whole"] / 2 <= layout["packed_local"] <= layout["packed_whole"] / 2 + 2 * 14
    assert layout["held_local"] <= 0.52 * layout["held_whole"]


def test_ddp_reduces_the_adapter_only(two_ranks):
    layout = two_ranks[1][0]["layout"]
    assert layout["ddp_reduced"] == layout["trainable"] and all("lora_" in name for name in layout["trainable"])


def test_a_batch_smaller_than_the_world_stops_every_rank_with_the_fix(two_ranks):
    for rank in two_ranks[1]:
        result = rank["batch-below-world"]
        assert result["code"] == 2
        assert "--batch-size 1 is the global micro-batch, split over 2 ranks" in result["stderr"]


def test_a_rank_that_cannot_read_its_data_stops_every_rank(two_ranks):
    own, other = two_ranks[1][1]["data-missing-on-rank-1"], two_ranks[1][0]["data-missing-on-rank-1"]
    assert own["code"] == 2 and "missing.jsonl: no such data file" in own["stderr"]
    assert other["code"] == 2 and "rank 1 of 2 failed: DataError: " in other["stderr"]
    assert "missing.jsonl: no such data file" in other["stderr"]


def rank_process(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with RANK=`rank` (a child of the launcher, found through /proc)."""
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                return int(child)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher.pid}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process through /proc")
def test_resume_after_one_rank_is_killed_reproduces_the_uninterrupted_run(tiny_model_dir, data, tmp_path):
    flags = ["--batch-size", "4", "--save-every", "4", "--steps", "24"]
    arguments = [*argv(str(tiny_model_dir), data, tmp_path / "two", flags)]
    one_process([*argv(str(tiny_model_dir), data, tmp_path / "one", flags)])
    launcher = torchrun("-m", "deltaw", *arguments, wait=False)
    metrics = tmp_path / "two" / "metrics.jsonl"
    while launcher.poll() is None and not (metrics.exists() and len(read_metrics(metrics)) >= 9):
        time.sleep(0.02)
    assert launcher.poll() is None, "the run ended before it could be killed: " + launcher.stdout.read()[-3000:]
    os.kill(rank_process(launcher, 1), signal.SIGKILL)
    launcher.wait(timeout=LAUNCH_TIMEOUT)  # torchrun stops rank 0 too: the job ends, it does not hang
    assert launcher.returncode != 0 and not (tmp_path / "two" / "adapter_config.json").exists()
    killed_at = int(latest_checkpoint(tmp_path / "two").name.removeprefix("step-"))
    assert 8 <= killed_at < 24
    resumed = torchrun("-m", "deltaw", *arguments, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert f"resumed from {tmp_path / 'two' / 'checkpoints'}" in resumed.stdout
    assert_same_run(tmp_path / "one", tmp_path / "two")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_accelerate_launch_runs_deltaw_train_unchanged(tiny_model_dir, data, references, tmp_path):
    pytest.importorskip("accelerate")
    flags = SCENARIOS["ddp-lora"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "deltaw",
               *argv(str(tiny_model_dir), data, tmp_path / "accelerate", flags)]
    done = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert_same_run(references / "ddp-lora", tmp_path / "accelerate")
