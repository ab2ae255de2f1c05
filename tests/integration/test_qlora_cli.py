"""QLoRA end to end through the CLI: train on the bundled model's NF4 base, merge exactly or into NF4 with the
error report, and `deltaw quantize` directories that load back."""

import json
from pathlib import Path

import pytest
import torch

import deltaw
from deltaw.train.metrics import read_metrics
from deltaw.quant.linear import NF4Linear, quantized_layers
from deltaw.models.quantized import adapter_base_record, prepare_base, quantize_model
from tests.cli import run_cli as run

pytestmark = pytest.mark.slow
PERSONAS = Path(__file__).parents[2] / "examples" / "personas"


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """A short QLoRA run on the bundled model (bf16 compute) and the data it used."""
    root = tmp_path_factory.mktemp("qlora")
    lines = (PERSONAS / "pirate.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[:48]) + "\n")
    (root / "val.jsonl").write_text("\n".join(lines[-12:]) + "\n")
    result = run("train", "--method", "qlora", "--data", str(root / "train.jsonl"), "--val-data",
                 str(root / "val.jsonl"), "--out", str(root / "adapter"), "--steps", "8", "--batch-size", "4",
                 "--seq-len", "128", "--lr", "2e-3", "--save-every", "4", "--no-progress")
    assert result.returncode == 0, result.stderr
    return root, result.stdout


def test_qlora_training_on_the_bundled_model_reduces_the_loss(qlora_run):
    root, stdout = qlora_run
    assert "quantized 210 linear layers to NF4" in stdout and "4.127 bits per weight" in stdout
    losses = [record["loss"] for record in read_metrics(root / "adapter" / "metrics.jsonl")]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]) - 0.5
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert config["deltaw"]["training"]["method"] == "qlora"
    record = config["deltaw"]["base_quantization"]
    assert record["format"] == "nf4" and len(record["modules"]) == 210 and record["dtype"] == "bf16"
    checkpoint = json.loads((root / "adapter" / "checkpoints" / "step-000004" / "adapter_config.json").read_text())
    assert checkpoint["deltaw"]["base_quantization"] == record  # a checkpoint merges onto the same base


def test_merge_writes_exactly_the_model_qlora_trained(qlora_run, tmp_path):
    root, _ = qlora_run
    result = run("merge", "--adapter", str(root / "adapter"), "--out", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert "no re-quantization error" in result.stdout
    model, tokenizer = deltaw.load_model(dtype=torch.bfloat16)
    quantize_model(model)
    deltaw.load_adapter(model, root / "adapter", "pirate", dtype=torch.float32)
    deltaw.set_adapter(model, "pirate")
    tokens = tokenizer(["Ahoy, what is the weather like today?"], return_tensors="pt").input_ids
    float_base, _ = deltaw.load_model()
    deltaw.load_adapter(float_base, root / "adapter", "pirate")
    deltaw.set_adapter(float_base, "pirate")
    with torch.no_grad():
        expected = model.float()(tokens).logits
        merged, _ = deltaw.load_model(tmp_path / "merged")
        got = merged(tokens).logits
        naive = float_base(tokens).logits  # the adapter on the float base it was not trained on
    # fp32 rounding of W + ΔW against W·x + B·(A·x) over 30 layers, far below the NF4 base's own effect
    assert (got - expected).abs().max() <= 5e-4 * expected.abs().max()
    assert (got - expected).abs().max() * 20 < (naive - expected).abs().max()


def test_merge_into_nf4_reports_the_error_and_loads_back(qlora_run, tmp_path):
    root, _ = qlora_run
    result = run("merge", "--nf4", "--adapter", str(root / "adapter"), "--out", str(tmp_path / "nf4"),
                 "--val-data", str(root / "val.jsonl"))
    assert result.returncode == 0, result.stderr
    assert "re-quantization error" in result.stdout and "over 210 layers" in result.stdout
    unmerged, merged = (float(x.split()[-1]) for x in
                        result.stdout.split("validation loss: adapter unmerged on the NF4 base")[1].split("(")[0]
                        .split(", merged and re-quantized"))
    assert unmerged > 0 and merged > 0 and merged != unmerged
    model, tokenizer = deltaw.load_model(tmp_path / "nf4", dtype=torch.bfloat16)
    assert len(quantized_layers(model)) == 210
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)
    expected, _ = deltaw.load_model(dtype=torch.bfloat16)  # the same merge in memory
    prepare_base(expected, adapter_base_record(root / "adapter"))
    deltaw.load_adapter(expected, root / "adapter", "pirate")
    tokens = tokenizer(["Ahoy, what is the weather like today?"], return_tensors="pt").input_ids
    with torch.no_grad():
        with deltaw.disable_adapters(expected):
            base = expected(tokens).logits
        deltaw.merge_adapter(expected, "pirate")
        merged_logits = expected(tokens).logits
        assert torch.equal(model(tokens).logits, merged_logits)
        assert not torch.equal(merged_logits, base)


def test_quantize_cli_writes_a_directory_that_loads_back(tiny_model_dir, tmp_path):
    result = run("quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    assert "quantized 14 linear layers to NF4" in result.stdout
    model, _ = deltaw.load_model(tiny_model_dir)
    quantize_model(model)
    loaded, _ = deltaw.load_model(tmp_path / "q")
    tokens = torch.randint(0, 1000, (2, 7))
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    again = run("quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "q"))
    assert again.returncode == 2 and "not empty" in again.stderr
    bad = run("quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "b"), "--blocksize", "63")
    assert bad.returncode == 2 and "blocksize must be one of" in bad.stderr
