"""Against PEFT's prefix-tuning: deltaw's prefix adapters load in PEFT and generate the same tokens, and
PEFT's load in deltaw with the same logits, on a tiny grouped-query Llama and on the bundled model."""

import copy
import warnings

import pytest
import torch

import deltaw
from deltaw.adapters.prefix import PrefixConfig
from deltaw.adapters.prefix import add_prefix
from tests.conftest import make_tiny_llama

peft = pytest.importorskip("peft")


def peft_model(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it ignores the "deltaw" config key
        return peft.PeftModel.from_pretrained(base, str(path)).eval()


def greedy(model, ids, mask, tokens=8):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False,
                              pad_token_id=0)


def peft_greedy(model, ids, mask, tokens=8, pad_token_id=0):
    """PEFT's greedy tokens from its forward alone: a full forward per token, no KV cache, positions counted over
    the mask as generate() counts them, and generate()'s stop on eos. Not PEFT's generate(): PEFT (up to 0.21.2 at
    least) hands its prefix cache to generate() under `past_key_values`, while transformers 5.24 passes its own empty
    `cache` as well, and the model keeps `cache` and drops the prefix: PEFT's generate() then runs the base model."""
    eos = model.generation_config.eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.long)
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            chosen = logits[:, -1].argmax(-1).masked_fill(done, pad_token_id)
            ids, mask = torch.cat([ids, chosen[:, None]], 1), torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            done |= torch.isin(chosen, eos)
            if done.all():
                break
    return ids


def left_padded(tokens):
    """Row 1 left-padded by 4: generation must place the prefix and positions right for both rows."""
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    return tokens, mask


@pytest.mark.parametrize("projection", [None, 16])
def test_deltaw_prefix_loads_in_peft_and_generates_the_same_tokens(tmp_path, tokens, projection):
    model = make_tiny_llama()
    base = copy.deepcopy(model)
    add_prefix(model, PrefixConfig(num_virtual_tokens=6, projection=projection is not None,
                                   projection_hidden=projection or 512))
    path = deltaw.save_adapter(model, tmp_path / "ours", "default")
    theirs = peft_model(base, path)
    ids, mask = left_padded(tokens)
    assert torch.equal(greedy(model, ids, mask), peft_greedy(theirs, ids, mask))
    with torch.no_grad():
        difference = model(input_ids=tokens).logits - theirs(input_ids=tokens).logits
    assert difference.abs().max() <= 1e-5


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_peft_prefix_loads_in_deltaw_with_the_same_logits(tmp_path, tokens, attention):
    base = make_tiny_llama()
    base.set_attn_implementation(attention)
    ours = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7)).eval()
    theirs.save_pretrained(str(tmp_path / "p"))
    deltaw.load_adapter(ours, tmp_path / "p", "p")
    deltaw.set_adapter(ours, "p")
    ids, mask = tokens, torch.ones_like(tokens)
    mask[1, 9:] = 0  # right padding: PEFT's forward counts positions from 0 on every row
    with torch.no_grad():
        expected, found = theirs(input_ids=ids, attention_mask=mask).logits, ours(input_ids=ids, attention_mask=mask).logits
    assert (found - expected)[mask.bool()].abs().max() <= 1e-5
    assert torch.equal(greedy(ours, *left_padded(tokens)), peft_greedy(theirs, *left_padded(tokens)))


@pytest.mark.slow
def test_bundled_model_round_trip_both_ways(bundled_pristine, bundled_tokens, tmp_path):
    model, tokenizer = bundled_pristine
    ours = copy.deepcopy(model)
    add_prefix(ours, PrefixConfig(num_virtual_tokens=20, init="activations"), init_ids=bundled_tokens.flatten())
    with torch.no_grad():
        ours.deltaw_prefixes.default.prompt_embeddings.mul_(1.5)  # not a real prompt's keys any more
    path = deltaw.save_adapter(ours, tmp_path / "ours", "default")
    theirs = peft_model(copy.deepcopy(model), path)
    mask = (bundled_tokens != tokenizer.pad_token_id).long()
    row, row_mask = bundled_tokens[:1], mask[:1]
    assert torch.equal(greedy(ours, row, row_mask, 12), peft_greedy(theirs, row, row_mask, 12))

    del theirs
    base = copy.deepcopy(model)
    theirs = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)).eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = copy.deepcopy(model)
    deltaw.load_adapter(back, tmp_path / "theirs", "p")
    deltaw.set_adapter(back, "p")
    with torch.no_grad():
        expected = theirs(input_ids=bundled_tokens[:1]).logits
        found = back(input_ids=bundled_tokens[:1]).logits
    assert (found - expected).abs().max() <= 1e-4
