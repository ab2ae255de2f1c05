"""Training checkpoints that survive a crash at any instant, in safetensors and JSON only (no pickle).

    OUT/checkpoints/step-000050/
        adapter_config.json, adapter_model.safetensors   the adapter (PEFT layout)
        parameters.safetensors                           the trainable parameters by name (what resume restores)
        optimizer.safetensors                            AdamW moments and step per parameter name
        rng.safetensors                                  torch CPU (and CUDA) generator states
        state.json                                       step, data position, scheduler, param groups, run config
    OUT/checkpoints/latest                               the name of the newest complete checkpoint

A checkpoint is written into a temporary directory, flushed to disk, then renamed into place, and only
then does `latest` (itself replaced atomically) point at it; older checkpoints are pruned after that.
A process killed at any point leaves the previous checkpoint intact and `latest` pointing at it.

Under torchrun every rank takes part (sharded tensors are gathered whole, each rank's RNG state is
collected) and rank 0 alone writes. Tensors are stored whole and the data position is global, so every
rank resumes from the same files, with the same number of ranks or another (state.json records the
world size; rng.safetensors holds rank r's generators under `rank<r>.`, rank 0's under the plain keys).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltaw.adapters import save_adapter
from deltaw.train.distributed import Ranks
from deltaw.train.parallel import full, shard_like, whole_parameters

LATEST = "latest"
PARAMETERS_FILE = "parameters.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says what to do."""


def checkpoints_dir(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(
    out: str | os.PathLike,
    model: nn.Module,
    adapter: str,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict,
    keep: int = 2,
    ranks: Ranks | None = None,
) -> Path | None:
    """Write a checkpoint for `state["step"]` atomically; keep the newest `keep` checkpoints.

    Call it on every rank (it gathers); rank 0 writes and returns the path, the others return None.
    """
    ranks = ranks or Ranks()
    names = parameter_names(model, optimizer)
    moments = optimizer_tensors(optimizer, names)
    generators = gathered_rng(ranks)
    with whole_parameters(model):
        if not ranks.main:
            return None
        root = checkpoints_dir(out)
        root.mkdir(parents=True, exist_ok=True)
        name = f"step-{state['step']:06d}"
        staging = root / f".tmp-{name}"
        shutil.rmtree(staging, ignore_errors=True)
        save_adapter(model, staging, adapter)
        params = dict(model.named_parameters())
        save_file({key: params[key].detach().cpu().contiguous() for key in names}, str(staging / PARAMETERS_FILE))
    save_file(moments, str(staging / "optimizer.safetensors"))
    save_file(generators, str(staging / "rng.safetensors"))
    record = {
        **state,
        "world_size": ranks.world,
        "scheduler": scheduler.state_dict(),
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]],
    }
    (staging / "state.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    _fsync_tree(staging)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _write_atomic(root / LATEST, name)
    _prune(root, keep)
    return final


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under OUT, or None."""
    pointer = checkpoints_dir(out) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoints_dir(out) / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete; "
                              f"delete {checkpoints_dir(out)} to start over")
    return path


def load_checkpoint(
    path: Path,
    model: nn.Module,
    adapter: str,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ranks: Ranks | None = None,
) -> dict:
    """Restore adapter weights, optimizer, scheduler and this rank's RNG from `path`; return its state dict."""
    ranks = ranks or Ranks()
    state = json.loads((path / "state.json").read_text())
    names = parameter_names(model, optimizer)
    if not (path / PARAMETERS_FILE).is_file():
        raise CheckpointError(f"{path}: no {PARAMETERS_FILE} (written by an older deltaw); start a new run in "
                              "another --out")
    restore_parameters(model, names, load_file(str(path / PARAMETERS_FILE)))
    tensors = load_file(str(path / "optimizer.safetensors"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.load_state_dict({
        "state": {
            index: {part: _moment(tensors[f"{name}.{part}"], part, params[index]) for part in MOMENTS}
            for index, name in enumerate(names) if f"{name}.step" in tensors
        },
        "param_groups": [{**group, "params": list(range(len(names)))} for group in state["param_groups"]],
    })
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(load_file(str(path / "rng.safetensors")), ranks)
    return state


MOMENTS = ("step", "exp_avg", "exp_avg_sq")


def _moment(value: torch.Tensor, part: str, param: torch.Tensor) -> torch.Tensor:
    """An AdamW state tensor laid out like its parameter (sharded under FSDP); the step count stays as it is."""
    return value if part == "step" else shard_like(value, param)


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The model's name of each optimized parameter, in optimizer order."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """AdamW's state by `<parameter name>.<part>`, whole (gathered when sharded: call it on every rank)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tensors = {}
    for name, param in zip(names, params):
        for part, value in optimizer.state.get(param, {}).items():
            tensors[f"{name}.{part}"] = full(value).detach().cpu().contiguous()
    return tensors


def restore_parameters(model: nn.Module, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Copy the checkpoint's trainable parameters (by model parameter name) into `model`."""
    params = dict(model.named_parameters())
    for name in names:
        if name not in tensors or tensors[name].shape != params[name].shape:  # a DTensor's shape is the whole one
            raise CheckpointError(f"checkpoint lacks parameter {name!r} (or holds another shape); it belongs to "
                                  "another run (other --method or adapter settings?)")
        with torch.no_grad():
            params[name].copy_(shard_like(tensors[name], params[name]))


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = rng
    return tensors


def gathered_rng(ranks: Ranks) -> dict[str, torch.Tensor]:
    """`rng_tensors()` of this process and, in a distributed run, every rank's CPU generator and that of its own
    GPU under `rank<r>.cpu` and `rank<r>.cuda` (a collective: call it on every rank)."""
    tensors = rng_tensors()
    if not ranks.distributed:
        return tensors
    own = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(ranks.device)] if ranks.device.type == "cuda" else [])
    for rank, row in enumerate(ranks.gather(torch.cat(own))):
        for device, state in zip(("cpu", "cuda"), row.split([len(state) for state in own])):
            tensors[f"rank{rank}.{device}"] = state
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor], ranks: Ranks | None = None) -> None:
    """Restore this process's generators: its rank's when the checkpoint holds them, else the plain keys (a
    checkpoint of one process, or a rank beyond the world size it was written with, which continues rank 0's)."""
    own = f"rank{ranks.rank}." if ranks is not None and f"rank{ranks.rank}.cpu" in tensors else None
    if own is None:
        torch.set_rng_state(tensors["cpu"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if cuda and torch.cuda.is_available() and (ranks is None or not ranks.distributed):
            torch.cuda.set_rng_state_all(cuda)
        return
    torch.set_rng_state(tensors[own + "cpu"])
    if own + "cuda" in tensors and ranks.device.type == "cuda":
        torch.cuda.set_rng_state(tensors[own + "cuda"], ranks.device)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _fsync_tree(directory: Path) -> None:
    for file in directory.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
