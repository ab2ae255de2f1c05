"""Prefix adapters on disk: PEFT's layout, a faithful reload, and a clear error for every bad file."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltaw
from deltaw.adapters.files import CONFIG_FILE, WEIGHTS_FILE
from deltaw.adapters.lora.files import read_lora_adapter
from deltaw.adapters.prefix import PrefixConfig
from deltaw.adapters.prefix import add_prefix, prefix_values
from tests.conftest import make_tiny_llama


@pytest.fixture
def saved(tmp_path):
    model = make_tiny_llama()
    add_prefix(model, PrefixConfig(num_virtual_tokens=4), "p")
    return deltaw.save_adapter(model, tmp_path / "p", "p", metadata={"note": "kept"}), model


def edit_config(path, **changes):
    config = json.loads((path / CONFIG_FILE).read_text())
    config.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def test_files_are_peft_layout_and_reload_exactly(saved, tokens):
    path, model = saved
    config = json.loads((path / CONFIG_FILE).read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "num_virtual_tokens", "num_layers", "token_dim",
                                   "num_attention_heads", "num_transformer_submodules", "prefix_projection")} == {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "num_layers": 2,
        "token_dim": 32, "num_attention_heads": 2, "num_transformer_submodules": 1, "prefix_projection": False}
    assert set(config["deltaw"]["fingerprint"]) == {"architecture", "shapes", "weights"}
    assert config["deltaw"]["note"] == "kept"
    tensors = load_file(str(path / WEIGHTS_FILE))
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (4, 2 * 2 * 32)
    loaded = make_tiny_llama()
    deltaw.load_adapter(loaded, path, "again")
    assert torch.equal(prefix_values(loaded, "again"), prefix_values(model, "p").detach())
    assert "again" not in [n for n, p in loaded.named_parameters() if p.requires_grad]
    text = deltaw.describe_adapter(path)
    assert "PREFIX_TUNING" in text and "4 virtual tokens x 2 layers x key, value x 2 kv heads x 16" in text
    assert "parameters    512 (float32)" in text and '"note": "kept"' in text


BAD_CONFIGS = {
    "num_layers": ({"num_layers": 3}, "the files do not belong together"),
    "token_dim type": ({"token_dim": "32"}, "key 'token_dim': expected a positive integer"),
    "encoder-decoder": ({"num_transformer_submodules": 2}, "num_transformer_submodules.*decoder-only"),
    "heads": ({"num_attention_heads": 3}, "token_dim 32 is not a multiple of num_attention_heads 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_inconsistent_config_is_refused(saved, case):
    path, _ = saved
    changes, message = BAD_CONFIGS[case]
    edit_config(path, **changes)
    model = make_tiny_llama()
    with pytest.raises(deltaw.AdapterFormatError, match=message):
        deltaw.load_adapter(model, path, "x")
    assert deltaw.list_adapters(model) == [] and not hasattr(model, "deltaw_prefixes")


def test_another_model_geometry_is_refused(saved):
    path, _ = saved
    edit_config(path, num_attention_heads=4, token_dim=32)  # as PEFT wrote before its GQA fix: heads = query heads
    with pytest.raises(deltaw.AdapterFormatError, match="'num_attention_heads' is 4, but the model has 2"):
        deltaw.load_adapter(make_tiny_llama(), path, "x")


def test_another_base_model_is_refused_unless_overridden(saved):
    path, _ = saved
    other = make_tiny_llama(seed=5)
    with pytest.raises(deltaw.AdapterFormatError, match="made for another base model.*weights"):
        deltaw.load_adapter(other, path, "x")
    deltaw.load_adapter(other, path, "x", ignore_fingerprint=True)


def test_bad_tensors_are_refused(saved):
    path, _ = saved
    prefixes = load_file(str(path / WEIGHTS_FILE))["prompt_embeddings"]
    save_file({"prompt_embeddings": prefixes, "extra": prefixes.clone()}, str(path / WEIGHTS_FILE))
    with pytest.raises(deltaw.AdapterFormatError, match=r"exactly one tensor 'prompt_embeddings'.*'extra'"):
        deltaw.load_adapter(make_tiny_llama(), path, "x")
    save_file({"prompt_embeddings": prefixes[:3]}, str(path / WEIGHTS_FILE))
    with pytest.raises(deltaw.AdapterFormatError, match=r"shape \[3, 128\].*\[4, 128\]"):
        deltaw.load_adapter(make_tiny_llama(), path, "x")
    prefixes[0, 0] = float("nan")
    save_file({"prompt_embeddings": prefixes}, str(path / WEIGHTS_FILE))
    with pytest.raises(deltaw.AdapterFormatError, match="NaN or Inf"):
        deltaw.load_adapter(make_tiny_llama(), path, "x")


def test_lora_only_readers_name_the_prefix_type(saved):
    path, _ = saved
    assert deltaw.read_adapter(path).prompt_embeddings.shape[0] == 4  # the generic reader reads every kind
    with pytest.raises(deltaw.AdapterFormatError, match="expected 'LORA', found 'PREFIX_TUNING'.*LoRA adapters only"):
        read_lora_adapter(path)  # what resize and combine read
