"""SVD tools: exact recovery by extract, exact cat, svd combine = truncated SVD of the true sum, resize energy."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltaw
from deltaw.adapters import read_adapter
from deltaw.adapters.lora.files import module_scaling
from deltaw.tools.plan import model_plan, shape_plan
from deltaw.tools.svd import factor_dense
from deltaw.tools.svdtools import combine_adapters, extract_adapter, resize_adapter
from tests.conftest import make_tiny_llama, randomize_lora_b

DELTAW = str(Path(sys.executable).parent / "deltaw")


def deltas(path) -> dict[str, torch.Tensor]:
    """module -> scaling·B·A in float64, as the adapter's config defines it."""
    adapter = read_adapter(path)
    return {m: module_scaling(adapter.config, m, a.shape[0]) * (b.double() @ a.double())
            for m, (a, b) in adapter.weights.items()}


def saved_adapter(tmp_path, name, seed, **config) -> Path:
    model = make_tiny_llama()
    torch.manual_seed(seed)
    deltaw.add_lora(model, deltaw.LoRAConfig(**config))
    randomize_lora_b(model, "default", seed=seed)
    return deltaw.save_adapter(model, tmp_path / name, "default")


def test_extract_recovers_a_known_rank_8_lora(tiny_model_dir, tmp_path):
    tuned, tokenizer = deltaw.load_model(tiny_model_dir)
    deltaw.add_lora(tuned, deltaw.LoRAConfig(rank=8, alpha=16, targets=[r".*\.(q|v|down)_proj"]))
    randomize_lora_b(tuned, "default", std=0.2)
    deltaw.merge_adapter(tuned, "default")
    tokens = torch.arange(20).reshape(1, 20)
    with torch.no_grad():
        expected = tuned(tokens).logits
    deltaw.unload(tuned).save_pretrained(str(tmp_path / "tuned"))
    report = extract_adapter(str(tiny_model_dir), str(tmp_path / "tuned"), tmp_path / "x", rank=8, progress=False)
    assert len(report.layers) == 6 and all(layer.rank == 8 for layer in report.layers)
    assert report.rel_error <= 1e-5 and all(layer.rel_error <= 1e-5 for layer in report.layers)
    base, _ = deltaw.load_model(tiny_model_dir)
    deltaw.load_adapter(base, tmp_path / "x", "x")
    deltaw.set_adapter(base, "x")
    with torch.no_grad():
        assert (base(tokens).logits - expected).abs().max() <= 1e-4


def test_extract_by_energy_and_uniform_padding(tiny_model_dir, tmp_path):
    tuned, _ = deltaw.load_model(tiny_model_dir)
    with torch.no_grad():
        tuned.model.layers[0].mlp.up_proj.weight.add_(torch.randn(64, 32) * 0.05)
    tuned.save_pretrained(str(tmp_path / "tuned"))
    report = extract_adapter(str(tiny_model_dir), str(tmp_path / "tuned"), tmp_path / "e", energy=0.9, progress=False)
    (layer,) = report.layers
    assert layer.energy >= 0.9 and 1 < layer.rank < 32
    full = factor_dense(tuned.model.layers[0].mlp.up_proj.weight.detach() - deltaw.load_model(tiny_model_dir)[0]
                        .model.layers[0].mlp.up_proj.weight.detach(), rank=layer.rank - 1)
    assert full.energy < 0.9  # the smallest rank that reaches the energy
    extract_adapter(str(tiny_model_dir), str(tmp_path / "tuned"), tmp_path / "u", rank=40, uniform=True, progress=False)
    assert json.loads((tmp_path / "u" / "adapter_config.json").read_text())["rank_pattern"] == {}


def test_cat_combine_is_exact_across_targets_and_ranks(tmp_path):
    first = saved_adapter(tmp_path, "a", 1, rank=4, alpha=8)
    second = saved_adapter(tmp_path, "b", 2, rank=2, alpha=4, targets=[r".*\.(q|v)_proj"])
    report = combine_adapters([first, second], [0.7, -0.3], tmp_path / "c", method="cat")
    da, db, dc = deltas(first), deltas(second), deltas(tmp_path / "c")
    assert set(dc) == set(da) | set(db) and report.rel_error == 0
    for module, delta in dc.items():
        expected = 0.7 * da.get(module, 0) - 0.3 * db.get(module, 0)
        assert (delta - expected).abs().max() <= 1e-6 * (1 + expected.abs().max())
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert config["r"] == 4 and list(config["rank_pattern"].values()) == [6] * 4  # q/v layers: ranks add


def test_svd_combine_equals_truncated_svd_of_the_true_weighted_sum(tmp_path):
    first = saved_adapter(tmp_path, "a", 1, rank=4, alpha=8)
    second = saved_adapter(tmp_path, "b", 2, rank=4, alpha=8)
    report = combine_adapters([first, second], [0.5, 0.5], tmp_path / "s", method="svd", rank=3)
    da, db, ds = deltas(first), deltas(second), deltas(tmp_path / "s")
    for layer in report.layers:
        true_sum = 0.5 * da[layer.module] + 0.5 * db[layer.module]
        u, s, vh = torch.linalg.svd(true_sum)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert (ds[layer.module] - best).abs().max() <= 1e-5 * best.abs().max()
        error = float((true_sum - ds[layer.module]).norm() / true_sum.norm())
        assert layer.rel_error == pytest.approx(error, rel=1e-4)


def test_resize_energy_accounting(tmp_path):
    source = saved_adapter(tmp_path, "a", 3, rank=8, alpha=16)
    report = resize_adapter(source, tmp_path / "r", rank=3)
    original, resized = deltas(source), deltas(tmp_path / "r")
    for layer in report.layers:
        singular = torch.linalg.svdvals(original[layer.module])
        assert layer.rank == 3
        assert layer.energy == pytest.approx(float((singular[:3] ** 2).sum() / (singular**2).sum()), rel=1e-9)
        error = float((original[layer.module] - resized[layer.module]).norm() / original[layer.module].norm())
        assert layer.rel_error == pytest.approx(error, rel=1e-4)
    assert 0 < report.rel_error < 1


def test_combining_adapters_of_different_bases_is_an_error(tmp_path):
    first = saved_adapter(tmp_path, "a", 1, rank=4)
    other = make_tiny_llama(seed=9)
    deltaw.add_lora(other, deltaw.LoRAConfig(rank=4))
    randomize_lora_b(other, "default")
    second = deltaw.save_adapter(other, tmp_path / "b", "default")
    with pytest.raises(deltaw.AdapterFormatError, match="different base models.*weights"):
        combine_adapters([first, second], [1, 1], tmp_path / "c", method="cat")
    with pytest.raises(ValueError, match="exactly one of --rank and --energy"):
        combine_adapters([first, first], [1, 1], tmp_path / "c", method="svd")


def test_plan_counts_parameters_exactly(tiny_model_dir):
    plan = shape_plan(8192, 8192, 8)
    assert [row.trainable for row in plan.rows] == [67_108_864, 131_072, 131_072]
    assert "512x" in str(plan)
    model, _ = deltaw.load_model(tiny_model_dir)
    report = deltaw.add_lora(model, deltaw.LoRAConfig(rank=4))
    counted = model_plan(str(tiny_model_dir), 4)
    assert counted.total_params == report.total - report.trainable
    assert counted.rows[1].trainable == report.trainable


def test_cli_combine_resize_and_plan(tmp_path):
    first = saved_adapter(tmp_path, "a", 1, rank=4, alpha=8)
    second = saved_adapter(tmp_path, "b", 2, rank=4, alpha=8)
    result = subprocess.run([DELTAW, "combine", str(first), str(second), "--weights", "0.5", "0.5", "--method", "svd",
                             "--rank", "4", "--out", str(tmp_path / "c")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "combine (svd): 14 layers" in result.stdout and "overall relative error" in result.stdout
    result = subprocess.run([DELTAW, "resize", str(tmp_path / "c"), "--energy", "0.5", "--out", str(tmp_path / "r")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "resize: 14 layers" in result.stdout
    result = subprocess.run([DELTAW, "plan", "--shape", "8192x8192", "--rank", "8"], capture_output=True, text=True)
    assert "67,108,864" in result.stdout and "131,072" in result.stdout and "512x" in result.stdout
    result = subprocess.run([DELTAW, "resize", str(first), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 2 and "exactly one of --rank and --energy" in result.stderr


def test_randomized_svd_reports_its_achieved_error_exactly(monkeypatch):
    from deltaw.tools import svd

    monkeypatch.setattr(svd, "RANDOMIZED_ABOVE", 32)  # take the randomized path on a small matrix
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(300, 12, generator=generator, dtype=torch.float64) @ torch.randn(
        12, 200, generator=generator, dtype=torch.float64)
    delta = low_rank + 1e-3 * torch.randn(300, 200, generator=generator, dtype=torch.float64)
    approximate = svd.factor_dense(delta, rank=12)
    exact = svd.torch.linalg.svdvals(delta)
    achieved = float((delta - approximate.lora_b.double() @ approximate.lora_a.double()).norm() / delta.norm())
    assert approximate.rel_error == pytest.approx(achieved, rel=1e-3, abs=1e-6)  # fp32 factors round a little
    best = float((exact[12:] ** 2).sum().sqrt() / exact.norm())
    assert achieved <= best * 1.05  # near the optimal rank-12 error


def saved_embedding_adapter(tmp_path, name, seed, **config) -> Path:
    """An adapter with LoRA on the embedding, both of its factors non-zero (a fresh one has A = 0)."""
    model = make_tiny_llama()
    torch.manual_seed(seed)
    deltaw.add_lora(model, deltaw.LoRAConfig(**config))
    randomize_lora_b(model, "default", seed=seed)
    model.model.embed_tokens.lora_embedding_A["default"].data.normal_(0.0, 0.3)
    return deltaw.save_adapter(model, tmp_path / name, "default")


def test_resize_and_combine_treat_embedding_lora_as_a_product_and_keep_token_rows(tmp_path, tokens):
    embedding = saved_embedding_adapter(tmp_path, "embedding", seed=3, rank=4, alpha=8,
                                        targets=[r".*embed_tokens", r".*q_proj"])
    model = make_tiny_llama()
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, alpha=8, targets=[r".*q_proj"], trainable_tokens=[7, 9]))
    randomize_lora_b(model, "default", seed=4)
    model.model.embed_tokens.token_values["default"].data += 1.0
    with_tokens = deltaw.save_adapter(model, tmp_path / "tokens", "default")
    for source in (embedding, with_tokens):
        report = resize_adapter(source, tmp_path / f"{source.name}-resized", rank=4)
        assert report.rel_error <= 1e-5  # rank 4 keeps a rank-4 product exactly
        first, second = make_tiny_llama(), make_tiny_llama()
        for loaded, path in ((first, source), (second, tmp_path / f"{source.name}-resized")):
            deltaw.load_adapter(loaded, path, "x")
            deltaw.set_adapter(loaded, "x")
        assert (first(tokens).logits - second(tokens).logits).abs().max() <= 1e-4
    other = saved_embedding_adapter(tmp_path, "other", seed=5, rank=2, targets=[r".*embed_tokens"])
    combine_adapters([embedding, other], [1.0, 0.5], tmp_path / "combined", method="cat")
    assert read_adapter(tmp_path / "combined").embeddings == {"model.embed_tokens"}
    with pytest.raises(deltaw.AdapterFormatError, match="trainable token rows.*combine cannot combine them"):
        combine_adapters([embedding, with_tokens], [1.0, 1.0], tmp_path / "no", method="cat")


def test_svd_tools_refuse_dora_with_the_way_round(tmp_path):
    dora = saved_adapter(tmp_path, "dora", seed=3, rank=4, use_dora=True)
    with pytest.raises(deltaw.AdapterFormatError, match="DoRA adapter.*not the product B·A.*deltaw merge.*deltaw extract"):
        resize_adapter(dora, tmp_path / "resized", rank=2)
    with pytest.raises(deltaw.AdapterFormatError, match="DoRA adapter"):
        combine_adapters([dora, dora], [1.0, 1.0], tmp_path / "combined", method="cat")
