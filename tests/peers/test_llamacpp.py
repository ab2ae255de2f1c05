"""llama.cpp reads deltaw's adapters: deltaw's GGUF export is what llama.cpp's own converter writes, and
llama-server, given the export on the bundled Q4_1 model, answers as deltaw does as often as the two base
models agree with each other."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import torch

import deltaw
from deltaw.tools.eval import evaluate
from deltaw.tools.eval_backends import ServerBackend
from deltaw.tools.export import ExportOptions, export_adapter
from tests.conftest import make_tiny_llama, randomize_lora_b
from tests.peers.conftest import MAX_NEW_TOKENS, assert_as_often_as_the_bases, compare
from tests.peers.engines import CONVERTER, llama_server, llama_version, require


def test_export_is_llamacpps_converter_output_and_its_output_loads_in_deltaw(tmp_path, hf_dir):
    """For a plain adapter (one scaling alpha/r everywhere) the two files hold the same keys and tensors."""
    model, tokenizer = deltaw.load_model()
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=8, alpha=16), "a")
    randomize_lora_b(model, "a", std=0.02)
    directory = deltaw.save_adapter(model, tmp_path / "plain", "a")
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    subprocess.run([sys.executable, str(require(CONVERTER)), "--base", str(hf_dir), "--outfile", str(theirs),
                    str(directory)], check=True, capture_output=True)
    export_adapter(ExportOptions(adapter=str(directory), out=str(ours)))
    readers = gguf.GGUFReader(theirs), gguf.GGUFReader(ours)
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert readers[0].fields[key].contents() == readers[1].fields[key].contents(), key
    tensors = [{t.name: t for t in reader.tensors} for reader in readers]
    assert sorted(tensors[0]) == sorted(tensors[1]) and len(tensors[0]) == 420
    for name, tensor in tensors[0].items():
        assert tensor.tensor_type == tensors[1][name].tensor_type and np.array_equal(tensor.data, tensors[1][name].data)

    ids = tokenizer("Ahoy, what is the capital of Peru?", return_tensors="pt")["input_ids"]
    deltaw.set_adapter(model, "a")
    with torch.no_grad():
        expected = model(ids).logits
        fresh, _ = deltaw.load_model()
        deltaw.load_adapter(fresh, theirs, "converted")
        deltaw.set_adapter(fresh, "converted")
        assert torch.allclose(fresh(ids).logits, expected, atol=1e-4)


def test_an_untied_embedding_lora_exports_as_llamacpps_converter_writes_it(tmp_path):
    """llama.cpp's converter transposes the embedding's A ([vocab, r], rows gathered per token): deltaw's export
    holds the same tensors, bit for bit (a tiny untied Llama: the bundled model's head is tied)."""
    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "base")
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, alpha=8, targets=["model.embed_tokens", r".*\.v_proj"]), "a")
    randomize_lora_b(model, "a", std=0.3)
    model.model.embed_tokens.lora_embedding_A["a"].data.normal_(0.0, 0.5)  # a fresh embedding A is zero
    directory = deltaw.save_adapter(model, tmp_path / "embedding", "a")
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    subprocess.run([sys.executable, str(require(CONVERTER)), "--base", str(tmp_path / "base"), "--outtype", "f32",
                    "--outfile", str(theirs), str(directory)], check=True, capture_output=True)
    export_adapter(ExportOptions(adapter=str(directory), out=str(ours), model=str(tmp_path / "base")))
    tensors = [{t.name: t for t in gguf.GGUFReader(path).tensors} for path in (theirs, ours)]
    assert sorted(tensors[0]) == sorted(tensors[1]) and "token_embd.weight.lora_a" in tensors[0]
    for name, tensor in tensors[0].items():
        assert tensor.tensor_type == tensors[1][name].tensor_type and np.array_equal(tensor.data, tensors[1][name].data)


def test_llama_server_answers_as_deltaw(pirate, reference, base_gguf, tmp_path):
    ours, examples, tokenizer = reference
    adapter = tmp_path / "pirate.gguf"
    export_adapter(ExportOptions(adapter=str(pirate), out=str(adapter)))  # rsLoRA: scaling folded into lora_b
    with llama_server(base_gguf, [adapter]) as url:
        backend = ServerBackend(url, concurrency=4)
        report = evaluate(backend, examples, backend.targets(["pirate"]), tokenizer, MAX_NEW_TOKENS)
    assert all(target.loss is None for target in report.targets)  # llama-server refuses echo: no prompt logprobs
    base, adapted = compare(f"llama.cpp {llama_version()}, Q4_1 base + deltaw's GGUF export", report, ours)
    assert_as_often_as_the_bases(base, adapted)
