"""deltaw's llama.cpp layout table against the references that define it: gguf-py's tensor-name map (llama.cpp's
own Python package) for the names, and transformers' GGUF reader for the q/k row order of llama-family models.
(tests/peers compares whole files with llama.cpp's convert_lora_to_gguf.py and runs them in llama-server.)"""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

import deltaw
from deltaw.adapters.lora.files import read_lora_adapter
from deltaw.adapters.lora.gguf import read_gguf_adapter, write_gguf
from deltaw.adapters.lora.gguf_layout import ARCHITECTURES, LAYER_TENSORS, MODEL_TENSORS, module_path, tensor_name
from tests.conftest import make_tiny_llama, randomize_lora_b
from tests.unit.test_gguf import tiny_model

ARCH_ENUMS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_names_match_gguf_py(model_type):
    reference = gguf.get_tensor_name_map(ARCH_ENUMS[ARCHITECTURES[model_type].name], 4)
    for path in LAYER_TENSORS:
        module = f"model.layers.3.{path}"
        assert tensor_name(module) == reference.get_name(module) + ".weight"
        assert module_path(tensor_name(module)) == module
    for module in MODEL_TENSORS:  # Gemma and Gemma 2 have no output head of their own
        expected = reference.get_name(module)
        assert tensor_name(module, ARCHITECTURES[model_type]) == (None if expected is None else expected + ".weight")


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_q_and_k_rows_are_in_the_order_transformers_reads_from_llamacpp(tmp_path, model_type):
    """transformers un-permutes llama-family q/k weights when it loads a llama.cpp GGUF model; applied to the
    exported lora_b it must give back deltaw's B. Other architectures keep the rows as they are."""
    model = make_tiny_llama() if model_type == "llama" else tiny_model(model_type)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, alpha=4), "a")  # alpha = r: nothing to fold
    randomize_lora_b(model, "a")
    adapter = read_lora_adapter(deltaw.save_adapter(model, tmp_path / "a", "a"))
    write_gguf(adapter, model.config, tmp_path / "a.gguf")
    exported = read_gguf_adapter(tmp_path / "a.gguf").weights  # lora_b as stored in the file
    processor = LlamaTensorProcessor(config=model.config.to_dict())
    for leaf, tensor in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        module = f"model.layers.1.self_attn.{leaf}"
        stored = exported[module][1]
        if ARCHITECTURES[model_type].permute_qk:
            stored = torch.from_numpy(processor.process(stored.numpy(), f"blk.1.{tensor}.weight").weights)
        assert torch.equal(stored, adapter.weights[module][1])
    if model_type == "llama":
        assert not torch.equal(exported["model.layers.1.self_attn.q_proj"][1],
                               adapter.weights["model.layers.1.self_attn.q_proj"][1])
