"""deltaw: low-rank and prefix adapters for large language models: train, merge, switch and serve them on one frozen base."""

from deltaw.adapters import (
    AdapterFormatError,
    active_adapter,
    deactivate_adapters,
    delete_adapter,
    describe_adapter,
    disable_adapters,
    list_adapters,
    load_adapter,
    merge_adapter,
    merged_adapter,
    read_adapter,
    save_adapter,
    set_adapter,
    unmerge_adapter,
)
from deltaw.adapters.lora import LoRAConfig, LoRALinear, LoRAReport, add_lora
from deltaw.adapters.prefix import PrefixConfig, PrefixReport, add_prefix, prefix_rows, prefix_values, set_prefix_rows
from deltaw.adapters.targets import TargetError
from deltaw.models.export import export_merged, unload
from deltaw.models.loading import BUNDLED_NAME, ModelLoadError, load_model
from deltaw.models.quantized import dequantize_model, merge_into_nf4, quantize_model, save_quantized
from deltaw.quant import nf4
from deltaw.quant.linear import NF4Linear, linear_nf4
from deltaw.serve import AdapterBank, Engine, SamplingParams
from deltaw.tools.plan import model_plan, shape_plan
from deltaw.tools.svdtools import combine_adapters, extract_adapter, resize_adapter

__version__ = "0.1.0"

__all__ = [
    "AdapterBank",
    "AdapterFormatError",
    "BUNDLED_NAME",
    "Engine",
    "LoRAConfig",
    "LoRALinear",
    "LoRAReport",
    "ModelLoadError",
    "NF4Linear",
    "PrefixConfig",
    "PrefixReport",
    "SamplingParams",
    "TargetError",
    "active_adapter",
    "add_lora",
    "add_prefix",
    "combine_adapters",
    "deactivate_adapters",
    "delete_adapter",
    "dequantize_model",
    "describe_adapter",
    "disable_adapters",
    "export_merged",
    "extract_adapter",
    "linear_nf4",
    "list_adapters",
    "load_adapter",
    "load_model",
    "merge_adapter",
    "merge_into_nf4",
    "merged_adapter",
    "model_plan",
    "prefix_rows",
    "prefix_values",
    "quantize_model",
    "read_adapter",
    "resize_adapter",
    "save_adapter",
    "save_quantized",
    "set_adapter",
    "set_prefix_rows",
    "shape_plan",
    "unload",
    "unmerge_adapter",
]
