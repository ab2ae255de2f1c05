"""`deltaw export --format gguf` and `deltaw inspect FILE.gguf` on a tiny model directory: the file loads back
with the adapter's logits, and adapters llama.cpp cannot hold are refused in one line with exit status 2."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

import deltaw
from deltaw.cli import main
from tests.conftest import randomize_lora_b

TOKENS = torch.arange(5, 17).reshape(1, 12)


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    """(adapter directory, logits with it) for the tiny model directory; base_model_name_or_path points at it."""
    model, _ = deltaw.load_model(tiny_model_dir)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, alpha=16, use_rslora=True), "a")
    randomize_lora_b(model, "a", std=0.3)
    with torch.no_grad():
        logits = model(TOKENS).logits
    return deltaw.save_adapter(model, tmp_path_factory.mktemp("export") / "pirate", "a"), logits


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # only what this command prints
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_export_then_load_and_inspect(tiny_model_dir, lora_dir, tmp_path, capsys):
    directory, logits = lora_dir
    out = tmp_path / "pirate.gguf"
    status, printed, _ = run(capsys, "export", "--format", "gguf", str(directory), "--out", str(out))
    assert status == 0 and "wrote 14 LoRA pairs (llama, alpha 16, f32)" in printed
    assert "14 modules' scaling folded into lora_b" in printed  # rsLoRA: 16/sqrt(4) where llama.cpp uses 16/4
    model, _ = deltaw.load_model(tiny_model_dir)
    deltaw.load_adapter(model, out)
    deltaw.set_adapter(model, "pirate")
    with torch.no_grad():
        assert torch.allclose(model(TOKENS).logits, logits, atol=1e-5)
    status, printed, _ = run(capsys, "inspect", str(out))
    assert status == 0 and "llama.cpp LoRA GGUF (architecture llama" in printed


def test_existing_output_needs_overwrite(lora_dir, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    status, _, error = run(capsys, "export", str(lora_dir[0]), "--out", str(out))
    assert status == 2 and "exists; pass --overwrite" in error and out.read_bytes() == b"keep"
    status, _, _ = run(capsys, "export", str(lora_dir[0]), "--out", str(out), "--overwrite", "--outtype", "bf16")
    assert status == 0 and deltaw.read_adapter(out).tensor_types == ("BF16",)


def test_prefix_and_dora_adapters_are_refused(tiny_model_dir, lora_dir, tmp_path, capsys):
    model, _ = deltaw.load_model(tiny_model_dir)
    deltaw.add_prefix(model, deltaw.PrefixConfig(num_virtual_tokens=4, init="random"), "p")
    prefix = deltaw.save_adapter(model, tmp_path / "prefix", "p")
    status, _, error = run(capsys, "export", str(prefix), "--out", str(tmp_path / "p.gguf"))
    assert status == 2 and "is a prefix adapter; llama.cpp's adapter GGUF holds LoRA pairs (A, B) only" in error
    assert error.count("\n") == 1

    dora = tmp_path / "dora"
    dora.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (dora / name).write_bytes((lora_dir[0] / name).read_bytes())
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    status, _, error = run(capsys, "export", str(dora), "--out", str(tmp_path / "d.gguf"))
    assert status == 2 and "'use_dora' = True: llama.cpp's LoRA GGUF has no DoRA magnitude vectors" in error
    assert not (tmp_path / "p.gguf").exists() and not (tmp_path / "d.gguf").exists()


def test_a_base_model_that_is_not_the_adapters_is_refused(lora_dir, tmp_path, capsys):
    other = tmp_path / "other"
    LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2).save_pretrained(other)
    status, _, error = run(capsys, "export", str(lora_dir[0]), "--out", str(tmp_path / "x.gguf"), "--model", str(other))
    assert status == 2 and "made for a base with num_attention_heads=4" in error
    assert "pass the adapter's base model" in error
