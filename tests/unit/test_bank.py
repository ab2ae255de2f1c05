"""The adapter bank: stacked slots against the per-row reference and the foundation's LoRALinear,
exact mixes, LRU eviction and reload, pinning, replacement while requests hold the old slot, and
the checks on names and paths."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import deltaw
from deltaw.adapters.files import CONFIG_FILE, WEIGHTS_FILE, AdapterFormatError
from deltaw.adapters.lora.files import lora_config_dict, write_adapter
from deltaw.serve.bank import AdapterBank, BankFullError, UnknownAdapterError
from deltaw.adapters.targets import linear_modules
from tests.conftest import make_tiny_llama

ATTENTION = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_random_adapter(path: Path, model: nn.Module, leaves: list[str], rank: int, seed: int,
                         std: float = 0.2, alpha: float = 16.0) -> Path:
    """A PEFT-layout adapter on `model`'s layers named `leaves`: random A (scaled 1/√in) and random B of scale `std`."""
    generator = torch.Generator().manual_seed(seed)
    linears = {name: layer for name, layer in linear_modules(model).items() if name.rsplit(".", 1)[-1] in leaves}
    weights = {
        name: (torch.randn(rank, layer.in_features, generator=generator) / layer.in_features**0.5,
               torch.randn(layer.out_features, rank, generator=generator) * std)
        for name, layer in linears.items()
    }
    scalings = {name: alpha / rank for name in linears}
    return write_adapter(path, weights, lora_config_dict({n: rank for n in linears}, scalings, leaves))


@pytest.fixture
def adapters(tmp_path: Path) -> dict[str, Path]:
    """Three adapters on the tiny Llama with different ranks and target sets."""
    model = make_tiny_llama()
    return {
        "attn": write_random_adapter(tmp_path / "attn", model, ATTENTION, rank=2, seed=1),
        "full": write_random_adapter(tmp_path / "full", model, ALL, rank=8, seed=2),
        "mlp": write_random_adapter(tmp_path / "mlp", model, ["down_proj", "up_proj"], rank=4, seed=3),
    }


def routed_logits(bank: AdapterBank, tokens: torch.Tensor, choices: list, reference: bool = False) -> torch.Tensor:
    """Logits [rows, seq, vocab] with row i routed to choices[i]."""
    routes = [bank.acquire(choice) for choice in choices]
    try:
        with bank.forward_lock, torch.no_grad():
            bank.set_routing(routes)
            bank.stores["lora"].routing.reference = reference
            return bank.model(tokens).logits
    finally:
        bank.stores["lora"].routing.reference = False
        for route in routes:
            bank.release(route)


def make_bank(adapters: dict[str, Path], **kwargs) -> AdapterBank:
    bank = AdapterBank(make_tiny_llama(), **kwargs)
    for name, path in adapters.items():
        bank.load(name, path)
    return bank


CHOICES = {  # one adapter in the batch (one matmul per factor) and several (stacked ranks, or grouped by slot)
    "one adapter": [None, "full", {"full": -0.5}, "full"],
    "several": [None, "attn", "full", "mlp", {"attn": 0.5, "mlp": -1.5}, {"full": 0.3, "attn": 1.0, "mlp": 2.0}, "full"],
}


@pytest.fixture(params=["dense", "grouped"])
def multi_adapter_path(request, monkeypatch):
    """Run the test with several adapters on the stacked-rank path and again on the grouped (bmm) path."""
    if request.param == "grouped":
        monkeypatch.setattr("deltaw.adapters.lora.routed.DENSE_MAX_RANK", 0)
    return request.param


@pytest.mark.parametrize("batch", CHOICES)
def test_batched_path_equals_the_per_row_reference(adapters, batch, multi_adapter_path):
    choices = CHOICES[batch]
    bank = make_bank(adapters)
    tokens = torch.randint(0, 128, (len(choices), 9), generator=torch.Generator().manual_seed(0))
    fast = routed_logits(bank, tokens, choices)
    reference = routed_logits(bank, tokens, choices, reference=True)
    assert (fast - reference).abs().max() <= 1e-5
    base = make_tiny_llama()(tokens).logits.detach()
    assert (fast[0] - base[0]).abs().max() <= 1e-5  # the base row is the base model
    for row in range(1, len(choices)):
        assert (fast[row] - base[row]).abs().max() > 1e-2  # every adapter (and mix) changes the output


def test_scattered_slots_are_gathered_and_still_equal_the_reference(adapters, multi_adapter_path):
    bank = make_bank({**adapters, "mlp2": adapters["mlp"], "attn2": adapters["attn"], "full2": adapters["full"]})
    assert bank._known["full2"].slot == 5
    choices = ["attn", "full2", None, {"attn": 2.0, "full2": 0.5}]  # slots 0 and 5: a block would be mostly unused
    tokens = torch.randint(0, 128, (len(choices), 5), generator=torch.Generator().manual_seed(5))
    fast = routed_logits(bank, tokens, choices)
    reference = routed_logits(bank, tokens, choices, reference=True)
    assert (fast - reference).abs().max() <= 1e-5


def test_single_adapter_rows_equal_the_foundation_lora_layers(adapters):
    bank = make_bank(adapters)
    tokens = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    fast = routed_logits(bank, tokens, ["attn", "full", "mlp"])
    for row, name in enumerate(["attn", "full", "mlp"]):
        model = make_tiny_llama()
        deltaw.load_adapter(model, adapters[name], name)
        deltaw.set_adapter(model, name)
        expected = model(tokens[row : row + 1]).logits.detach()
        assert (fast[row] - expected[0]).abs().max() <= 1e-5


def test_a_mix_is_the_exact_weighted_sum_of_deltas(adapters):
    bank = make_bank(adapters)
    layer = bank.stores["lora"].layers["model.layers.1.mlp.down_proj"]  # "full" and "mlp" target it, "attn" does not
    x = torch.randn(1, 5, layer.in_features).expand(5, -1, -1)  # the same input in every row
    choices = [None, "attn", "full", "mlp", {"attn": 0.7, "full": -0.4, "mlp": 3.0}]
    routes = [bank.acquire(choice) for choice in choices]
    with torch.no_grad():
        bank.set_routing(routes)
        base, attn, full, mlp, mix = layer(x)
    assert torch.equal(attn, base)  # an adapter that skips a layer adds exactly nothing there
    expected = base + 0.7 * (attn - base) - 0.4 * (full - base) + 3.0 * (mlp - base)
    assert (mix - expected).abs().max() <= 1e-5
    assert (full - base).abs().max() > 1e-2 and (mlp - base).abs().max() > 1e-2


def test_least_recently_used_adapters_are_evicted_and_read_back_on_demand(adapters):
    bank = make_bank({"attn": adapters["attn"]}, max_resident=2)
    tokens = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    before = routed_logits(bank, tokens, ["attn"])
    bank.load("full", adapters["full"])
    bank.load("mlp", adapters["mlp"])  # a third adapter: "attn", least recently used, leaves its slot
    assert bank.names() == ["attn", "full", "mlp"] and bank.resident() == ["full", "mlp"]
    after = routed_logits(bank, tokens, ["attn"])  # read back from disk, evicting "full"
    assert bank.resident() == ["mlp", "attn"]
    assert (before - after).abs().max() <= 1e-5  # the same weights (now zero-padded to rank 8)


def test_pinned_adapters_stay_resident(adapters):
    bank = make_bank({"attn": adapters["attn"]}, max_resident=2)
    bank.pin("attn")
    bank.load("full", adapters["full"])
    bank.load("mlp", adapters["mlp"])
    assert bank.resident() == ["attn", "mlp"] and bank.pinned() == ["attn"]
    bank.unpin("attn")
    bank.load("full", adapters["full"])
    assert bank.resident() == ["mlp", "full"]


def test_a_full_bank_waits_then_says_what_to_do(adapters):
    bank = make_bank({"attn": adapters["attn"]}, max_resident=1, wait_for_slot=0.05)
    route = bank.acquire("attn")  # a running request holds the only slot
    with pytest.raises(BankFullError, match="max_resident"):
        bank.load("full", adapters["full"])
    bank.release(route)
    bank.load("full", adapters["full"])
    assert bank.resident() == ["full"]


def test_replacing_an_adapter_keeps_running_requests_on_the_old_weights(adapters):
    bank = make_bank({"x": adapters["attn"]})
    tokens = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    old_logits = routed_logits(bank, tokens, ["x"])
    running = bank.acquire("x")
    bank.load("x", adapters["full"])
    new_logits = routed_logits(bank, tokens, ["x"])
    with bank.forward_lock, torch.no_grad():
        bank.set_routing([running])
        still_old = bank.model(tokens).logits
    assert (still_old - old_logits).abs().max() <= 1e-5 and (new_logits - old_logits).abs().max() > 1e-2
    bank.release(running)  # the old slot is free again
    assert sum(bank._users) == 0 and not bank._retired


def test_replacing_while_forwards_run_never_shows_a_half_written_adapter(adapters):
    bank = make_bank({"x": adapters["attn"]})
    tokens = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    bank.load("x", adapters["full"])
    versions = [routed_logits(bank, tokens, ["x"])]
    bank.load("x", adapters["attn"])
    versions.insert(0, routed_logits(bank, tokens, ["x"]))
    stop = threading.Event()

    def replace_forever() -> None:
        while not stop.is_set():
            for path in (adapters["attn"], adapters["full"]):
                bank.load("x", path)

    replacer = threading.Thread(target=replace_forever)
    replacer.start()
    try:
        seen = [routed_logits(bank, tokens, ["x"]) for _ in range(30)]
    finally:
        stop.set()
        replacer.join()
    assert (versions[0] - versions[1]).abs().max() > 1e-2
    assert all(min((logits - v).abs().max() for v in versions) <= 1e-5 for logits in seen)


def test_adapter_names_are_checked_while_a_forward_runs(adapters):
    bank = make_bank(adapters)
    answers: list = []

    def check_names() -> None:  # what the server's event loop does for every request
        bank.resolve("full")
        answers.append(bank.names())

    with bank.forward_lock:  # a forward in progress
        checker = threading.Thread(target=check_names)
        checker.start()
        checker.join(timeout=30)
    assert answers == [sorted(adapters)]  # answered while the forward held the weights, not after


def test_rows_coming_and_going_reuse_the_stacked_factors_until_a_slot_is_rewritten(adapters):
    bank = make_bank({"attn": adapters["attn"], "full": adapters["full"]})
    layer = bank.stores["lora"].layers["model.layers.0.self_attn.q_proj"]
    tokens = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(5))
    routed_logits(bank, tokens[:2], ["attn", "full"])
    factors = dict(layer._factors)
    routed_logits(bank, tokens, ["full", None, "attn"])  # other rows, the same adapters
    assert len(factors) == 1 and layer._factors == factors
    assert all(layer._factors[key] is entry for key, entry in factors.items())  # not rebuilt
    bank.unload("attn")
    bank.load("mlp", adapters["mlp"])  # into the slot "attn" had: its factors are read anew
    fast = routed_logits(bank, tokens, ["full", "mlp", None])
    assert (fast - routed_logits(bank, tokens, ["full", "mlp", None], reference=True)).abs().max() <= 1e-5


def test_unknown_names_are_key_errors_listing_the_known_ones(adapters):
    bank = make_bank(adapters)
    with pytest.raises(UnknownAdapterError, match="no adapter named 'pirate'; known adapters: attn, full, mlp"):
        bank.acquire({"attn": 0.5, "pirate": 0.5})
    with pytest.raises(KeyError):
        bank.unload("pirate")
    assert sum(bank._users) == 0  # the half-acquired mix gave its slot back
    bank.unload("attn")
    assert bank.names() == ["full", "mlp"]


def test_load_from_dir_refuses_traversal_absolute_paths_and_symlink_escapes(adapters, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    os.symlink(adapters["attn"], served / "escape")  # points outside the adapters directory
    (served / "full").symlink_to(adapters["full"])
    bank = AdapterBank(make_tiny_llama(), adapters_dir=served)
    for bad in ("../attn", "/etc", "a/b", ".."):
        with pytest.raises(ValueError, match="invalid adapter name"):
            bank.load_from_dir(bad)
    with pytest.raises(ValueError, match="outside the adapters directory"):
        bank.load_from_dir("escape")
    with pytest.raises(FileNotFoundError, match="no adapter directory 'nothing'") as missing:
        bank.load_from_dir("nothing")
    assert "escape" not in str(missing.value) and str(served) not in str(missing.value)  # no listing, no path
    with pytest.raises(ValueError, match="outside"):
        bank.load_from_dir("full")  # a symlink to elsewhere is an escape too
    (served / "own").mkdir()
    write_random_adapter(served / "own", make_tiny_llama(), ATTENTION, rank=2, seed=5)
    bank.load_from_dir("own")
    assert bank.names() == ["own"]


@pytest.mark.parametrize("linked", [CONFIG_FILE, WEIGHTS_FILE])
def test_load_from_dir_refuses_a_file_linked_outside_and_names_no_server_path(adapters, tmp_path, linked):
    served, secret = tmp_path / "served", tmp_path / "secret"
    shutil.copytree(adapters["attn"], served / "attn")
    shutil.copytree(adapters["attn"], secret)
    if linked == CONFIG_FILE:  # a JSON file of the server's whose field an error message would echo
        (secret / CONFIG_FILE).write_text('{"peft_type": "LORA", "r": "the server\'s secret"}')
    (served / "attn" / linked).unlink()
    (served / "attn" / linked).symlink_to(secret / linked)
    bank = AdapterBank(make_tiny_llama(), adapters_dir=served)
    with pytest.raises(AdapterFormatError, match=f"^attn/{linked}: a link that leads outside") as refused:
        bank.load_from_dir("attn")
    assert "secret" not in str(refused.value) and str(tmp_path) not in str(refused.value)
    assert bank.names() == []
    if linked == WEIGHTS_FILE:
        bank.load("attn", served / "attn")  # a path the operator gives is theirs to link as they like
        assert bank.names() == ["attn"]


def test_an_adapter_of_the_directory_is_confined_again_when_read_back_after_eviction(adapters, tmp_path):
    served = tmp_path / "served"
    for name in ("attn", "full"):
        shutil.copytree(adapters[name], served / name)
    bank = AdapterBank(make_tiny_llama(), max_resident=1, adapters_dir=served)
    bank.load_from_dir("attn")
    bank.load_from_dir("full")  # evicts attn
    (served / "attn" / WEIGHTS_FILE).unlink()
    (served / "attn" / WEIGHTS_FILE).symlink_to(adapters["attn"] / WEIGHTS_FILE)
    with pytest.raises(AdapterFormatError, match="a link that leads outside"):
        bank.acquire("attn")
    data = (adapters["attn"] / WEIGHTS_FILE).read_bytes()
    (served / "attn" / WEIGHTS_FILE).unlink()
    (served / "attn" / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match=f"^attn/{WEIGHTS_FILE}: truncated or corrupt") as corrupt:
        bank.acquire("attn")
    assert str(tmp_path) not in str(corrupt.value)
    assert sum(bank._users) == 0


def test_the_bank_needs_a_plain_base_model_and_reports_memory(adapters):
    model = make_tiny_llama()
    deltaw.load_adapter(model, adapters["attn"], "attn")
    with pytest.raises(ValueError, match="deltaw.unload"):
        AdapterBank(model)
    bank = make_bank(adapters, max_resident=4)
    memory = bank.memory_bytes()
    base = sum(p.numel() * 4 for p in make_tiny_llama().parameters())
    assert memory["base"] >= base and memory["resident"] == 3
    slots = bank.stores["lora"].layers["model.layers.0.mlp.down_proj"].lora_a.shape[0]
    assert 3 <= slots <= 4 and memory["adapters"] > 0


def test_a_load_waiting_for_a_slot_proceeds_when_a_request_ends(adapters):
    bank = make_bank({"attn": adapters["attn"]}, max_resident=1, wait_for_slot=30)
    route = bank.acquire("attn")
    loader = threading.Thread(target=bank.load, args=("full", adapters["full"]))
    loader.start()
    loader.join(timeout=0.2)
    assert loader.is_alive() and bank.resident() == ["attn"]  # waiting for the busy slot
    bank.release(route)
    loader.join(timeout=30)
    assert bank.resident() == ["full"]
