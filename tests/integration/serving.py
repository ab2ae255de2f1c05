"""Helpers for the server tests: random adapters on disk, and a real uvicorn server on a free port."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

import deltaw
from deltaw.serve.app import BackgroundServer, create_app
from deltaw.serve.bank import AdapterBank
from deltaw.serve.engine import Engine
from tests.conftest import randomize_lora_b

API_KEY = "test-key"


def write_random_adapters(model: nn.Module, directory: Path, configs: dict[str, deltaw.LoRAConfig],
                          std: float) -> None:
    """Save one adapter per name into `directory/<name>`: random A (LoRA's init) and random B of scale `std`.

    `model` is left with LoRA layers; pass a copy.
    """
    for seed, (name, config) in enumerate(configs.items(), start=1):
        torch.manual_seed(seed)  # A's init draws from the global generator
        deltaw.add_lora(model, config, name)
        randomize_lora_b(model, name, seed=seed, std=std)
        deltaw.save_adapter(model, directory / name, name)


def adapters_on_disk(model_dir: Path, root: Path) -> tuple[nn.Module, object, Path]:
    """(plain model, tokenizer, adapters dir): random adapters alpha, beta and gamma in `root/adapters`, and
    'escape', a symlink there that leads outside it."""
    adapters_dir, outside = root / "adapters", root / "outside"
    model, tokenizer = deltaw.load_model(model_dir)
    config = deltaw.LoRAConfig(rank=4, alpha=8)
    write_random_adapters(model, adapters_dir, {"alpha": config, "beta": config, "gamma": config}, std=0.5)
    write_random_adapters(model, outside, {"escape": config}, std=0.5)
    os.symlink(outside / "escape", adapters_dir / "escape")
    deltaw.unload(model)
    return model, tokenizer, adapters_dir


@contextlib.contextmanager
def running_server(model: nn.Module, tokenizer, base_name: str, adapters_dir: Path, served: list[str],
                   max_model_len: int = 512, max_batch_size: int = 16, max_resident: int = 8,
                   **app_options) -> Iterator[tuple[str, Engine]]:
    """A real HTTP server (uvicorn, on a thread) over a copy of `model` serving `served` from `adapters_dir`.

    Yields (base URL, engine); the server requires API_KEY. `app_options` go to create_app.
    """
    bank = AdapterBank(copy.deepcopy(model), max_resident=max_resident, adapters_dir=adapters_dir)
    for name in served:
        bank.load(name, adapters_dir / name)
    engine = Engine(bank.model, tokenizer, bank, max_batch_size=max_batch_size, max_model_len=max_model_len)
    engine.start()
    try:
        with BackgroundServer(create_app(engine, bank, tokenizer, base_name, api_key=API_KEY, **app_options)) as url:
            yield url, engine
    finally:
        engine.shutdown()
