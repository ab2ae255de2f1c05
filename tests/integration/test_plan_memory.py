"""`deltaw plan` against the measured peak memory of real `deltaw train` runs on the bundled model."""

import subprocess
import sys
from pathlib import Path

import pytest

from deltaw.tools.plan import model_plan

pytestmark = pytest.mark.slow
PIRATE = Path(__file__).parents[2] / "examples" / "personas" / "pirate.jsonl"
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child forked from this test process
# (which holds the bundled model) would report the parent's peak. VmHWM belongs to the new address space.
MEASURE = ("import sys; from deltaw.cli import main; code = main(sys.argv[1:]); "
           "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
           "print('PEAK_KIB', peak); sys.exit(code)")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_plan_is_within_20_percent_of_a_real_runs_peak_memory(dtype, tmp_path):
    """8 x 64 tokens: a shape the allocator-overhead factor was not fitted on."""
    command = [sys.executable, "-c", MEASURE, "train", "--data", str(PIRATE), "--out", str(tmp_path / "run"),
               "--steps", "3", "--batch-size", "8", "--seq-len", "64", "--packing", "--dtype", dtype, "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    measured = int(result.stdout.split("PEAK_KIB")[1].split()[0]) * 1024
    estimate = model_plan("smollm2-135m-instruct", rank=16, batch=8, seq_len=64, dtype=dtype).rows[1].total
    assert 0.8 * measured <= estimate <= 1.2 * measured, f"estimate {estimate / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"
