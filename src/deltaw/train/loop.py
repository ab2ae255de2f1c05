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
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltaw import compat
from deltaw.adapters import save_adapter
from deltaw.adapters.kinds import kind_for_config
from deltaw.adapters.state import adapters_of
from deltaw.models.loading import DTYPES, load_model
from deltaw.models.quantized import quantization_record, quantize_model
from deltaw.quant.linear import quantized_layers
from deltaw.runtime import tune_malloc_for_reuse
from deltaw.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from deltaw.train.config import RESUME_FIELDS, TrainConfig
from deltaw.train.data import IGNORE, Dataset, Example, collate, load_jsonl, pack, split_validation
from deltaw.train.losses import lm_loss_sum
from deltaw.train.metrics import MetricsLog, plot_losses

ADAPTER = "default"


class TrainingError(RuntimeError):
    """Training stopped; the message says why, where the last good checkpoint is, and what to try."""


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
    current = compat.attention_implementation(model)
    choice = "eager" if model.device.type == "cpu" and seq_len <= 512 and dtype == "bf16" else current
    if choice != current:
        compat.set_attention_implementation(model, choice)
    return choice


@dataclass
class Run:
    """One training run in progress: what every step needs.

    Attributes:
        state: step, micro_batch (position in the data order), tokens, and the run's settings record;
            this is what a checkpoint stores and --resume restores.
    """

    config: TrainConfig
    out: Path
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: object
    order: BatchOrder
    train_examples: list[Example]
    val_examples: list[Example]
    pad_id: int
    total_steps: int
    state: dict


def train(config: TrainConfig) -> TrainResult:
    """Train the adapter `config.method` names (LoRA, QLoRA or prefix) as `config` says; see the module docstring."""
    config.check()
    tune_malloc_for_reuse()
    run = _prepare(config)
    metrics = MetricsLog(run.out / "metrics.jsonl", keep_until_step=run.state["step"])
    bar = tqdm(total=run.total_steps, initial=run.state["step"], disable=not config.progress, unit="step",
               dynamic_ncols=True)
    start, loss, val_loss = time.perf_counter(), float("nan"), None
    run.model.train()
    while run.state["step"] < run.total_steps:
        record = _train_step(run)
        loss, val_loss = record["loss"], record.get("val_loss", val_loss)
        metrics.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                        **({"val": f"{val_loss:.4f}"} if val_loss is not None else {}))
        bar.update(1)
        step = run.state["step"]
        if (config.save_every and step % config.save_every == 0) or step == run.total_steps:
            save_checkpoint(run.out, run.model, ADAPTER, run.optimizer, run.scheduler, run.state,
                            keep=config.keep_checkpoints)
    bar.close()
    seconds = time.perf_counter() - start
    state = run.state
    training = {**state["config"], "steps": state["step"], "tokens": state["tokens"], "final_loss": loss,
                "final_val_loss": val_loss}
    save_trained_adapter(run.model, run.out, training)
    plot_losses(run.out / "metrics.jsonl", run.out / "loss.png")
    return TrainResult(run.out, state["step"], loss, val_loss, state["tokens"], seconds)


def _prepare(config: TrainConfig) -> Run:
    """Load the model and data, attach the adapter, build AdamW and the schedule; resume if asked."""
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
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16) if config.dtype == "bf16" else nullcontext()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Run(config, out, model, params, optimizer, scheduler, autocast, order, train_examples, val_examples,
               pad_id, total_steps, state)


def _train_step(run: Run) -> dict:
    """One optimizer step (and a validation when due); returns its metrics record."""
    config, state = run.config, run.state
    step_start = time.perf_counter()
    micro = [collate([run.train_examples[i] for i in run.order.batch(state["micro_batch"] + k)], run.pad_id)
             for k in range(config.grad_accum)]
    loss, tokens, grad_norm = _optimizer_step(run, micro)
    state["step"] += 1
    state["micro_batch"] += config.grad_accum
    state["tokens"] += tokens
    elapsed = time.perf_counter() - step_start
    record = {"step": state["step"], "loss": loss, "lr": run.optimizer.param_groups[0]["lr"],
              "grad_norm": grad_norm, "tokens": state["tokens"], "step_time_s": elapsed, "tokens_per_s": tokens / elapsed,
              "epoch": state["micro_batch"] / run.order.per_epoch}
    due = (config.val_every and state["step"] % config.val_every == 0) or state["step"] == run.total_steps
    if run.val_examples and due:
        record["val_loss"] = evaluate(run.model, run.val_examples, config.batch_size, run.pad_id, run.autocast)
        run.model.train()
    return record


SAMPLE_TOKENS = 512  # the first training tokens a kind may use to initialise its adapter (prefix-tuning does)


def attach_adapter(model, config: TrainConfig, examples: list[Example] = ()) -> object:
    """Add the trainable adapter `config.method` names to `model` (fp32 weights); returns a printable report.

    QLoRA first stores the targeted base layers as NF4. The kind gets the first training tokens for a
    data-aware init (a prefix initialised from activations starts from them).
    """
    adapter = config.adapter()
    if config.method == "qlora" and not quantized_layers(model):
        print(quantize_model(model, adapter.targets, adapter.exclude))
    sample = torch.tensor([token for example in examples for token in example.input_ids][:SAMPLE_TOKENS])
    report = kind_for_config(adapter).add(model, adapter, ADAPTER, dtype=torch.float32, sample_ids=sample)
    record = quantization_record(model, config.dtype)
    if record:  # kept with the adapter (checkpoints too), so `deltaw merge` can rebuild this very base
        adapters_of(model).adapters[ADAPTER].metadata["base_quantization"] = record
    return report


def save_trained_adapter(model, out: Path, training: dict) -> None:
    """Write the trained adapter to `out` in PEFT's layout, with its training record."""
    save_adapter(model, out, ADAPTER, metadata={"training": training})


def _optimizer_step(run: Run, micro: list[dict[str, torch.Tensor]]) -> tuple[float, int, float]:
    """Forward/backward over the micro-batches of one step, then clip and step.

    Returns (loss, tokens, the gradient's global norm before clipping)."""
    predicted = sum(int((batch["labels"][:, 1:] != IGNORE).sum()) for batch in micro)
    step = run.state["step"] + 1
    total = 0.0
    for batch in micro:
        with run.autocast:
            loss_sum, _ = lm_loss_sum(run.model, batch)
        if not torch.isfinite(loss_sum):
            _fail(f"the loss is {loss_sum.item()} at step {step}", run.out)
        (loss_sum / predicted).backward()
        total += loss_sum.item()
    norm = torch.nn.utils.clip_grad_norm_(run.params, run.config.max_grad_norm)
    if not torch.isfinite(norm):
        _fail(f"the gradient norm is {norm.item()} at step {step}", run.out)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total / predicted, sum(int(batch["attention_mask"].sum()) for batch in micro), norm.item()


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
    return {**config.record(), "data_sha256": dataset.sha256, "skipped_lines": len(dataset.skipped)}


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
    changed = [key for key in (*RESUME_FIELDS, "data_sha256") if saved.get(key) != current.get(key)]
    if changed:
        raise TrainingError(f"--resume: {path} was made with other settings: "
                            + ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
                            + "; resume with the original settings or choose another --out")
    return state

