"""ServeConfig: every setting of `deltaw serve`, and the one place its defaults are written."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from deltaw.adapters import parse_adapter_spec
from deltaw.models.loading import BUNDLED_NAME
from deltaw.runtime import native_bf16
from deltaw.serve.engine import PREFILL_CHUNK

SERVE_DTYPES = ("auto", "fp32", "bf16")
MAX_REQUEST_BYTES = 4 * 2**20  # a request body's limit: 4 MiB is ~1M prompt tokens' text, far past any context
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass
class ServeConfig:
    """How `deltaw serve` runs (the `deltaw serve` flags).

    Attributes:
        model: base model; clients select it by this name (a directory's last component for a path).
        adapter: NAME=DIR: serve an adapter under a name (repeatable); clients select it with model=NAME. DIR may
            also be a llama.cpp LoRA .gguf file.
        adapters_dir: the directory the admin routes (POST /v1/adapters) may load adapters from, by name.
        host: the address to listen on.
        port: the port to listen on.
        api_key: require 'Authorization: Bearer KEY' on every /v1 route.
        max_resident: adapters held in memory at once; the least recently used beyond are evicted.
        max_batch_size: requests generated together.
        max_model_len: prompt + completion tokens per request.
        prefill_chunk: most prompt tokens prefilled between two decode steps; a longer prompt is prefilled in
            chunks of this size, so it does not stall the requests already generating.
        max_request_bytes: the largest request body accepted; a larger one is answered 413 before it is read.
        dtype: the weights' dtype: fp32, bf16, or auto: bf16 where the CPU multiplies bf16 natively (AVX512-BF16,
            AMX-BF16 or Arm BF16 in /proc/cpuinfo), else fp32.
        log_level: the server log's level.
    """

    model: str = BUNDLED_NAME
    adapter: list[str] = field(default_factory=list, metadata={"repeat": True, "metavar": "NAME=DIR"})
    adapters_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default_factory=lambda: os.environ.get("DELTAW_API_KEY"),
                                metadata={"default_help": "$DELTAW_API_KEY"})
    max_resident: int = 32
    max_batch_size: int = 16
    max_model_len: int = 2048
    prefill_chunk: int = PREFILL_CHUNK
    max_request_bytes: int = MAX_REQUEST_BYTES
    dtype: str = field(default="auto", metadata={"choices": SERVE_DTYPES})
    log_level: str = field(default="info", metadata={"choices": LOG_LEVELS})

    def weights_dtype(self) -> str:
        """The dtype the weights load in: `dtype`, with auto resolved for the CPU this runs on."""
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if native_bf16("cpu") else "fp32"

    def check(self) -> None:
        """Raise ValueError (or FileNotFoundError) for settings that cannot work, before the model loads."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], found {self.port}")
        for name in ("max_resident", "max_batch_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, found {getattr(self, name)}")
        if self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be at least 2, found {self.max_model_len}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"--max-request-bytes must be at least 1024, found {self.max_request_bytes}")
        if self.dtype not in SERVE_DTYPES:
            raise ValueError(f"--dtype must be one of {SERVE_DTYPES}, found {self.dtype!r}")
        if self.adapters_dir is not None and not os.path.isdir(self.adapters_dir):
            raise FileNotFoundError(f"--adapters-dir {self.adapters_dir}: no such directory")
        for spec in self.adapter:
            if not os.path.exists(parse_adapter_spec(spec)[1]):
                raise FileNotFoundError(f"--adapter {spec}: no such adapter directory or .gguf file")
