"""Adapter files: PEFT layout, round trip, and loud refusal of every kind of bad file."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltaw
from deltaw.adapters.files import CONFIG_FILE, WEIGHTS_FILE
from tests.conftest import make_tiny_llama, randomize_lora_b

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def saved(tmp_path):
    """A tiny model with a non-trivial adapter saved to disk; returns (dir, logits with it)."""
    model = make_tiny_llama()
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, alpha=8))
    randomize_lora_b(model, "default")
    path = deltaw.save_adapter(model, tmp_path / "adapter", "default", metadata={"note": "test"})
    tokens = torch.arange(12).reshape(1, 12)
    return path, model(tokens).logits


def tiny_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_files_are_in_peft_layout(saved):
    path, _ = saved
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert set(config["deltaw"]["fingerprint"]) == {"architecture", "shapes", "weights"}
    assert config["deltaw"]["note"] == "test"
    tensors = load_file(str(path / WEIGHTS_FILE))
    assert tensors[f"{Q0}.lora_A.weight"].shape == (4, 64)
    assert tensors[f"{Q0}.lora_B.weight"].shape == (64, 4)
    assert len(tensors) == 2 * 14
    assert not list(path.glob(".*.tmp"))


def test_round_trip_gives_the_same_logits(saved):
    path, logits = saved
    model = make_tiny_llama()
    deltaw.load_adapter(model, path, "loaded")
    assert deltaw.active_adapter(model) is None  # loading does not switch
    deltaw.set_adapter(model, "loaded")
    assert torch.equal(model(torch.arange(12).reshape(1, 12)).logits, logits)


def test_subset_targets_and_per_layer_ranks_round_trip(tmp_path):
    model = make_tiny_llama()
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, alpha=8, targets=[r"model\.layers\.1\.self_attn\.(q|k)_proj"]))
    model.model.layers[1].self_attn.k_proj.add_adapter("default", torch.randn(2, 64), torch.randn(32, 2), 3.0)
    randomize_lora_b(model, "default")
    tokens = torch.arange(12).reshape(1, 12)
    with torch.no_grad():  # inference: the fused training node (grad enabled, frozen base) rounds differently
        expected = model(tokens).logits
    path = deltaw.save_adapter(model, tmp_path / "a", "default")
    config = json.loads((path / CONFIG_FILE).read_text())
    assert re.fullmatch(config["target_modules"], "model.layers.1.self_attn.q_proj")
    assert not re.fullmatch(config["target_modules"], "model.layers.0.self_attn.q_proj")
    assert list(config["rank_pattern"].values()) == [2] and list(config["alpha_pattern"].values()) == [6.0]
    fresh = make_tiny_llama()
    deltaw.load_adapter(fresh, path, "x")
    deltaw.set_adapter(fresh, "x")
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, expected)


def rewrite_tensors(path, change):
    tensors = load_file(str(path / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE))


def rewrite_config(path, change):
    config = json.loads((path / CONFIG_FILE).read_text())
    change(config)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def _rename_prefix(t):
    for key in list(t):
        t[key.replace("base_model.model.", "")] = t.pop(key)


def _rank_mismatch(t):
    t[f"{Q0}.lora_A.weight"] = torch.zeros(3, 64)
    t[f"{Q0}.lora_B.weight"] = torch.zeros(64, 3)


BAD_TENSORS = {
    "missing key": (lambda t: t.pop(f"{Q0}.lora_B.weight"), "missing key .*q_proj.lora_B.weight"),
    "missing module": (lambda t: [t.pop(f"{Q0}.lora_A.weight"), t.pop(f"{Q0}.lora_B.weight")], "missing key"),
    "extra key": (lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                                      "base_model.model.lm_head.lora_B.weight": torch.zeros(128, 4)}), "extra key"),
    "unexpected key": (lambda t: t.update({f"{Q0}.lora_B.bias": torch.zeros(64)}), "unexpected key"),
    "magnitude without use_dora": (lambda t: t.update({f"{Q0}.lora_magnitude_vector": torch.zeros(64)}),
                                   "is a DoRA magnitude but adapter_config.json says use_dora=false"),
    "token rows without indices": (lambda t: t.update({
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(2, 64)}),
        "holds token rows but adapter_config.json has no trainable_token_indices"),
    "wrong prefix": (_rename_prefix, "wrong prefix"),
    "shape mismatch": (lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(4, 65)}), "shape mismatch"),
    "rank inconsistent": (_rank_mismatch, "rank 3 but adapter_config.json says r=4"),
    "nan": (lambda t: t[f"{Q0}.lora_B.weight"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
    "inf": (lambda t: t[f"{Q0}.lora_A.weight"].__setitem__((1, 1), float("inf")), "NaN or Inf"),
    "absent target": (lambda t: t.update({"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
                                          "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}),
                      "not a linear layer of this model"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensors_are_refused_and_the_model_is_untouched(saved, case):
    path, _ = saved
    change, message = BAD_TENSORS[case]
    rewrite_tensors(path, change)
    model = make_tiny_llama()
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=2), name="existing")
    before = tiny_state(model)
    modules_before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(deltaw.AdapterFormatError, match=message) as info:
        deltaw.load_adapter(model, path, "new")
    assert str(path) in str(info.value)
    assert deltaw.list_adapters(model) == ["existing"]
    after = tiny_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m).__name__ for m in model.modules()] == modules_before


BAD_CONFIGS = {
    "dora without magnitudes": (lambda c: c.update(use_dora=True), "missing key .*_proj.lora_magnitude_vector.*"
                                                                   "use_dora=true"),
    "modules_to_save": (lambda c: c.update(modules_to_save=["lm_head"]),
                        "'modules_to_save' = \\['lm_head'\\]: whole-module copies are not supported.*trainable tokens"),
    "token ids without rows": (lambda c: c.update(trainable_token_indices=[1, 2]), "needs exactly one"),
    "bias": (lambda c: c.update(bias="all"), "'bias' = 'all' is not supported"),
    "peft type": (lambda c: c.update(peft_type="IA3"), r"expected one of \['LORA', 'PREFIX_TUNING'\], found 'IA3'"),
    "rank": (lambda c: c.update(r=0), "'r': expected a positive number"),
    "targets": (lambda c: c.update(target_modules=None), "target_modules"),
    "narrower targets": (lambda c: c.update(target_modules=["q_proj"]), "extra key"),
    "wider targets": (lambda c: c.update(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj", "lm_head"]), "missing key .*lm_head"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configs_are_refused(saved, case):
    path, _ = saved
    change, message = BAD_CONFIGS[case]
    rewrite_config(path, change)
    with pytest.raises(deltaw.AdapterFormatError, match=message):
        deltaw.load_adapter(make_tiny_llama(), path, "x")


def test_corrupt_json_is_refused(saved):
    path, _ = saved
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(deltaw.AdapterFormatError, match="not valid JSON"):
        deltaw.load_adapter(make_tiny_llama(), path, "x")


@pytest.mark.parametrize("keep", [0.5, 0.999, 8])
def test_truncated_safetensors_is_refused(saved, keep):
    path, _ = saved
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(deltaw.AdapterFormatError, match="truncated or corrupt"):
        deltaw.load_adapter(make_tiny_llama(), path, "x")


def test_pickle_adapters_are_refused_with_the_reason(saved):
    path, _ = saved
    (path / WEIGHTS_FILE).unlink()
    (path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(deltaw.AdapterFormatError, match="refusing to load a pickle file.*arbitrary code"):
        deltaw.load_adapter(make_tiny_llama(), path, "x")


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(deltaw.AdapterFormatError, match="not a directory"):
        deltaw.load_adapter(make_tiny_llama(), tmp_path / "nope", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(deltaw.AdapterFormatError, match="adapter_config.json"):
        deltaw.load_adapter(make_tiny_llama(), tmp_path / "empty", "x")


def test_another_base_model_is_refused_unless_overridden(saved):
    path, logits = saved
    other = make_tiny_llama(seed=5)  # same architecture, other weights
    with pytest.raises(deltaw.AdapterFormatError, match="made for another base model.*weights.*ignore_fingerprint"):
        deltaw.load_adapter(other, path, "x")
    assert deltaw.list_adapters(other) == []
    deltaw.load_adapter(other, path, "x", ignore_fingerprint=True)
    assert deltaw.list_adapters(other) == ["x"]


def test_fingerprint_ignores_dtype_and_merging(saved):
    path, _ = saved
    model = make_tiny_llama(dtype=torch.bfloat16)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=2), name="other")
    randomize_lora_b(model, "other")
    deltaw.merge_adapter(model, "other")
    deltaw.load_adapter(model, path, "x")  # no fingerprint error
    assert model.model.layers[0].self_attn.q_proj.lora_A["x"].dtype == torch.bfloat16


def test_loading_a_name_twice_is_an_error(saved):
    path, _ = saved
    model = make_tiny_llama()
    deltaw.load_adapter(model, path, "x")
    with pytest.raises(ValueError, match="already loaded"):
        deltaw.load_adapter(model, path, "x")


def test_describe_adapter(saved):
    path, _ = saved
    text = deltaw.describe_adapter(path)
    assert "r=4, alpha=8" in text and "14 (" in text and "7,424" in text and "bytes" in text
    assert "'weights'" in text and '"note": "test"' in text
