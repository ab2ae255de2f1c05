"""LoRA on the embedding and on an untied head, trainable token rows (with a tied head): fresh = base, only the
chosen rows move, exact merge / unmerge that keeps a tie, the fingerprint of the unmerged model, clear errors."""

import pytest
import torch

import deltaw
from deltaw.adapters.fingerprint import model_fingerprint
from deltaw.adapters.lora import LoRAEmbedding, TokenHead
from deltaw.adapters.targets import TargetError
from deltaw.train.data import IGNORE
from deltaw.train.losses import lm_loss_sum
from tests.conftest import make_tiny_llama

TOKENS_AT = [3, 40, 41]


def perturb(model, seed=1, std=0.2):
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name or "token_values" in name:
            param.data += torch.randn(param.shape, generator=generator) * std


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "token_values" not in k}


def embedding_lora(tie=False):
    model = make_tiny_llama(tie=tie)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, alpha=8, targets=[r".*embed_tokens", r".*q_proj"]))
    return model


def token_rows(tie=True):
    model = make_tiny_llama(tie=tie)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=2, targets=[r".*o_proj"], trainable_tokens=TOKENS_AT))
    return model


@pytest.mark.parametrize("build", [embedding_lora, token_rows])
def test_fresh_adapters_compute_the_base_model(build, tokens):
    model = build()
    with deltaw.disable_adapters(model):
        base = model(tokens).logits
    assert torch.equal(model(tokens).logits, base)


def test_token_rows_replace_only_their_rows_in_the_embedding_and_a_tied_head():
    model = token_rows(tie=True)
    assert isinstance(model.model.embed_tokens, LoRAEmbedding) and isinstance(model.lm_head, TokenHead)
    perturb(model)
    embedding, values = model.model.embed_tokens, model.model.embed_tokens.token_values["default"]
    ids = torch.arange(128)
    rows = embedding(ids)
    base = embedding.weight.detach()
    changed = (rows - base).abs().amax(dim=1) > 0
    assert changed.nonzero().flatten().tolist() == TOKENS_AT
    assert torch.equal(rows[TOKENS_AT], values.detach())
    hidden = torch.randn(2, 64)
    logits_changed = (model.lm_head(hidden) - hidden @ base.t()).abs().amax(dim=0) > 1e-6
    assert logits_changed.nonzero().flatten().tolist() == TOKENS_AT


def test_an_untied_head_is_left_alone_by_token_rows():
    model = token_rows(tie=False)
    assert not isinstance(model.lm_head, TokenHead)


def test_training_token_rows_moves_only_those_rows_through_a_tied_head():
    model = token_rows(tie=True)
    input_ids = torch.tensor([[3, 7, 40, 9, 41, 3, 100]])
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    total, _ = lm_loss_sum(model, batch)
    total.backward()
    values = model.model.embed_tokens.token_values["default"]
    assert values.grad is not None and (values.grad.abs().sum(dim=1) > 0).all()
    assert model.model.embed_tokens.weight.grad is None
    reference = make_tiny_llama(tie=True)  # the same gradient by plain autograd on a copy with the rows as leaves
    rows = reference.model.embed_tokens.weight.detach()[TOKENS_AT].clone().requires_grad_(True)
    weight = reference.model.embed_tokens.weight.detach().index_copy(0, torch.tensor(TOKENS_AT), rows)
    hidden = reference.model(inputs_embeds=weight[input_ids]).last_hidden_state[:, :-1]
    loss = torch.nn.functional.cross_entropy((hidden @ weight.t())[0], input_ids[0, 1:], reduction="sum")
    (expected,) = torch.autograd.grad(loss, rows)
    torch.testing.assert_close(values.grad, expected, rtol=1e-4, atol=1e-6)


def test_head_lora_trains_through_the_plain_loss_with_the_right_gradient():
    model = make_tiny_llama()
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=2, targets=["lm_head"]))
    perturb(model)
    input_ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[0, :3] = IGNORE
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    total, count = lm_loss_sum(model, batch)
    lora_b = model.lm_head.lora_B["default"]
    (ours,) = torch.autograd.grad(total, lora_b)
    expected_loss = model(input_ids=input_ids, labels=labels).loss * count
    (expected,) = torch.autograd.grad(expected_loss, lora_b)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("build", [embedding_lora, token_rows])
def test_merge_equals_unmerged_and_unmerge_restores_weights_and_tie(build, tie, tokens):
    model = build(tie=tie)
    perturb(model)
    before = state(model)
    unmerged = model(tokens).logits
    fingerprint = model_fingerprint(model)
    deltaw.merge_adapter(model, "default")
    assert (model(tokens).logits - unmerged).abs().max() <= 1e-5
    assert model_fingerprint(model) == fingerprint  # hashed from the unmerged embedding
    deltaw.unmerge_adapter(model)
    assert all(torch.equal(before[k], v) for k, v in state(model).items())
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert (head.weight is embedding.weight) == tie


def test_merged_lora_on_a_tied_embedding_exports_an_untied_model(tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    from deltaw.models.export import export_merged

    model = embedding_lora(tie=True)
    perturb(model)
    expected = model(tokens).logits
    export_merged(model, _NoTokenizer(), "default", tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert reloaded.config.tie_word_embeddings is False
    assert (reloaded(tokens).logits - expected).abs().max() <= 1e-5


class _NoTokenizer:
    def save_pretrained(self, path: str) -> None:
        pass


def test_a_tied_head_is_refused_with_the_alternatives():
    with pytest.raises(TargetError, match="'lm_head' shares its weight with 'model.embed_tokens'.*LoRA on the input "
                                          "embedding.*trainable tokens"):
        deltaw.add_lora(make_tiny_llama(tie=True), deltaw.LoRAConfig(targets=["lm_head"]))


def test_embedding_and_token_files_round_trip(tmp_path, tokens):
    for build in (embedding_lora, token_rows):
        model = build()
        perturb(model)
        expected = model(tokens).logits
        path = deltaw.save_adapter(model, tmp_path / build.__name__, "default")
        fresh = make_tiny_llama(tie=build is token_rows)
        deltaw.load_adapter(fresh, path, "x")
        deltaw.set_adapter(fresh, "x")
        assert torch.equal(fresh(tokens).logits, expected)
    assert "tokens        3 trainable rows of model.embed_tokens" in deltaw.describe_adapter(tmp_path / "token_rows")
    assert "LoRA on ['model.embed_tokens']" in deltaw.describe_adapter(tmp_path / "embedding_lora")


def test_bad_trainable_tokens_are_refused(tokenizer):
    with pytest.raises(ValueError, match="trainable tokens and LoRA on the same embedding"):
        deltaw.add_lora(make_tiny_llama(), deltaw.LoRAConfig(targets=[r".*embed_tokens"], trainable_tokens=[1]))
    with pytest.raises(ValueError, match="outside the embedding's 128 rows"):
        deltaw.add_lora(make_tiny_llama(), deltaw.LoRAConfig(trainable_tokens=[128]))
    with pytest.raises(ValueError, match="given as text: pass their ids, or a tokenizer"):
        deltaw.add_lora(make_tiny_llama(), deltaw.LoRAConfig(trainable_tokens="<|im_start|>"))
    with pytest.raises(ValueError, match="'<|nope|>' is not in the tokenizer's vocabulary"):
        deltaw.LoRAConfig(trainable_tokens="<|im_start|>,<|nope|>").with_token_ids(tokenizer)
    assert deltaw.LoRAConfig(trainable_tokens="<|im_start|>, <|im_end|>,7").with_token_ids(tokenizer).trainable_tokens \
        == (1, 2, 7)
