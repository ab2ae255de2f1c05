"""A base model with NF4 linear layers: quantize it, save it in bitsandbytes' serialized layout, load it back.

    deltaw quantize --model M --out DIR
    DIR/config.json          the model config + "quantization_config" (bitsandbytes, nf4, double quant)
    DIR/model.safetensors    <layer>.weight (packed uint8 [n/2, 1]), <layer>.weight.absmax, .quant_map,
                             .nested_absmax, .nested_quant_map, .quant_state.bitsandbytes__nf4 per
                             quantized layer; every other tensor as it was (tied copies written once)
    DIR/tokenizer files

The layout is the one transformers writes for a bitsandbytes 4-bit model, so transformers with
bitsandbytes loads DIR too; deltaw reads it without bitsandbytes (`load_model(DIR)`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig

from deltaw import compat
from deltaw.adapters import merge_adapter, set_adapter
from deltaw.adapters.lora import LoRALinear, lora_layers
from deltaw.adapters.targets import ALL_LINEAR, linear_modules, select_modules
from deltaw.quant.linear import NF4Linear, quantize_linears, quantized_layers
from deltaw.quant.nf4 import from_bnb, to_bnb
from deltaw.runtime import release_free_memory

WEIGHTS_FILE = "model.safetensors"
_STATE_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"


@dataclass
class QuantizeReport:
    """What quantizing a model did: layers, parameters, and bytes before and after."""

    layers: int
    parameters: int
    float_bytes: int
    nf4_bytes: int

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.nf4_bytes / max(self.parameters, 1)

    def __str__(self) -> str:
        return (f"quantized {self.layers} linear layers to NF4: {self.parameters:,} weights, "
                f"{self.float_bytes / 2**20:,.1f} MiB -> {self.nf4_bytes / 2**20:,.1f} MiB "
                f"({self.bits_per_parameter:.3f} bits per weight, {100 * self.nf4_bytes / self.float_bytes:.1f}%)")


def quantize_model(
    model: nn.Module,
    targets: str | list[str] = ALL_LINEAR,
    exclude: list[str] | tuple[str, ...] = (),
    blocksize: int = 64,
    double_quant: bool = True,
) -> QuantizeReport:
    """Store the selected linear weights of `model` as NF4 (the output head and tied weights are never
    selected by "all-linear"). The float weights are freed layer by layer."""
    selection = select_modules(model, targets, exclude)
    float_bytes = sum(model.get_submodule(name).weight.nbytes for name in selection.modules)
    parameters = quantize_linears(model, selection.modules, blocksize, double_quant)
    release_free_memory()
    return QuantizeReport(len(selection.modules), parameters, float_bytes, nf4_bytes(model))


def nf4_bytes(model: nn.Module) -> int:
    """Bytes held by the model's NF4 weights, each shared tensor (the nested code table) counted once."""
    tensors = {id(t): t for weight in quantized_layers(model).values() for t in weight.buffers()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def quantization_config(model: nn.Module) -> dict:
    """The `quantization_config` transformers writes for a bitsandbytes NF4 model like `model`."""
    layers = quantized_layers(model)
    first = next(iter(layers.values()))
    skipped = [name for name in linear_modules(model) if name not in layers]
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": first.double_quant,
        "bnb_4bit_compute_dtype": str(first.dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": sorted({name.rsplit(".", 1)[-1] for name in skipped}) or None,
        "deltaw_blocksize": first.blocksize,
    }


def save_quantized(model: nn.Module, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `model` (with NF4 layers, see quantize_model) and `tokenizer` to the directory `out`."""
    out = Path(out)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no NF4 layers: call quantize_model(model) first")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; choose a new directory or pass --overwrite")
    tensors: dict[str, torch.Tensor] = {}
    for name, weight in layers.items():
        tensors.update(to_bnb(weight, prefix=f"{name}.weight"))
    seen: set[int] = set()
    for key, value in model.state_dict(keep_vars=False).items():
        owner = key.rsplit(".", 2)[0]
        if owner in layers and key.startswith(f"{owner}.weight."):
            continue  # an NF4 buffer, written above in bitsandbytes' names
        if value.data_ptr() in seen:
            continue  # a tied copy (e.g. lm_head = embed_tokens): tie_weights restores it on load
        seen.add(value.data_ptr())
        tensors[key] = value
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    compat.mark_untied(model)  # a merged tied-embedding LoRA left the head on the original weight
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
    return out


def quantization_record(model: nn.Module, dtype: str) -> dict | None:
    """What an adapter trained on `model` records of its NF4 base (None for a float base): the exact set
    of quantized modules, the settings, and the dtype the float weights were loaded in before quantizing."""
    layers = quantized_layers(model)
    if not layers:
        return None
    first = next(iter(layers.values()))
    return {"format": "nf4", "blocksize": first.blocksize, "double_quant": first.double_quant, "dtype": dtype,
            "modules": sorted(layers)}


def adapter_deltaw_config(adapter_dir: str | os.PathLike) -> dict:
    """The "deltaw" section of an adapter's adapter_config.json, any adapter type ({} when there is none;
    load_adapter reports what is wrong with a broken file)."""
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}
    section = config.get("deltaw") if isinstance(config, dict) else None
    return section if isinstance(section, dict) else {}


def adapter_base_record(adapter_dir: str | os.PathLike) -> dict | None:
    """The NF4 base an adapter was trained on, as its adapter_config.json records it (None: a float base)."""
    return adapter_deltaw_config(adapter_dir).get("base_quantization")


def prepare_base(model: nn.Module, record: dict) -> None:
    """Give `model` exactly the NF4 layers `record` (see quantization_record) lists: quantize a float base the
    way training did, or check that an already quantized one matches."""
    have, want = set(quantized_layers(model)), set(record.get("modules", ()))
    if not want:
        raise ValueError("the adapter's base_quantization record lists no modules: re-save it with this deltaw")
    if not have:
        quantize_linears(model, sorted(want), record.get("blocksize", 64), record.get("double_quant", True))
        release_free_memory()
    elif have != want:
        raise ValueError(f"the base has {len(have)} NF4 layers but the adapter was trained on a base with "
                         f"{len(want)} ({sorted(want ^ have)[:3]} differ): give --model the base it was trained on")


def nf4_config(model_dir: str | os.PathLike) -> dict | None:
    """The NF4 `quantization_config` of a local model directory, or None for an unquantized one."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return None
    quant = json.loads(config_file.read_text()).get("quantization_config")
    if not quant or quant.get("quant_method") != "bitsandbytes":
        return None
    if not quant.get("load_in_4bit") or quant.get("bnb_4bit_quant_type") != "nf4":
        raise ValueError(f"{config_file}: a bitsandbytes {'8-bit' if quant.get('load_in_8bit') else 'FP4'} model; "
                         "deltaw reads NF4 4-bit models only (re-quantize with `deltaw quantize`)")
    return quant


def load_quantized(model_dir: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """Build the model of `model_dir` with NF4Linear layers and load its tensors (no bitsandbytes needed).

    `dtype` is the compute dtype of the NF4 layers and the dtype of every other weight.
    """
    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir))
    config.quantization_config = None
    del config.quantization_config
    model = compat.empty_model(config, dtype)
    files = sorted(model_dir.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            state.update({key: handle.get_tensor(key) for key in handle.keys()})
    prefixes = [key.removesuffix(_STATE_SUFFIX) for key in state if key.endswith(_STATE_SUFFIX)]
    placed: set[str] = set()
    for name in prefixes:
        keys = [k for k in state if k == f"{name}.weight" or k.startswith(f"{name}.weight.")]
        weight = from_bnb({k: state.pop(k) for k in keys}, prefix=f"{name}.weight")
        _check_layer(model, name, weight, model_dir)
        weight.dtype = dtype
        bias = state.pop(f"{name}.bias", None)
        if bias is None and getattr(model.get_submodule(name), "bias", None) is not None:
            raise ValueError(f"{model_dir}: {name}.bias is missing; re-create the directory with `deltaw quantize`")
        bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        model.set_submodule(name, NF4Linear(weight, bias))
        placed.update(k for k in model.get_submodule(name).state_dict(prefix=f"{name}.").keys())
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in state.items()}, strict=False)
    model.tie_weights()
    untied = [key for key in missing if key not in placed and not _is_tied(model, key)]
    if untied or unexpected:
        raise ValueError(f"{model_dir}: the weights do not fit the config: missing {untied[:5]}, "
                         f"unexpected {unexpected[:5]}; re-create the directory with `deltaw quantize`")
    model.eval()
    return model


def _check_layer(model: nn.Module, name: str, weight, model_dir: Path) -> None:
    """The stored NF4 weight must have the shape the config gives the layer."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{model_dir}: {name} is quantized in the weights but is not a layer of the model's config; "
                         "re-create the directory with `deltaw quantize`") from None
    expected = (layer.out_features, layer.in_features)
    if tuple(weight.shape) != expected or weight.packed.numel() != (weight.numel() + 1) // 2:
        raise ValueError(f"{model_dir}: {name}.weight is {list(weight.shape)} with {weight.packed.numel()} packed "
                         f"bytes, the config says {list(expected)}; re-create the directory with `deltaw quantize`")


def _is_tied(model: nn.Module, key: str) -> bool:
    """True when parameter `key` shares its tensor with another, loaded parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(key)
    return target is not None and any(other is target for name, other in params.items() if name != key)


# --------------------------------------------------------------------------------------------- merging
@dataclass
class NF4MergeReport:
    """The error of merging an adapter into an NF4 base (dequantize, add, re-quantize).

    Attributes:
        layer_errors: module -> ||Q(W + ΔW) − (W + ΔW)|| / ||ΔW|| (Frobenius): the re-quantization error
            relative to the adapter's own update in that layer (0 would be a lossless merge).
        val_loss_unmerged: validation loss with the adapter applied unmerged on the NF4 base (what QLoRA trained).
        val_loss_merged: validation loss of the merged, re-quantized model.
    """

    layer_errors: dict[str, float]
    val_loss_unmerged: float | None = None
    val_loss_merged: float | None = None

    def __str__(self) -> str:
        errors = sorted(self.layer_errors.items(), key=lambda item: item[1])
        median = errors[len(errors) // 2][1]
        worst = ", ".join(f"{name} {error:.3f}" for name, error in errors[-3:][::-1])
        lines = [f"re-quantization error ||Q(W+dW) - (W+dW)|| / ||dW|| over {len(errors)} layers: median "
                 f"{median:.3f}, worst {worst}"]
        if self.val_loss_unmerged is not None and self.val_loss_merged is not None:
            change = self.val_loss_merged - self.val_loss_unmerged
            lines.append(f"validation loss: adapter unmerged on the NF4 base {self.val_loss_unmerged:.4f}, merged and "
                         f"re-quantized {self.val_loss_merged:.4f} ({change:+.4f}, "
                         f"{100 * change / self.val_loss_unmerged:+.2f}%)")
        return "\n".join(lines)


def merge_into_nf4(model: nn.Module, adapter: str, val_loss: Callable[[], float] | None = None) -> NF4MergeReport:
    """Merge `adapter` into the model's NF4 layers (lossy: re-quantization) and report the error.

    `val_loss`, if given, is called before and after the merge (e.g. a validation-set evaluation).
    Unmerging afterwards restores the original 4-bit weights exactly.
    """
    set_adapter(model, adapter)
    before = val_loss() if val_loss else None
    merge_adapter(model, adapter)
    errors = {name: layer.merge_error for name, layer in lora_layers(model) if layer.merged and layer.quantized}
    if not errors:
        raise ValueError(f"adapter {adapter!r} adapts no NF4 layer: quantize the base first (quantize_model)")
    return NF4MergeReport(errors, before, val_loss() if val_loss else None)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Turn every NF4 weight back into a float one (its dequantized values, in `dtype` or its compute dtype).

    An adapter trained with QLoRA then merges exactly (no re-quantization) into the very base it was
    trained on. Returns the number of layers converted.
    """
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear) and module.quantized:
            if module.merged:
                raise RuntimeError("an adapter is merged into NF4 weights; call unmerge_adapter(model) first")
            module.weight = nn.Parameter(module.weight.dequantize(dtype), requires_grad=False)
        elif isinstance(module, NF4Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(module.weight.dequantize(dtype), requires_grad=False)
            linear.bias = module.bias
            model.set_submodule(name, linear)
        else:
            continue
        count += 1
    return count
