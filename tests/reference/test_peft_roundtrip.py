"""Against PEFT: deltaw's adapters load in PEFT with the same logits, and PEFT's load in deltaw."""

import copy
import warnings

import pytest
import torch

import deltaw
from tests.conftest import make_tiny_llama, randomize_lora_b

peft = pytest.importorskip("peft")


def peft_logits(base, path, tokens):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it ignores the "deltaw" config key
        model = peft.PeftModel.from_pretrained(base, str(path)).eval()
    with torch.no_grad():
        return model(tokens).logits


def randomize_peft_b(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.1)


DELTAW_CONFIGS = {
    "all-linear": deltaw.LoRAConfig(rank=4, alpha=8),
    "rslora+gaussian": deltaw.LoRAConfig(rank=8, alpha=4, use_rslora=True, init="gaussian"),
    "subset": deltaw.LoRAConfig(rank=2, alpha=16, targets=[r"model\.layers\.1\..*"], exclude=[r".*\.o_proj"]),
}


@pytest.mark.parametrize("case", sorted(DELTAW_CONFIGS))
def test_deltaw_adapter_loads_in_peft_with_the_same_logits(tmp_path, tokens, case):
    model = make_tiny_llama()
    base = copy.deepcopy(model)
    deltaw.add_lora(model, DELTAW_CONFIGS[case])
    randomize_lora_b(model, "default")
    with torch.no_grad():
        ours = model(tokens).logits
    path = deltaw.save_adapter(model, tmp_path / "a", "default")
    theirs = peft_logits(base, path, tokens)
    with deltaw.disable_adapters(model):
        assert not torch.allclose(ours, model(tokens).logits)  # the adapter matters
    assert (ours - theirs).abs().max() <= 1e-5


PEFT_CONFIGS = {
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "list": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "regex": dict(r=4, lora_alpha=4, target_modules=r".*\.1\.mlp\.(up|down)_proj"),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                     rank_pattern={"k_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.down_proj": 3}),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["o_proj"]),
    "exclude": dict(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["gate_proj"]),
}


@pytest.mark.parametrize("case", sorted(PEFT_CONFIGS))
def test_peft_adapter_loads_in_deltaw_with_the_same_logits(tmp_path, tokens, case):
    base = make_tiny_llama()
    ours_model = copy.deepcopy(base)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **PEFT_CONFIGS[case])).eval()
    randomize_peft_b(peft_model)
    with torch.no_grad():
        theirs = peft_model(tokens).logits
    peft_model.save_pretrained(str(tmp_path / "p"))
    deltaw.load_adapter(ours_model, tmp_path / "p", "p")
    deltaw.set_adapter(ours_model, "p")
    with torch.no_grad():
        ours = ours_model(tokens).logits
    with deltaw.disable_adapters(ours_model):
        assert not torch.allclose(ours, ours_model(tokens).logits)
    assert (ours - theirs).abs().max() <= 1e-5


def test_resaved_peft_adapter_loads_in_peft_again(tmp_path, tokens):
    """PEFT -> deltaw -> disk -> PEFT keeps per-layer ranks and alphas."""
    base = make_tiny_llama()
    copies = [copy.deepcopy(base) for _ in range(2)]
    peft_model = peft.get_peft_model(base, peft.LoraConfig(**PEFT_CONFIGS["patterns"])).eval()
    randomize_peft_b(peft_model)
    with torch.no_grad():
        expected = peft_model(tokens).logits
    peft_model.save_pretrained(str(tmp_path / "p"))
    deltaw.load_adapter(copies[0], tmp_path / "p", "p")
    deltaw.save_adapter(copies[0], tmp_path / "again", "p")
    assert (peft_logits(copies[1], tmp_path / "again", tokens) - expected).abs().max() <= 1e-5


def test_merge_matches_peft_merge(tmp_path, tokens):
    model = make_tiny_llama()
    base = copy.deepcopy(model)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, alpha=8))
    randomize_lora_b(model, "default")
    path = deltaw.save_adapter(model, tmp_path / "a", "default")
    deltaw.merge_adapter(model, "default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = peft.PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    ours = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    theirs = merged.state_dict()
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6


@pytest.mark.slow
def test_bundled_model_round_trip_both_ways(bundled, bundled_pristine, bundled_tokens, tmp_path):
    model, _ = bundled
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=16, alpha=32))
    randomize_lora_b(model, "default", std=0.02)
    with torch.no_grad():
        ours = model(bundled_tokens).logits
    path = deltaw.save_adapter(model, tmp_path / "ours", "default")
    theirs = peft_logits(copy.deepcopy(bundled_pristine[0]), path, bundled_tokens)
    assert (ours - theirs).abs().max() <= 1e-4

    peft_model = peft.get_peft_model(copy.deepcopy(bundled_pristine[0]),
                                     peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).eval()
    randomize_peft_b(peft_model)
    with torch.no_grad():
        theirs = peft_model(bundled_tokens).logits
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    deltaw.load_adapter(model, tmp_path / "theirs", "peft")
    deltaw.set_adapter(model, "peft")
    with torch.no_grad():
        assert (model(bundled_tokens).logits - theirs).abs().max() <= 1e-4


@pytest.mark.slow
def test_bundled_merge_error_is_no_larger_than_peft(bundled, bundled_pristine, bundled_tokens, tmp_path):
    """Merged-vs-unmerged logits differ by fp32 rounding only: no more for deltaw than for PEFT."""
    model, _ = bundled
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=16, alpha=32))
    randomize_lora_b(model, "default", std=0.02)
    path = deltaw.save_adapter(model, tmp_path / "a", "default")
    with torch.no_grad():
        unmerged = model(bundled_tokens).logits
        deltaw.merge_adapter(model, "default")
        ours = (model(bundled_tokens).logits - unmerged).abs().max().item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(bundled_pristine[0]), str(path)).eval()
    with torch.no_grad():
        peft_unmerged = peft_model(bundled_tokens).logits
        peft_model.merge_adapter()
        theirs = (peft_model(bundled_tokens).logits - peft_unmerged).abs().max().item()
    assert (peft_unmerged - unmerged).abs().max() <= 1e-4
    assert ours <= theirs * 1.05
