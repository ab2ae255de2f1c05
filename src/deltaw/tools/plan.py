"""Plan a fine-tune: parameters and memory of full fine-tuning vs LoRA vs QLoRA.

Parameter counts are exact (from shapes). For a model directory the model is built on the meta
device from its config, so no weight is read. Memory for a training run is an estimate of what
deltaw's training path holds at its peak, for `batch` x `seq_len` tokens:

    runtime        Python + torch + transformers, measured once on CPU (RUNTIME_BYTES)
    base weights   parameters x dtype bytes (NF4: 4.127 bits per quantized weight, the rest in dtype)
    trainable      fp32 weights + fp32 gradients + AdamW's two fp32 moments = 16 bytes each
                   (full fine-tuning: weights in dtype, gradients in dtype, moments fp32)
    activations    per token and decoder layer, what autograd saves (see `activation_bytes_per_token`;
                   checked against the bytes autograd really saves on the bundled model, via
                   saved_tensors_hooks: 1,109 vs 1,120 MiB in bf16, 1,274 vs 1,187 MiB in fp32, at 4x256)
    allocator      ALLOCATOR_OVERHEAD x activations: the per-layer temporaries freed between saved
                   tensors that the heap cannot hand back (fitted on four `deltaw train` runs: bf16 and
                   fp32 at 2x128 and 4x256 tokens; peak RSS = estimate within 8% on each)
    loss           one chunk of fp32 logits and its softmax (deltaw.train.losses) plus the hidden-state gradient
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from deltaw import compat
from deltaw.adapters.targets import output_head, select_modules
from deltaw.models.loading import BUNDLED_NAME, resolve_model_dir

ALLOCATOR_OVERHEAD = 0.5
RUNTIME_BYTES = 390 * 2**20  # measured: RSS of a CPU process after importing torch + transformers and tokenizing
NF4_BITS = 4.127  # 4 bits + fp8 absmax per 64 + fp32 absmax-of-absmax per 256 blocks (double quantization)
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
LOSS_CHUNK_ROWS = 256


@dataclass
class Row:
    method: str
    trainable: int
    weights: float  # bytes
    gradients: float
    optimizer: float
    activations: float
    other: float  # runtime + loss workspace + allocator overhead
    on_disk: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.other


@dataclass
class Plan:
    title: str
    total_params: int
    rows: list[Row]
    tokens: int

    def __str__(self) -> str:
        def size(value: float) -> str:
            return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"

        lines = [self.title, f"{'method':<22} {'trainable':>14} {'ratio':>8} {'weights':>11} {'gradients':>11} "
                 f"{'optimizer':>11} {'activations':>12} {'other':>13} {'total':>11} {'on disk':>11}"]
        full = self.rows[0].trainable
        for row in self.rows:
            ratio = f"{full / row.trainable:,.0f}x" if row.trainable != full else "1x"
            lines.append(
                f"{row.method:<22} {row.trainable:>14,} {ratio:>8} {size(row.weights):>11} {size(row.gradients):>11} "
                f"{size(row.optimizer):>11} {size(row.activations):>12} {size(row.other):>13} {size(row.total):>11} "
                f"{size(row.on_disk):>11}")
        if self.tokens == 0:
            lines.append("(no --batch/--seq-len given: activations, runtime and loss workspace left out)")
        else:
            lines.append("other = Python/torch runtime + loss workspace + allocator overhead (see deltaw.tools.plan)")
        return "\n".join(lines)


def shape_plan(out_features: int, in_features: int, rank: int, dtype: str = "bf16") -> Plan:
    """One [out, in] linear layer: full fine-tuning vs LoRA vs QLoRA, weights and optimizer only."""
    full = out_features * in_features
    lora = rank * (in_features + out_features)
    width = DTYPE_BYTES[dtype]
    rows = [
        Row("full fine-tuning", full, full * width, full * width, 8 * full, 0, 0, full * width),
        Row(f"LoRA r={rank}", lora, full * width + 4 * lora, 4 * lora, 8 * lora, 0, 0, 4 * lora),
        Row(f"QLoRA r={rank}", lora, full * NF4_BITS / 8 + 4 * lora, 4 * lora, 8 * lora, 0, 0, 4 * lora),
    ]
    return Plan(f"one linear layer {out_features}x{in_features}, {dtype}", full, rows, 0)


@dataclass(frozen=True)
class Layout:
    """How a run on `world` ranks holds a model, per rank (deltaw.train.parallel).

    DDP (or one process): the whole base on every rank, plus DDP's gradient buckets (a copy of the adapter's
    gradients). FSDP: 1/world of every parameter, adapter and AdamW state included, plus what a step gathers
    whole: the root unit (embeddings, final norm, head: everything outside the decoder layers) for the whole
    step and two decoder layers at a time (the one running and the next, prefetched).
    """

    world: int = 1
    fsdp: bool = False
    layers: int = 1

    def weights(self, layer_bytes: float, root_bytes: float) -> float:
        """Per-rank bytes of base weights: decoder layers `layer_bytes` (all of them) and the rest `root_bytes`."""
        if not self.fsdp:
            return layer_bytes + root_bytes
        return root_bytes * (1 + 1 / self.world) + layer_bytes * (1 / self.world + 2 / self.layers)

    def trainable(self, nbytes: float) -> float:
        """Per-rank bytes of a trainable state (weights, gradients or AdamW moments) of `nbytes` in all."""
        return nbytes / self.world if self.fsdp else nbytes

    def buckets(self, gradient_bytes: float) -> float:
        """DDP's gradient buckets: one more copy of the gradients it all-reduces (none for FSDP or one process)."""
        return gradient_bytes if self.world > 1 and not self.fsdp else 0


def model_plan(model_name: str, rank: int, targets="all-linear", batch: int = 0, seq_len: int = 0,
               dtype: str = "bf16", world_size: int = 1, fsdp: bool = False) -> Plan:
    """A whole model: parameters from its config on the meta device, memory for batch x seq_len tokens, per rank
    of `world_size` (each rank takes ceil(batch / world_size) examples; `fsdp` shards the model)."""
    config = AutoConfig.from_pretrained(resolve_model_dir(model_name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {id(p): p.numel() for p in model.parameters()}
    total = sum(params.values())
    in_layers = sum(p.numel() for p in compat.decoder_layers(model).parameters())
    selection = select_modules(model, targets)
    shapes = [model.get_submodule(name).weight.shape for name in selection.modules]
    lora = sum(rank * (out + inp) for out, inp in shapes)
    quantized = sum(out * inp for out, inp in shapes)
    width, layout = DTYPE_BYTES[dtype], Layout(world_size, fsdp, config.num_hidden_layers)
    tokens = math.ceil(batch / world_size) * seq_len
    activations = tokens * config.num_hidden_layers * activation_bytes_per_token(config, seq_len, rank, dtype)
    other = (RUNTIME_BYTES + loss_bytes(config, tokens) + ALLOCATOR_OVERHEAD * activations) if tokens else 0
    base = layout.weights(in_layers * width, (total - in_layers) * width)
    nf4 = layout.weights((in_layers - quantized) * width + quantized * NF4_BITS / 8, (total - in_layers) * width)
    adapter = [layout.trainable(4 * lora), layout.trainable(4 * lora) + layout.buckets(4 * lora),
               layout.trainable(8 * lora)]  # fp32 weights, gradients (+ DDP buckets), AdamW moments
    rows = [
        # full fine-tuning saves the same layer inputs (for weight gradients) that LoRA saves for A
        Row("full fine-tuning", total, base, layout.trainable(total * width) + layout.buckets(total * width),
            layout.trainable(8 * total), activations, other, total * width),
        Row(f"LoRA r={rank}", lora, base + adapter[0], *adapter[1:], activations, other, 4 * lora),
        Row(f"QLoRA r={rank}", lora, nf4 + adapter[0], *adapter[1:], activations, other, 4 * lora),
    ]
    head = output_head(model)
    ranks = f", per rank of {world_size} ({'FSDP' if fsdp else 'DDP'})" if world_size > 1 or fsdp else ""
    title = (f"{model_name}: {total:,} parameters, {len(selection.modules)} target layers "
             f"({'all-linear' if targets == 'all-linear' else targets}, output head {head} excluded), {dtype}"
             + (f", batch {batch} x {seq_len} tokens" if tokens else "") + ranks)
    return Plan(title, total, rows, tokens)


def activation_bytes_per_token(config, seq_len: int, rank: int, dtype: str) -> float:
    """Bytes autograd keeps per token in one Llama-style decoder layer on deltaw's training path.

    Counted from what each op saves for backward when only the adapters train:
    two RMSNorms (fp32 input + dtype output each), the adapters' inputs (the norm outputs, the attention
    output into o_proj, the MLP product into down_proj) and their rank-r intermediates, the rotated
    queries and the repeated keys and values, the attention probabilities (eager attention in bf16:
    heads x seq_len in fp32 and in bf16; SDPA in fp32: an fp32 log-sum-exp per head), and the MLP's
    gate, activation and up outputs.
    """
    width = DTYPE_BYTES[dtype]
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    norms = 2 * hidden * (4 + width)
    attention_io = 4 * heads * head_dim * width  # q, repeated k and v, output into o_proj
    if dtype == "bf16" and seq_len <= 512:  # eager attention (deltaw.train.loop.choose_attention)
        probabilities = heads * seq_len * (4 + width)
    else:
        probabilities = heads * 4
    mlp = 4 * inter * width  # gate output, activation, up output, product into down_proj
    adapters = 7 * rank * width
    return norms + attention_io + probabilities + mlp + adapters


def loss_bytes(config, tokens: int) -> float:
    """deltaw.train.losses: one chunk of fp32 logits (softmax in place) and its dtype copy, plus d loss/d hidden."""
    rows = min(tokens, LOSS_CHUNK_ROWS)
    return rows * config.vocab_size * (4 + 2) + tokens * config.hidden_size * 4


@dataclass
class PlanOptions:
    """What `deltaw plan` plans for.

    Attributes:
        model: the model name or directory (only its config is read).
        shape: one linear layer instead, as OUTxIN, e.g. 8192x8192.
        rank: the LoRA rank.
        batch: examples per step, for the activation memory (0: weights and optimizer only).
        seq_len: tokens per example, for the activation memory.
        dtype: the base weights' dtype.
        world_size: training processes (torchrun --nproc-per-node x nodes): the memory shown is per rank.
        fsdp: the run shards the model across the ranks (deltaw train --fsdp) instead of replicating it (DDP).
    """

    model: str = BUNDLED_NAME
    shape: str | None = None
    rank: int = 16
    batch: int = 0
    seq_len: int = 0
    dtype: str = field(default="bf16", metadata={"choices": tuple(DTYPE_BYTES)})
    world_size: int = 1
    fsdp: bool = False


def plan(options: PlanOptions) -> Plan:
    """The plan `options` describe: one layer (--shape) or a whole model."""
    if options.shape:
        try:
            out_features, in_features = (int(x) for x in options.shape.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shape must look like 8192x8192 (out x in), found {options.shape!r}") from None
        return shape_plan(out_features, in_features, options.rank, options.dtype)
    if options.world_size < 1:
        raise ValueError(f"--world-size must be a whole number >= 1, found {options.world_size}")
    if options.batch and options.world_size > options.batch:
        raise ValueError(f"--batch {options.batch} is split over {options.world_size} ranks: each needs an example; "
                         f"use --batch >= {options.world_size}")
    return model_plan(options.model, options.rank, batch=options.batch, seq_len=options.seq_len, dtype=options.dtype,
                      world_size=options.world_size, fsdp=options.fsdp)
