"""One training loop for adapters: data -> AdamW on the adapter only -> checkpoints -> a PEFT-layout adapter.

    for step in steps:                      (optimizer steps; each is grad_accum micro-batches)
        loss = Σ token losses / tokens      (over the whole step, so grad_accum changes nothing)
        backward, clip, check finite, AdamW, schedule
        metrics.jsonl, progress bar, validation every val_every, checkpoint every save_every

bf16 runs the frozen base in bf16 under autocast while the adapter weights and AdamW state stay fp32.
Data order is a function of (seed, epoch), so a run resumed from a checkpoint (which holds the data
position, optimizer, scheduler and RNG states) computes the same losses as the run never interrupted.

Under torchrun the same loop runs on every rank: each takes its share of every micro-batch
(deltaw.train.distributed), the step's token count is summed over ranks, gradients are summed by DDP or
FSDP2 (deltaw.train.parallel), and rank 0 alone writes checkpoints, metrics, the plot and the adapter.
The loop never asks how many ranks there are.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltaw import attention, compat
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
from deltaw.train.distributed import Ranks, check_launch, start_ranks
from deltaw.train.errors import TrainingError
from deltaw.train.fused_norm import fuse_norms
from deltaw.train.losses import CausalLMLoss
from deltaw.train.metrics import MetricsLog, plot_losses
from deltaw.train.parallel import accumulating, describe, full, held_bytes, parallelize, whole_parameters

ADAPTER = "default"


@dataclass
class TrainResult:
    """What a finished run produced."""

    out: Path
    steps: int
    final_loss: float
    final_val_loss: float | None
    tokens: int
    seconds: float
    rank: int = 0  # this process's rank under torchrun; only rank 0 wrote files


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


def choose_attention(model, seq_len: int, dtype: str, device: torch.device | None = None) -> str:
    """Eager attention (deltaw's, `deltaw.attention`) for bf16 CPU training on sequences up to 512 tokens,
    else the model's default.

    Measured on the bundled model (bf16, 2 cores, forward+backward): at 4x256 tokens eager takes ~140 ms
    of a step where SDPA's CPU flash kernel takes ~400 ms; at 2x512, 1.6 s vs 2.1 s per step; at
    1x1024 SDPA wins (2.5 s vs 4.1 s), and eager's [batch, heads, T, T] probabilities grow with T².
    In fp32 eager gains ~15% but holds ~1.2 GB more at 4x256, so fp32 keeps SDPA. `device`: where the
    model will train (default: where it is).
    """
    current = compat.attention_implementation(model)
    device = device or model.device
    choice = attention.EAGER if device.type == "cpu" and seq_len <= 512 and dtype == "bf16" else current
    if choice != current:
        compat.set_attention_implementation(model, choice)
    return choice


@dataclass
class Run:
    """One training run in progress: what every step needs.

    Attributes:
        objective: the module whose forward is a micro-batch's loss sum: the model's CausalLMLoss, wrapped by
            DDP or sharded by FSDP2 under torchrun (deltaw.train.parallel).
        ranks: this process's rank and the collectives (rank 0 of 1 without torchrun).
        state: step, micro_batch (position in the data order), tokens, and the run's settings record;
            this is what a checkpoint stores and --resume restores.
    """

    config: TrainConfig
    out: Path
    model: torch.nn.Module
    objective: torch.nn.Module
    ranks: Ranks
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
    """Train the adapter `config.method` names (LoRA, QLoRA or prefix) as `config` says; see the module docstring.

    Under torchrun, call it on every rank; ranks other than 0 print nothing and write nothing.
    """
    config.check()
    tune_malloc_for_reuse()
    ranks = start_ranks(config.device, config.dist_timeout)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if ranks.main else devnull):
            return _train(config, ranks)
    finally:
        ranks.finish()


def _train(config: TrainConfig, ranks: Ranks) -> TrainResult:
    run = _prepare(config, ranks)
    metrics = MetricsLog(run.out / "metrics.jsonl", keep_until_step=run.state["step"]) if ranks.main else None
    bar = tqdm(total=run.total_steps, initial=run.state["step"], disable=not (config.progress and ranks.main),
               unit="step", dynamic_ncols=True)
    start, loss, val_loss = time.perf_counter(), float("nan"), None
    run.objective.train()
    while run.state["step"] < run.total_steps:
        record = _train_step(run)
        loss, val_loss = record["loss"], record.get("val_loss", val_loss)
        if metrics is not None:
            metrics.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                        **({"val": f"{val_loss:.4f}"} if val_loss is not None else {}))
        bar.update(1)
        step = run.state["step"]
        if (config.save_every and step % config.save_every == 0) or step == run.total_steps:
            save_checkpoint(run.out, run.model, ADAPTER, run.optimizer, run.scheduler, run.state,
                            keep=config.keep_checkpoints, ranks=ranks)
    bar.close()
    seconds = time.perf_counter() - start
    state = run.state
    training = {**state["config"], "steps": state["step"], "tokens": state["tokens"], "final_loss": loss,
                "final_val_loss": val_loss}
    with whole_parameters(run.model):
        if ranks.main:
            save_trained_adapter(run.model, run.out, training)
            plot_losses(run.out / "metrics.jsonl", run.out / "loss.png")
    ranks.barrier()  # train() returns on every rank once the adapter is written
    return TrainResult(run.out, state["step"], loss, val_loss, state["tokens"], seconds, ranks.rank)


def _prepare(config: TrainConfig, ranks: Ranks) -> Run:
    """Load the model and data, attach the adapter, parallelize, build AdamW and the schedule; resume if asked.

    Every failure before the first collective is shared by all ranks (`Ranks.together`), so a rank that cannot
    read its data stops every rank with that message instead of leaving them waiting.
    """
    out = Path(config.out)
    with ranks.together():
        check_launch(ranks, config.batch_size, config.fsdp)
        resume_from = _check_out_dir(out, config.resume, ranks)
        torch.manual_seed(config.seed)
        model, tokenizer = load_model(config.model, dtype=DTYPES[config.dtype])
        train_examples, val_examples, dataset = _datasets(config, tokenizer)
        print(dataset.summary())
        print(attach_adapter(model, config, train_examples, tokenizer))
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        choose_attention(model, config.seq_len, config.dtype, ranks.device)
        fuse_norms(model)
    whole = held_bytes(model)
    objective = parallelize(model, ranks, config.fsdp)
    if ranks.distributed:
        print(describe(ranks, config.fsdp, whole, held_bytes(model)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    order = BatchOrder(len(train_examples), config.batch_size, config.seed)
    total_steps = config.steps or math.ceil(config.epochs * order.per_epoch / config.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, config.warmup, config.schedule))
    state = {"step": 0, "micro_batch": 0, "tokens": 0, "config": _run_config(config, dataset)}
    if resume_from is not None:
        with ranks.together():
            state = _resume(resume_from, model, optimizer, scheduler, config, dataset, ranks)
        if state["step"] >= total_steps:
            raise TrainingError(f"--resume: {resume_from} is the end of a finished run ({total_steps} steps); "
                                f"its adapter is in {out}. Train longer in another --out")
        print(f"resumed from {resume_from} at step {state['step']}")
    autocast = torch.autocast(ranks.device.type, dtype=torch.bfloat16) if config.dtype == "bf16" else nullcontext()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Run(config, out, model, objective, ranks, params, optimizer, scheduler, autocast, order, train_examples,
               val_examples, pad_id, total_steps, state)


def _train_step(run: Run) -> dict:
    """One optimizer step (and a validation when due); returns its metrics record."""
    config, state = run.config, run.state
    step_start = time.perf_counter()
    micro = []
    for k in range(config.grad_accum):
        indices, counts = run.ranks.share(run.order.batch(state["micro_batch"] + k))
        micro.append((_on(run, collate([run.train_examples[i] for i in indices], run.pad_id)), counts))
    loss, tokens, grad_norm = _optimizer_step(run, micro)
    state["step"] += 1
    state["micro_batch"] += config.grad_accum
    state["tokens"] += tokens
    elapsed = time.perf_counter() - step_start
    record = {"step": state["step"], "loss": loss, "lr": run.optimizer.param_groups[0]["lr"],
              "grad_norm": grad_norm, "tokens": state["tokens"], "step_time_s": elapsed,
              "tokens_per_s": tokens / elapsed,
              "epoch": state["micro_batch"] / run.order.per_epoch}
    due = (config.val_every and state["step"] % config.val_every == 0) or state["step"] == run.total_steps
    if run.val_examples and due:
        record["val_loss"] = validation_loss(run.objective, run.val_examples, config.batch_size, run.pad_id,
                                             run.autocast, run.ranks)
        run.objective.train()
    return record


def _on(run: Run, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(run.ranks.device) for key, value in batch.items()}


SAMPLE_TOKENS = 512  # the first training tokens a kind may use to initialise its adapter (prefix-tuning does)


def attach_adapter(model, config: TrainConfig, examples: list[Example] = (), tokenizer: object | None = None) -> object:
    """Add the trainable adapter `config.method` names to `model` (fp32 weights); returns a printable report.

    QLoRA first stores the targeted base layers as NF4. The kind gets the first training tokens for a
    data-aware init (a prefix initialised from activations starts from them) and the tokenizer (LoRA's
    trainable tokens may be given as text).
    """
    adapter = config.adapter()
    if config.method == "qlora" and not quantized_layers(model):
        print(quantize_model(model, adapter.targets, adapter.exclude))
    sample = torch.tensor([token for example in examples for token in example.input_ids][:SAMPLE_TOKENS])
    report = kind_for_config(adapter).add(model, adapter, ADAPTER, dtype=torch.float32, sample_ids=sample,
                                          tokenizer=tokenizer)
    record = quantization_record(model, config.dtype)
    if record:  # kept with the adapter (checkpoints too), so `deltaw merge` can rebuild this very base
        adapters_of(model).adapters[ADAPTER].metadata["base_quantization"] = record
    return report


def save_trained_adapter(model, out: Path, training: dict) -> None:
    """Write the trained adapter to `out` in PEFT's layout, with its training record."""
    save_adapter(model, out, ADAPTER, metadata={"training": training})


def _optimizer_step(run: Run, micro: list[tuple[dict[str, torch.Tensor], bool]]) -> tuple[float, int, float]:
    """Forward/backward over this rank's micro-batches of one step, then clip and step. Returns (loss, tokens)
    of the whole step, all ranks together, and the gradient's global norm before clipping.

    Each micro-batch's loss sum is divided by the label tokens of the whole step (summed over ranks) and the
    gradients are summed over ranks, so the update is the one a single process computes on all the examples.
    """
    counted = [batch for batch, counts in micro if counts]
    local = torch.tensor([sum(int((batch["labels"][:, 1:] != IGNORE).sum()) for batch in counted),
                          sum(int(batch["attention_mask"].sum()) for batch in counted)])
    predicted, tokens = (int(value) for value in run.ranks.sum(local))
    total = torch.zeros((), dtype=torch.float64, device=run.ranks.device)
    for index, (batch, counts) in enumerate(micro):
        with accumulating(run.objective, last=index == len(micro) - 1):
            with run.autocast:
                loss_sum, _ = run.objective(**batch)
            loss_sum = loss_sum if counts else loss_sum * 0.0
            (loss_sum / predicted).backward()
        total += loss_sum.detach()
    loss = float(run.ranks.sum(total)) / predicted
    step = run.state["step"] + 1
    if not math.isfinite(loss):
        _fail(f"the loss is {loss} at step {step}", run.out)
    norm = full(torch.nn.utils.clip_grad_norm_(run.params, run.config.max_grad_norm))
    if not torch.isfinite(norm):
        _fail(f"the gradient norm is {norm.item()} at step {step}", run.out)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, tokens, norm.item()


def _fail(what: str, out: Path) -> None:
    checkpoint = latest_checkpoint(out)
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
    raise TrainingError(f"training stopped: {what}; nothing was saved from this step, {kept}. "
                        "Lower --lr, use --dtype fp32, or check the data; --resume continues from the checkpoint")


def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, autocast) -> float:
    """Mean next-token loss of `model` over `examples` (token-weighted), in eval mode, in this process."""
    return validation_loss(CausalLMLoss(model), examples, batch_size, pad_id, autocast, Ranks(device=model.device))


@torch.no_grad()
def validation_loss(objective: torch.nn.Module, examples: list[Example], batch_size: int, pad_id: int, autocast,
                    ranks: Ranks) -> float:
    """Mean next-token loss over `examples` (token-weighted), in eval mode; each rank evaluates its share of
    every batch and the sums are added over ranks."""
    objective.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(examples), batch_size):
        indices, counts = ranks.share(list(range(start, min(start + batch_size, len(examples)))))
        batch = collate([examples[i] for i in indices], pad_id)
        with autocast:
            loss_sum, tokens = objective(**{key: value.to(ranks.device) for key, value in batch.items()})
        if counts:
            sums += torch.tensor([float(loss_sum), tokens], dtype=torch.float64)
    total, count = ranks.sum(sums).tolist()
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


def _check_out_dir(out: Path, resume: bool, ranks: Ranks) -> Path | None:
    """The checkpoint to resume from; refuse to overwrite a previous run's checkpoints without --resume."""
    checkpoint = latest_checkpoint(out)
    shared = " (every rank reads --out: on several nodes it must be a filesystem they share)" if ranks.world > 1 else ""
    if resume and checkpoint is None:
        raise TrainingError(f"--resume: no checkpoint in {out / 'checkpoints'}; start without --resume{shared}")
    if not resume and checkpoint is not None:
        raise TrainingError(f"{out} holds checkpoints of an earlier run ({checkpoint.name}); pass --resume to "
                            "continue it, or choose another --out")
    return checkpoint


def _resume(path, model, optimizer, scheduler, config: TrainConfig, dataset: Dataset, ranks: Ranks) -> dict:
    state = load_checkpoint(path, model, ADAPTER, optimizer, scheduler, ranks)
    saved, current = state["config"], _run_config(config, dataset)
    changed = [key for key in (*RESUME_FIELDS, "data_sha256") if saved.get(key) != current.get(key)]
    if changed:
        raise TrainingError(f"--resume: {path} was made with other settings: "
                            + ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
                            + "; resume with the original settings or choose another --out")
    if state.get("world_size", 1) != ranks.world:
        print(f"resuming a {state.get('world_size', 1)}-process run on {ranks.world}: the batches and the update "
              "are the same (--batch-size is global); dropout masks are drawn anew")
    return state
