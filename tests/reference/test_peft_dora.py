"""Against PEFT: DoRA, embedding / output-head LoRA and trainable tokens load both ways with the same logits,
and a merged DoRA model computes what PEFT's merged model computes."""

import copy
import warnings

import pytest
import torch

import deltaw
from deltaw.adapters.lora.inject import adapter_layers
from tests.conftest import make_tiny_llama

peft = pytest.importorskip("peft")


def perturb(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Move every trainable tensor away from its init (B, DoRA magnitudes, embedding A, token rows)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if any(part in name for part in ("lora_", "token_values", "trainable_tokens_delta")):
            param.data += torch.randn(param.shape, generator=generator) * std


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def peft_logits(base, path, tokens):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the "deltaw" key and the embeddings it does not find
        model = peft.PeftModel.from_pretrained(base, str(path)).eval()
    return logits(model, tokens), model


DELTAW = {  # (tied embeddings, config)
    "dora all-linear": (False, deltaw.LoRAConfig(rank=4, alpha=8, use_dora=True)),
    "dora rslora subset": (False, deltaw.LoRAConfig(rank=8, alpha=4, use_rslora=True, use_dora=True,
                                                    targets=[r".*\.1\..*proj"], exclude=[r".*\.o_proj"])),
    "embedding and head": (False, deltaw.LoRAConfig(rank=4, alpha=8, targets=[r".*embed_tokens", "lm_head",
                                                                              r".*q_proj"])),
    "dora on an untied head": (False, deltaw.LoRAConfig(rank=4, alpha=8, use_dora=True, targets=["lm_head", r".*v_proj"])),
    "tokens untied": (False, deltaw.LoRAConfig(rank=4, alpha=8, targets=[r".*q_proj"], trainable_tokens=[3, 17, 90])),
    "tokens tied": (True, deltaw.LoRAConfig(rank=4, alpha=8, targets=[r".*q_proj"], trainable_tokens="5,6")),
    "tied embedding lora": (True, deltaw.LoRAConfig(rank=4, alpha=8, targets=[r".*embed_tokens", r".*up_proj"])),
}


@pytest.mark.parametrize("case", sorted(DELTAW))
def test_deltaw_adapter_loads_in_peft_with_the_same_logits(tmp_path, tokens, case):
    tie, config = DELTAW[case]
    model = make_tiny_llama(tie=tie)
    base = copy.deepcopy(model)
    deltaw.add_lora(model, config)
    perturb(model)
    ours = logits(model, tokens)
    with deltaw.disable_adapters(model):
        assert (ours - logits(model, tokens)).abs().max() > 1e-3  # the adapter matters
    path = deltaw.save_adapter(model, tmp_path / "a", "default")
    theirs, _ = peft_logits(base, path, tokens)
    assert (ours - theirs).abs().max() <= 1e-5


PEFT = {  # (tied embeddings, PEFT LoraConfig arguments)
    "dora list": (False, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "dora all-linear rslora": (False, dict(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear",
                                           use_dora=True)),
    "embedding and head": (False, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "k_proj"])),
    "tokens untied": (False, dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[1, 5, 77])),
    "tokens tied": (True, dict(r=4, lora_alpha=8, target_modules=["o_proj"], trainable_token_indices=[2, 9])),
    "tokens dict": (True, dict(r=4, lora_alpha=8, target_modules=["o_proj"],
                               trainable_token_indices={"embed_tokens": [4, 8]})),
}


@pytest.mark.parametrize("case", sorted(PEFT))
def test_peft_adapter_loads_in_deltaw_with_the_same_logits(tmp_path, tokens, case):
    tie, arguments = PEFT[case]
    base = make_tiny_llama(tie=tie)
    ours_model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **arguments)).eval()
    perturb(peft_model, seed=3)
    theirs = logits(peft_model, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path / "p"))
    deltaw.load_adapter(ours_model, tmp_path / "p", "p")
    deltaw.set_adapter(ours_model, "p")
    ours = logits(ours_model, tokens)
    with deltaw.disable_adapters(ours_model):
        assert (ours - logits(ours_model, tokens)).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= 1e-5


def test_merged_dora_equals_peft_merged_and_both_unmerged(tmp_path, tokens):
    model = make_tiny_llama()
    base = copy.deepcopy(model)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, alpha=8, use_dora=True, targets=[r".*(q|v|down)_proj", "lm_head"]))
    perturb(model)
    unmerged = logits(model, tokens)
    path = deltaw.save_adapter(model, tmp_path / "a", "default")
    deltaw.merge_adapter(model, "default")
    merged = logits(model, tokens)
    _, peft_model = peft_logits(base, path, tokens)
    peft_merged = logits(peft_model.merge_and_unload(), tokens)
    assert (merged - unmerged).abs().max() <= 1e-5
    assert (merged - peft_merged).abs().max() <= 1e-5


def test_modules_to_save_from_peft_is_refused_with_the_alternatives(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(target_modules=["q_proj"],
                                                                            modules_to_save=["lm_head"]))
        peft_model.save_pretrained(str(tmp_path / "p"))
    with pytest.raises(deltaw.AdapterFormatError, match="modules_to_save.*not supported.*LoRA.*trainable tokens"):
        deltaw.load_adapter(make_tiny_llama(), tmp_path / "p", "p")


def test_peft_embedding_copy_of_another_model_is_refused(tmp_path):
    """PEFT saves the targeted embedding's weight; a copy that differs from the model's is not ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(make_tiny_llama(seed=4), peft.LoraConfig(target_modules=["embed_tokens"]))
        peft_model.save_pretrained(str(tmp_path / "p"))
    model = make_tiny_llama()
    with pytest.raises(deltaw.AdapterFormatError, match="another version of 'model.embed_tokens'"):
        deltaw.load_adapter(model, tmp_path / "p", "p", ignore_fingerprint=True)
    assert not list(adapter_layers(model)) and not deltaw.list_adapters(model)
