"""The ranks of a run launched by torchrun: which one this process is, its share of every batch, and the
few collectives the training loop needs. PyTorch's own process group does the work (gloo on CPU, NCCL on CUDA).

    torchrun --nproc-per-node N -m deltaw train ...   (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)

    global micro-batch  [e0 e1 e2 e3 e4 e5]   (--batch-size examples, the same order on every rank)
    rank 0 of 2         [e0    e2    e4   ]   examples r, r+N, r+2N, ...: disjoint, deterministic
    rank 1 of 2         [   e1    e3    e5]
    step's label tokens: summed over ranks, so every rank divides its loss sum by the whole step's count

A process started without torchrun is rank 0 of 1: every collective is the identity, so the training loop is
the same code either way. A collective waits at most `timeout_s` for the other ranks; set-up failures
(a missing data file on one node, a bad flag) are shared first (`Ranks.together`), so every rank stops with
the same clear error instead of waiting for a rank that has already left.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from deltaw.train.errors import TrainingError

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
MESSAGE_BYTES = 2048  # the part of a rank's error message the other ranks get


@dataclass
class Ranks:
    """This process's place in the run; rank 0 of 1 without torchrun.

    Attributes:
        rank: this process's rank, 0..world-1 (rank 0 writes every file).
        world: the number of processes (torchrun's WORLD_SIZE).
        device: where this rank computes: cpu, or cuda:LOCAL_RANK under torchrun.
        owns_group: whether train() created the process group (and so destroys it when done); a process group
            the caller made is left as it was.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics, the plot and the adapter."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group joins this process to others (possibly a world of one under torchrun)."""
        return dist.is_available() and dist.is_initialized()

    def share(self, indices: list[int]) -> tuple[list[int], bool]:
        """This rank's examples of a global micro-batch and whether they count.

        Rank r takes indices[r::world]. A rank left without an example (the last, short micro-batch of an
        epoch) gets the batch's first example back with `counts` False: it runs forward and backward like
        the others (DDP and FSDP need every rank in every collective) and its loss is multiplied by 0.
        """
        mine = indices[self.rank :: self.world]
        return (mine, True) if mine else (indices[:1], False)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over ranks (a copy; float64 keeps token counts and loss sums exact)."""
        total = values.detach().to(torch.float64).clone()
        if not self.distributed:
            return total
        total = total.to(self.device)
        dist.all_reduce(total)
        return total.cpu()

    def gather(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `values` (same shape and dtype on every rank), in rank order, on the CPU."""
        if not self.distributed:
            return [values.clone()]
        local = values.detach().to(self.device).contiguous()
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local)
        return [tensor.cpu() for tensor in gathered]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextmanager
    def together(self) -> Iterator[None]:
        """Run a block on every rank; if it raises on any rank, raise on all of them.

        The failing rank re-raises its own exception; the others raise a TrainingError that names the
        rank and repeats its message. Without this a rank that fails to read its data leaves the others
        waiting in their next collective until the timeout.
        """
        failure: Exception | None = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001: every failure must reach the other ranks
            failure = exc
        if not self.distributed:
            if failure is not None:
                raise failure
            return
        messages = [_decode(row) for row in self.gather(_encode(failure))]
        if failure is not None:
            raise failure
        failed = [(rank, message) for rank, message in enumerate(messages) if message]
        if failed:
            rank, message = failed[0]
            raise TrainingError(f"rank {rank} of {self.world} failed: {message}")

    def finish(self) -> None:
        """Destroy the process group if train() created it."""
        if self.owns_group and self.distributed:
            dist.destroy_process_group()


def start_ranks(device: str, timeout_s: float) -> Ranks:
    """This process's Ranks: joins torchrun's process group (created with `timeout_s`), or a group the caller
    made already, or none (rank 0 of 1). `device` "cuda" under torchrun is the GPU LOCAL_RANK names."""
    launched = "WORLD_SIZE" in os.environ
    if not launched and not (dist.is_available() and dist.is_initialized()):
        return Ranks(device=torch.device(device))
    target = rank_device(device, int(os.environ.get("LOCAL_RANK", 0)))
    if target.type == "cuda":
        torch.cuda.set_device(target)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=BACKENDS[target.type], timeout=timedelta(seconds=timeout_s),
                                device_id=target if target.type == "cuda" else None)
    return Ranks(dist.get_rank(), dist.get_world_size(), target, owns)


def rank_device(device: str, local_rank: int) -> torch.device:
    """This rank's device under torchrun: `device` "cpu", or for "cuda" the GPU `local_rank` names.

    Raises:
        ValueError: "cuda" with more ranks on this machine than CUDA devices. The ranks cannot share this
            failure (NCCL needs a GPU per rank for any collective), so each decides alone, from the same
            numbers: torchrun's LOCAL_WORLD_SIZE and the device count, and every rank of the machine stops
            with the same message instead of waiting for the ones without a GPU.
    """
    if device != "cuda":
        return torch.device(device)
    count, here = torch.cuda.device_count(), max(int(os.environ.get("LOCAL_WORLD_SIZE", 0)), local_rank + 1)
    if here > count:
        raise ValueError(f"--device cuda: each rank takes the GPU its LOCAL_RANK names, but this machine runs "
                         f"{here} ranks (this one LOCAL_RANK {local_rank}) and torch "
                         f"sees {count} CUDA device(s); start at most {count} per machine (torchrun "
                         f"--nproc-per-node {count}) or train with --device cpu")
    return torch.device("cuda", local_rank)


def check_launch(ranks: Ranks, batch_size: int, fsdp: bool) -> None:
    """Settings that cannot work with this many ranks: the same ValueError on every rank, before anything loads."""
    if fsdp and not ranks.distributed:
        raise ValueError("--fsdp shards the base model across processes: launch with torchrun, e.g. "
                         "`torchrun --nproc-per-node 2 -m deltaw train ... --fsdp`, or drop --fsdp")
    if ranks.world > batch_size:
        raise ValueError(f"--batch-size {batch_size} is the global micro-batch, split over {ranks.world} ranks: "
                         f"each rank needs at least one example; use --batch-size >= {ranks.world} or fewer processes")


def _encode(failure: Exception | None) -> torch.Tensor:
    """[2 + MESSAGE_BYTES] uint8: the message's length (2 bytes) and its UTF-8 bytes (empty: no failure)."""
    data = b"" if failure is None else f"{type(failure).__name__}: {failure}".encode()[:MESSAGE_BYTES]
    row = torch.zeros(2 + MESSAGE_BYTES, dtype=torch.uint8)
    row[0], row[1] = len(data) >> 8, len(data) & 255
    row[2 : 2 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else row[2:2]
    return row


def _decode(row: torch.Tensor) -> str:
    length = int(row[0]) << 8 | int(row[1])
    return bytes(row[2 : 2 + length].tolist()).decode(errors="replace")
