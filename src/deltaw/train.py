"""One training loop for adapters: data -> AdamW on the adapter only -> checkpoints -> a PEFT-layout adapter.

    for step in steps:                      (optimizer steps; each is grad_accum micro-batches)
        loss = Σ token losses / tokens      (over the whole step, so grad_accum changes nothing)
        backward, clip, check finite, AdamW, schedule
        metrics.jsonl, progress bar, validation every val_every, checkpoint every save_every

bf16 runs the frozen base in bf16 under autocast while the adapter weights and AdamW state stay fp32.
Data order is a function of (seed, epoch), so a run resumed from a checkpoint (which holds the data
position, optimizer, scheduler and RNG states) computes the same losses as the run never interrupted.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltaw.adapter import save_adapter
from deltaw.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from deltaw.config import LoRAConfig, PrefixConfig
from deltaw.data import IGNORE, Dataset, Example, collate, load_jsonl, pack, split_validation
from deltaw.losses import lm_loss_sum
from deltaw.manage import add_lora, registry
from deltaw.metrics import MetricsLog, plot_losses
from deltaw.models import BUNDLED_NAME, load_model
from deltaw.nf4_linear import quantized_layers
from deltaw.prefix import add_prefix
from deltaw.quantized import quantization_record, quantize_model
from deltaw.runtime import tune_malloc_for_reuse

ADAPTER = "default"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SCHEDULES = ("cosine", "linear", "constant")
METHODS = ("lora", "qlora", "prefix")
# Fields a resumed run must share with the run it continues.
RESUME_FIELDS = ("model", "method", "rank", "alpha", "targets", "exclude", "use_rslora", "batch_size", "grad_accum", "lr",
                 "warmup", "schedule", "seq_len", "dtype", "seed", "packing", "weight_decay", "steps", "epochs")
PREFIX_RESUME_FIELDS = ("num_virtual_tokens", "prefix_projection", "projection_hidden", "prefix_init")


class TrainingError(RuntimeError):
    """Training stopped; the message says why, where the last good checkpoint is, and what to try."""


@dataclass
class TrainConfig:
    """Everything a training run depends on (the `deltaw train` flags).

    Attributes:
        data: training JSONL file (see deltaw.data for the shapes).
        out: output directory: the final adapter, checkpoints/, metrics.jsonl, loss.png.
        model: base model (name, HF directory or .gguf).
        method: what to train: "lora", "qlora" (LoRA on a base whose target layers are stored as NF4) or
            "prefix" (prefix-tuning).
        rank, alpha, dropout, targets, exclude, use_rslora, init: the LoRA adapter (see LoRAConfig).
        num_virtual_tokens, prefix_projection, projection_hidden, prefix_init: the prefix adapter (see
            PrefixConfig; prefix_init "activations" (the default without projection) starts from the
            base model's keys and values of the first training tokens, "random" (the default with
            projection) from N(0, 1) as PEFT does).
        steps: optimizer steps; or epochs: passes over the training data (one of the two).
        batch_size: examples per micro-batch; grad_accum: micro-batches per optimizer step.
        lr, warmup, schedule, weight_decay, max_grad_norm: AdamW and its learning-rate schedule
            (linear warm-up over `warmup` steps, then cosine/linear decay to 0, or constant).
        seq_len: tokens per example (longer ones are truncated); packing: concatenate short examples.
        dtype: "bf16" (base in bf16 under autocast, adapter and optimizer fp32) or "fp32".
        seed: adapter init, data order, validation split and dropout.
        gradient_checkpointing: recompute activations in backward (less memory, ~30% more time).
        save_every: checkpoint every K steps (0: only at the end); keep_checkpoints: how many to keep.
        resume: continue from the newest checkpoint in `out`.
        val_data / val_split: validation file, or a fraction held out of `data`; val_every: steps
            between validations (0: only at the end).
        skip_bad_lines: skip and count malformed data lines instead of stopping.
        progress: show a progress bar.
    """

    data: str
    out: str
    model: str = BUNDLED_NAME
    method: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    exclude: list[str] = field(default_factory=list)
    use_rslora: bool = False
    init: str = "kaiming"
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    projection_hidden: int = 512
    prefix_init: str | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seq_len: int = 512
    packing: bool = False
    dtype: str = "bf16"
    seed: int = 0
    gradient_checkpointing: bool = False
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    val_data: str | None = None
    val_split: float = 0.0
    val_every: int = 0
    skip_bad_lines: bool = False
    progress: bool = True

    def check(self) -> None:
        """Raise ValueError on inconsistent settings (before anything is loaded)."""
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of --steps and --epochs")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--steps/--epochs must be positive, found {self.steps or self.epochs}")
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, found {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, found {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, found {self.schedule!r}")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, found {self.method!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, found {self.dtype!r}")
        if self.val_data and self.val_split:
            raise ValueError("give --val-data or --val-split, not both")
        if self.method == "prefix" and self.prefix_projection and self.prefix_init == "activations":
            raise ValueError("--prefix-projection trains the prefixes through an MLP, which --prefix-init "
                             "activations cannot set; add --prefix-init random")
        if self.method == "prefix":
            self.prefix()  # checks the prefix settings

    def prefix(self) -> PrefixConfig:
        init = self.prefix_init or ("random" if self.prefix_projection else "activations")
        return PrefixConfig(num_virtual_tokens=self.num_virtual_tokens, init=init,
                            projection_hidden=self.projection_hidden if self.prefix_projection else None)

    def lora(self) -> LoRAConfig:
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                          exclude=self.exclude, use_rslora=self.use_rslora, init=self.init)


@dataclass
class TrainResult:
    """What a finished run produced."""

    out: Path
    steps: int
    final_loss: float
    final_val_loss: float | None
    tokens: int
    seconds: float


class BatchOrder:
    """Micro-batch i of the run -> example indices; epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, count: int, batch_size: int, seed: int) -> None:
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self.per_epoch = math.ceil(count / batch_size)
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def batch(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.count, generator=generator)
        return self._order[position * self.batch_size : (position + 1) * self.batch_size].tolist()


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1.0 - progress)


def choose_attention(model, seq_len: int, dtype: str) -> str:
    """Eager attention for bf16 CPU training on sequences up to 512 tokens, else the model's default.

    Measured on the bundled model (bf16, 2 cores, forward+backward): at 4x256 tokens eager takes ~140 ms
    of a step where SDPA's CPU flash kernel takes ~400 ms; at 2x512, 1.6 s vs 2.1 s per step; at
    1x1024 SDPA wins (2.5 s vs 4.1 s), and eager's [batch, heads, T, T] probabilities grow with T².
    In fp32 eager gains ~15% but holds ~1.2 GB more at 4x256, so fp32 keeps SDPA.
    """
    current = getattr(model.config, "_attn_implementation", None) or "sdpa"
    choice = "eager" if model.device.type == "cpu" and seq_len <= 512 and dtype == "bf16" else current
    if choice != current:
        model.set_attn_implementation(choice)
    return choice


def train(config: TrainConfig) -> TrainResult:
    """Train the adapter `config.method` names (LoRA or prefix) as `config` says; see the module docstring."""
    config.check()
    tune_malloc_for_reuse()
    out = Path(config.out)
    resume_from = _check_out_dir(out, config.resume)
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.model, dtype=DTYPES[config.dtype])
    train_examples, val_examples, dataset = _datasets(config, tokenizer)
    print(dataset.summary())
    print(attach_adapter(model, config, train_examples))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    choose_attention(model, config.seq_len, config.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    order = BatchOrder(len(train_examples), config.batch_size, config.seed)
    total_steps = config.steps or math.ceil(config.epochs * order.per_epoch / config.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, config.warmup, config.schedule))
    state = {"step": 0, "micro_batch": 0, "tokens": 0, "config": _run_config(config, dataset)}
    if resume_from is not None:
        state = _resume(resume_from, model, optimizer, scheduler, config, dataset)
        if state["step"] >= total_steps:
            raise TrainingError(f"--resume: {resume_from} is the end of a finished run ({total_steps} steps); "
                                f"its adapter is in {out}. Train longer in another --out")
        print(f"resumed from {resume_from} at step {state['step']}")
    metrics = MetricsLog(out / "metrics.jsonl", keep_until_step=state["step"])
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16) if config.dtype == "bf16" else nullcontext()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(total=total_steps, initial=state["step"], disable=not config.progress, unit="step", dynamic_ncols=True)
    start, loss, val_loss = time.perf_counter(), float("nan"), None
    model.train()
    while state["step"] < total_steps:
        step_start = time.perf_counter()
        micro = [collate([train_examples[i] for i in order.batch(state["micro_batch"] + k)], pad_id)
                 for k in range(config.grad_accum)]
        loss, tokens = _optimizer_step(model, micro, params, optimizer, scheduler, autocast, config, state, out)
        state["step"] += 1
        state["micro_batch"] += config.grad_accum
        state["tokens"] += tokens
        elapsed = time.perf_counter() - step_start
        record = {"step": state["step"], "loss": loss, "lr": optimizer.param_groups[0]["lr"], "tokens": state["tokens"],
                  "step_time_s": elapsed, "tokens_per_s": tokens / elapsed,
                  "epoch": state["micro_batch"] / order.per_epoch}
        last = state["step"] == total_steps
        if val_examples and ((config.val_every and state["step"] % config.val_every == 0) or last):
            val_loss = evaluate(model, val_examples, config.batch_size, pad_id, autocast)
            record["val_loss"] = val_loss
            model.train()
        metrics.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / elapsed:,.0f}",
                        **({"val": f"{val_loss:.4f}"} if val_loss is not None else {}))
        bar.update(1)
        if (config.save_every and state["step"] % config.save_every == 0) or last:
            save_checkpoint(out, model, ADAPTER, optimizer, scheduler, state, keep=config.keep_checkpoints)
    bar.close()
    seconds = time.perf_counter() - start
    training = {**state["config"], "steps": state["step"], "tokens": state["tokens"], "final_loss": loss,
                "final_val_loss": val_loss}
    save_trained_adapter(model, out, training)
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    return TrainResult(out, state["step"], loss, val_loss, state["tokens"], seconds)


def attach_adapter(model, config: TrainConfig, examples: list[Example] = ()) -> object:
    """Add the trainable adapter `config.method` names to `model`; returns a printable report.

    A prefix initialised from activations starts from the first `num_virtual_tokens` tokens of `examples`.
    """
    if config.method == "prefix":
        prefix = config.prefix()
        ids = torch.tensor([token for example in examples for token in example.input_ids][: prefix.num_virtual_tokens])
        if prefix.init == "activations" and ids.numel() < prefix.num_virtual_tokens:
            raise ValueError(f"--prefix-init activations needs {prefix.num_virtual_tokens} training tokens, the data "
                             f"has {ids.numel()}; use --prefix-init random or fewer --num-virtual-tokens")
        return add_prefix(model, prefix, name=ADAPTER, dtype=torch.float32, init_ids=ids)
    if config.method == "qlora" and not quantized_layers(model):
        print(quantize_model(model, config.lora().targets, config.lora().exclude))
    report = add_lora(model, config.lora(), name=ADAPTER, dtype=torch.float32)
    record = quantization_record(model, config.dtype)
    if record:  # kept with the adapter (checkpoints too), so `deltaw merge` can rebuild this very base
        registry(model).adapters[ADAPTER].metadata["base_quantization"] = record
    return report


def save_trained_adapter(model, out: Path, training: dict) -> None:
    """Write the trained adapter to `out` in PEFT's layout, with its training record."""
    save_adapter(model, out, ADAPTER, metadata={"training": training})


def _optimizer_step(model, micro, params, optimizer, scheduler, autocast, config, state, out) -> tuple[float, int]:
    """Forward/backward over the micro-batches of one step, then clip and step. Returns (loss, tokens)."""
    predicted = sum(int((batch["labels"][:, 1:] != IGNORE).sum()) for batch in micro)
    total = 0.0
    for batch in micro:
        with autocast:
            loss_sum, _ = lm_loss_sum(model, batch)
        if not torch.isfinite(loss_sum):
            _fail(f"the loss is {loss_sum.item()} at step {state['step'] + 1}", out)
        (loss_sum / predicted).backward()
        total += loss_sum.item()
    norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    if not torch.isfinite(norm):
        _fail(f"the gradient norm is {norm.item()} at step {state['step'] + 1}", out)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total / predicted, sum(int(batch["attention_mask"].sum()) for batch in micro)


def _fail(what: str, out: Path) -> None:
    checkpoint = latest_checkpoint(out)
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
    raise TrainingError(f"training stopped: {what}; nothing was saved from this step, {kept}. "
                        "Lower --lr, use --dtype fp32, or check the data; --resume continues from the checkpoint")


@torch.no_grad()
def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, autocast) -> float:
    """Mean next-token loss over `examples` (token-weighted), in eval mode."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        with autocast:
            loss_sum, tokens = lm_loss_sum(model, collate(examples[start : start + batch_size], pad_id))
        total, count = total + loss_sum.item(), count + tokens
    return total / max(count, 1)


def _datasets(config: TrainConfig, tokenizer) -> tuple[list[Example], list[Example], Dataset]:
    dataset = load_jsonl(config.data, tokenizer, config.seq_len, config.skip_bad_lines)
    train_examples, val_examples = dataset.examples, []
    if config.val_split:
        train_examples, val_examples = split_validation(train_examples, config.val_split, config.seed)
    elif config.val_data:
        validation = load_jsonl(config.val_data, tokenizer, config.seq_len, config.skip_bad_lines)
        print(validation.summary())
        val_examples = validation.examples
    if config.packing:
        train_examples = pack(train_examples, config.seq_len)
    return train_examples, val_examples, dataset


def _run_config(config: TrainConfig, dataset: Dataset) -> dict:
    record = {key: value for key, value in asdict(config).items() if key not in ("progress", "resume")}
    record.update(data_sha256=dataset.sha256, skipped_lines=len(dataset.skipped))
    return record


def _check_out_dir(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from; refuse to overwrite a previous run's checkpoints without --resume."""
    checkpoint = latest_checkpoint(out)
    if resume and checkpoint is None:
        raise TrainingError(f"--resume: no checkpoint in {out / 'checkpoints'}; start without --resume")
    if not resume and checkpoint is not None:
        raise TrainingError(f"{out} holds checkpoints of an earlier run ({checkpoint.name}); pass --resume to "
                            "continue it, or choose another --out")
    return checkpoint


def _resume(path, model, optimizer, scheduler, config: TrainConfig, dataset: Dataset) -> dict:
    state = load_checkpoint(path, model, ADAPTER, optimizer, scheduler)
    saved, current = state["config"], _run_config(config, dataset)
    fields = (*RESUME_FIELDS, *(PREFIX_RESUME_FIELDS if config.method == "prefix" else ()), "data_sha256")
    changed = [key for key in fields if saved.get(key) != current.get(key)]
    if changed:
        raise TrainingError(f"--resume: {path} was made with other settings: "
                            + ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
                            + "; resume with the original settings or choose another --out")
    return state

