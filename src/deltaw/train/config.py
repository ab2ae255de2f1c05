"""TrainConfig: everything a training run depends on, and the one place its defaults are written.

`deltaw train` is generated from it (deltaw.flags): each field is a flag, documented by its line below.
The adapter's own settings are the adapter kinds' configs (LoRAConfig, PrefixConfig), held, not copied.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from deltaw.adapters.lora import LoRAConfig
from deltaw.adapters.prefix import PrefixConfig
from deltaw.models.loading import BUNDLED_NAME

TRAIN_DTYPES = ("bf16", "fp32")
DEVICES = ("cpu", "cuda")
SCHEDULES = ("cosine", "linear", "constant")
METHODS = ("lora", "qlora", "prefix")
# Settings a resumed run must share with the run it continues (with the adapter's config and the data's hash).
RESUME_FIELDS = ("model", "method", "adapter", "batch_size", "grad_accum", "lr", "warmup", "schedule", "seq_len",
                 "dtype", "seed", "packing", "weight_decay", "steps", "epochs")


@dataclass
class TrainConfig:
    """Everything a training run depends on (the `deltaw train` flags).

    Attributes:
        data: training JSONL: chat messages, prompt/completion or text, one example a line.
        out: output directory: the final adapter, checkpoints/, metrics.jsonl, loss.png.
        model: base model: the bundled name, an HF model directory, a .gguf file or an NF4 directory.
        method: lora, qlora (LoRA on a base whose targeted layers are stored as NF4) or prefix (prefix-tuning).
        lora: the LoRA adapter (methods lora and qlora).
        prefix: the prefix adapter (method prefix).
        steps: optimizer steps (give this or --epochs).
        epochs: passes over the training data (give this or --steps).
        batch_size: examples per micro-batch, over all ranks together under torchrun (each takes its share).
        grad_accum: micro-batches per optimizer step.
        lr: the peak learning rate of AdamW.
        warmup: steps of linear learning-rate warm-up.
        schedule: the learning rate after warm-up: cosine or linear decay to 0, or constant.
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: gradients are clipped to this global norm.
        seq_len: tokens per example; longer examples are truncated.
        packing: concatenate short examples into sequences of up to seq_len tokens.
        dtype: bf16 (the base in bf16 under autocast; adapter and AdamW state fp32) or fp32.
        seed: adapter init, data order, validation split and dropout.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more time).
        save_every: write a checkpoint every K steps (0: only at the end).
        keep_checkpoints: how many checkpoints to keep.
        resume: continue from the newest checkpoint in --out.
        val_data: a validation JSONL file.
        val_split: a fraction of --data held out for validation instead.
        val_every: steps between validations (0: only at the end).
        skip_bad_lines: skip and count malformed data lines instead of stopping.
        progress: the progress bar.
        device: where to train: cpu, or cuda (under torchrun each rank takes the GPU its LOCAL_RANK names).
        fsdp: under torchrun, shard the frozen base (NF4 included) and the adapter across ranks with FSDP2
            instead of replicating the base on every rank (DDP, the default).
        dist_timeout: seconds a rank waits for the others in a collective before the run fails (torchrun).
    """

    data: str
    out: str
    model: str = BUNDLED_NAME
    method: str = field(default="lora", metadata={"choices": METHODS})
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata={"group": "LoRA (--method lora or qlora)"})
    prefix: PrefixConfig = field(default_factory=PrefixConfig, metadata={"group": "prefix-tuning (--method prefix)"})
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 0
    schedule: str = field(default="cosine", metadata={"choices": SCHEDULES})
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seq_len: int = 512
    packing: bool = False
    dtype: str = field(default="bf16", metadata={"choices": TRAIN_DTYPES})
    seed: int = 0
    gradient_checkpointing: bool = False
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    val_data: str | None = None
    val_split: float = 0.0
    val_every: int = 0
    skip_bad_lines: bool = False
    progress: bool = field(default=True, metadata={"negate": "--no-progress"})
    device: str = field(default="cpu", metadata={"choices": DEVICES})
    fsdp: bool = False
    dist_timeout: float = 1800.0

    def check(self) -> None:
        """Raise ValueError naming the flag of the first bad or inconsistent setting (before anything loads)."""
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of --steps and --epochs")
        if self.steps is not None:
            _require(self.steps, "--steps", minimum=1)
        else:
            _require(self.epochs, "--epochs", minimum=0, strict=True)
        for name in ("batch_size", "grad_accum", "seq_len"):
            _require(getattr(self, name), "--" + name.replace("_", "-"), minimum=1)
        for name in ("warmup", "save_every", "keep_checkpoints", "val_every"):
            _require(getattr(self, name), "--" + name.replace("_", "-"), minimum=0)
        _require(self.lr, "--lr", minimum=0, strict=True)
        _require(self.weight_decay, "--weight-decay", minimum=0)
        _require(self.max_grad_norm, "--max-grad-norm", minimum=0, strict=True)
        _require(self.dist_timeout, "--dist-timeout", minimum=0, strict=True)
        if not 0 <= self.val_split < 1:
            raise ValueError(f"--val-split must be a fraction in [0, 1), found {self.val_split}")
        for name, allowed in (("schedule", SCHEDULES), ("method", METHODS), ("dtype", TRAIN_DTYPES),
                              ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, found {getattr(self, name)!r}")
        if self.val_data and self.val_split:
            raise ValueError("give --val-data or --val-split, not both")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False); "
                             "use --device cpu or a CUDA build of torch")

    def adapter(self) -> LoRAConfig | PrefixConfig:
        """The config of the adapter `method` trains."""
        return self.prefix if self.method == "prefix" else self.lora

    def record(self) -> dict:
        """The JSON-ready settings a checkpoint and the final adapter record (the adapter's config only)."""
        settings = {key: value for key, value in asdict(self).items() if key not in ("lora", "prefix", "progress",
                                                                                    "resume", "dist_timeout")}
        return {**settings, "adapter": self.adapter().to_dict()}


def _require(value: float, flag: str, minimum: float, strict: bool = False) -> None:
    """A finite number >= minimum (> minimum when strict), or a ValueError naming `flag`."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{flag} must be a finite number {bound}, found {value!r}")
