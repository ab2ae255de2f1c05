"""Every user-caused error of the `deltaw` command is one line naming the problem, with exit status 2:
the probes of issue #18 (bad numbers, unusable --out paths, undecodable data, a missing --model path,
ports), walked one by one on a tiny model in this process."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest

import deltaw
from deltaw.cli import error_line, main
from tests.conftest import write_jsonl

@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """Paths the probes use: the tiny model, good and undecodable data, a plain file, an adapter."""
    root = tmp_path_factory.mktemp("cli-errors")
    (root / "bad.jsonl").write_bytes(json.dumps({"text": "fine"}).encode() + b"\n\xff\xfe not UTF-8\n")
    (root / "file").write_text("a file, not a directory")
    model, _ = deltaw.load_model(tiny_model_dir)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=2))
    deltaw.save_adapter(model, root / "adapter", "default")
    return {"model": str(tiny_model_dir), "data": write_jsonl(root / "data.jsonl", [{"text": "hello world"}] * 4),
            "bad": str(root / "bad.jsonl"), "file": str(root / "file"), "adapter": str(root / "adapter"),
            "root": str(root)}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of `deltaw argv`, argparse's own exits included."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def train(files: dict[str, str], *flags: str, out: str = "{root}/out") -> list[str]:
    return ["train", "--model", files["model"], "--data", files["data"], "--out", out.format(**files),
            "--steps", "1", "--seq-len", "16", "--dtype", "fp32", "--no-progress", *flags]


PROBES = [  # (argv maker, the message's fragment)
    (lambda f: train(f, "--warmup", "-5"), "--warmup must be a finite number >= 0, found -5"),
    (lambda f: train(f, "--lr", "inf"), "--lr must be a finite number > 0, found inf"),
    (lambda f: train(f, "--lr", "-1e-3"), "--lr must be a finite number > 0, found -0.001"),
    (lambda f: train(f, "--lr", "-inf"), "--lr must be a finite number > 0, found -inf"),
    (lambda f: train(f, "--steps", "0"), "--steps must be a finite number >= 1, found 0"),
    (lambda f: train(f, out="{file}/out"), "is a file, not a directory; choose another --out"),
    (lambda f: [*train(f)[:4], f["bad"], *train(f)[5:]], "bad.jsonl:2: not UTF-8 text (byte 0xff at column 1)"),
    (lambda f: ["train", "--model", f"{f['root']}/no-such-model", "--data", f["data"], "--out", f"{f['root']}/o",
                "--steps", "1"], "no-such-model: no such model directory"),
    (lambda f: ["merge", "--model", f["model"], "--adapter", f["adapter"], "--out", f"{f['file']}/merged"],
     "is a file, not a directory"),
    (lambda f: ["quantize", "--model", f["model"], "--out", f"{f['file']}/nf4"], "is a file, not a directory"),
    (lambda f: ["serve", "--model", f["model"], "--port", "70000"], "--port must be in [0, 65535], found 70000"),
]


@pytest.mark.parametrize(("argv", "fragment"), PROBES, ids=[fragment[:40] for _, fragment in PROBES])
def test_a_user_error_is_one_line_and_exit_2(files, capsys, argv, fragment):
    status, err = run_cli(argv(files), capsys)
    command = argv(files)[0]
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.startswith("deltaw")]
    assert len(lines) == 1 and lines[0].startswith(f"deltaw {command}: error: "), err
    assert fragment in lines[0] and "Traceback" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/sys/kernel"),
                    reason="needs Linux's read-only /sys")
@pytest.mark.parametrize("command", ["train", "merge"])
def test_an_out_on_a_read_only_file_system_is_one_line_and_exit_2(files, capsys, command):
    out = "/sys/deltaw-test-out"
    argv = train(files, out=out) if command == "train" else ["merge", "--model", files["model"], "--adapter",
                                                              files["adapter"], "--out", out]
    status, err = run_cli(argv, capsys)
    assert status == 2 and err.splitlines()[-1].startswith(f"deltaw {command}: error: ") and "Traceback" not in err
    assert out in err.splitlines()[-1]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_an_out_in_a_directory_without_write_permission_is_refused_before_work(files, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    status, err = run_cli(train(files, out=str(locked / "out")), capsys)
    assert status == 2 and "cannot write in" in err and "choose another --out" in err


def test_serve_on_a_taken_port_is_one_line_and_exit_2_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, err = run_cli(["serve", "--model", "/no/model/needed", "--port", str(port)], capsys)
    assert status == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"deltaw serve: error: --host 127.0.0.1 --port {port}: cannot listen there")


def test_the_error_line_names_an_os_error_by_its_file_and_keeps_to_one_line():
    assert error_line(OSError(28, "No space left on device", "/out/adapter_model.safetensors")) == \
        "/out/adapter_model.safetensors: No space left on device"
    assert error_line(KeyError("no adapter named 'x'")) == "no adapter named 'x'"
    assert error_line(ValueError("first line\n  second line")) == "first line second line"
