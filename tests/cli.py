"""Running the installed `deltaw` command from tests, in a subprocess as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DELTAW = str(Path(sys.executable).parent / "deltaw")
CLI_TIMEOUT_S = 1800  # a hang, not a slow machine: a bundled-model run takes 1-3 min alone, 10+ on a loaded 2-core box


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`deltaw ARGS...`, its output captured as text."""
    return subprocess.run([DELTAW, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, input=stdin)
