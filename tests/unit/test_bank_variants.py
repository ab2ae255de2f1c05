"""The adapter bank with DoRA, embedding-LoRA and trainable-token adapters next to LoRA and base rows: the batched
paths equal the per-row reference, each row equals the adapter alone on LoRALinear / LoRAEmbedding, and a
weighted mix is the weighted sum of the members' weight changes (DoRA's too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltaw
from deltaw.serve.bank import AdapterBank
from tests.conftest import make_tiny_llama
from tests.unit.test_bank import routed_logits

TOKEN_IDS = [5, 17, 60]
CONFIGS = {
    "dora": deltaw.LoRAConfig(rank=4, alpha=8, use_dora=True),
    "dora-attn": deltaw.LoRAConfig(rank=2, alpha=4, use_dora=True, use_rslora=True, targets=[r".*(q|v)_proj"]),
    "lora": deltaw.LoRAConfig(rank=8, alpha=16, targets=[r".*mlp\..*"]),
    "embedding": deltaw.LoRAConfig(rank=4, alpha=8, targets=[r".*embed_tokens", r".*k_proj"]),
    "tokens": deltaw.LoRAConfig(rank=2, alpha=4, targets=[r".*o_proj"], trainable_tokens=TOKEN_IDS),
}
BATCH = [None, "dora", "lora", "embedding", "tokens", "dora-attn", {"dora": 0.5, "lora": 0.5},
         {"dora": 0.7, "embedding": -0.4, "tokens": 1.0}, {"dora-attn": -1.0}]


def write_adapters(directory: Path, tie: bool) -> dict[str, Path]:
    """Each adapter of CONFIGS trained a little by hand: every adapter tensor moved away from its init."""
    paths = {}
    for seed, (name, config) in enumerate(CONFIGS.items(), start=1):
        model = make_tiny_llama(tie=tie)
        torch.manual_seed(seed)
        deltaw.add_lora(model, config, name)
        generator = torch.Generator().manual_seed(seed)
        for key, param in model.named_parameters():
            if "lora_" in key or "token_values" in key:
                param.data += torch.randn(param.shape, generator=generator) * 0.15
        paths[name] = deltaw.save_adapter(model, directory / name, name)
    return paths


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def setup(request, tmp_path):
    tie = request.param
    paths = write_adapters(tmp_path, tie)
    bank = AdapterBank(make_tiny_llama(tie=tie))
    for name, path in paths.items():
        bank.load(name, path)
    ids = torch.randint(0, 128, (len(BATCH), 9), generator=torch.Generator().manual_seed(0))
    ids[:, 2], ids[:, 5] = TOKEN_IDS[0], TOKEN_IDS[2]  # the token rows matter in every row
    return tie, paths, bank, ids


@pytest.fixture(params=["dense", "grouped"])
def path_choice(request, monkeypatch):
    if request.param == "grouped":
        monkeypatch.setattr("deltaw.adapters.lora.routed.DENSE_MAX_RANK", 0)


def test_batched_rows_equal_the_per_row_reference(setup, path_choice):
    _, _, bank, ids = setup
    fast = routed_logits(bank, ids, BATCH)
    reference = routed_logits(bank, ids, BATCH, reference=True)
    assert (fast - reference).abs().max() <= 1e-5
    base = make_tiny_llama(tie=setup[0])(ids).logits.detach()
    assert (fast[0] - base[0]).abs().max() <= 1e-5
    for row in range(1, len(BATCH)):
        assert (fast[row] - base[row]).abs().max() > 1e-2, BATCH[row]


def test_each_row_equals_the_adapter_alone_unmerged(setup):
    tie, paths, bank, ids = setup
    names = [choice for choice in BATCH if isinstance(choice, str)]
    fast = routed_logits(bank, ids, BATCH)
    for name in names:
        row = BATCH.index(name)
        model = make_tiny_llama(tie=tie)
        deltaw.load_adapter(model, paths[name], name)
        deltaw.set_adapter(model, name)
        with torch.no_grad():
            alone = model(ids[row : row + 1]).logits[0]
        assert (fast[row] - alone).abs().max() <= 1e-5, name


def merged_weights(tie: bool, path: Path | None) -> dict[str, torch.Tensor]:
    """The state of the tiny model with the adapter in `path` merged (the base for None)."""
    model = make_tiny_llama(tie=tie)
    if path is not None:
        deltaw.load_adapter(model, path, "x")
        deltaw.merge_adapter(model, "x")
    return {key: value.detach().clone() for key, value in model.state_dict().items()
            if "lora_" not in key and "token_values" not in key}


def test_a_weighted_mix_is_the_weighted_sum_of_weight_changes(setup):
    """Mixes of DoRA, LoRA, embedding and token adapters: the model W + Σ_i w_i (W'_i − W), W'_i merged."""
    tie, paths, bank, ids = setup
    fast = routed_logits(bank, ids, BATCH)
    base = merged_weights(tie, None)
    for row, choice in enumerate(BATCH):
        if not isinstance(choice, dict):
            continue
        state = {key: value.clone() for key, value in base.items()}
        for name, weight in choice.items():
            for key, value in merged_weights(tie, paths[name]).items():
                state[key] += weight * (value - base[key])
        model = make_tiny_llama(tie=False)  # the mix may change a tied embedding and head differently
        model.load_state_dict(state)
        with torch.no_grad():
            expected = model(ids[row : row + 1]).logits[0]
        assert (fast[row] - expected).abs().max() <= 1e-4, choice
