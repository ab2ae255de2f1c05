"""llama.cpp LoRA GGUF files: deltaw -> GGUF -> deltaw gives the same logits on every architecture in the table,
scaling rules folded into the tensors, and a clear refusal of every file or adapter the format cannot carry."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

import deltaw
from deltaw.adapters import AdapterFormatError
from deltaw.adapters.lora.files import lora_config_dict, read_lora_adapter, write_adapter
from deltaw.adapters.lora.gguf import read_gguf_adapter, write_gguf
from deltaw.adapters.lora.gguf_layout import ARCHITECTURES
from deltaw.adapters.targets import linear_modules
from deltaw.serve.bank import AdapterBank
from tests.conftest import make_tiny_llama, randomize_lora_b

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, head_dim=16)
MODELS = {  # model_type -> (config class, model class)
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
}
TOKENS = torch.arange(3, 15).reshape(1, 12)


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if model_type == "llama":
        return make_tiny_llama(seed)
    config_class, model_class = MODELS[model_type]
    return model_class(config_class(**TINY)).eval()


def adapted(model: torch.nn.Module, config: deltaw.LoRAConfig, path: Path) -> tuple[Path, torch.Tensor]:
    """Add a random adapter to `model`, save it; return (directory, logits with it)."""
    deltaw.add_lora(model, config, "a")
    randomize_lora_b(model, "a", std=0.3)
    with torch.no_grad():
        logits = model(TOKENS).logits
    return deltaw.save_adapter(model, path, "a"), logits


def loaded_logits(model: torch.nn.Module, path: Path) -> torch.Tensor:
    deltaw.load_adapter(model, path, "b")
    deltaw.set_adapter(model, "b")
    with torch.no_grad():
        return model(TOKENS).logits


def test_every_architecture_in_the_table_has_a_tiny_model():
    assert set(ARCHITECTURES) == {"llama", *MODELS}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_round_trip_gives_the_same_logits(tmp_path, model_type):
    model = tiny_model(model_type)
    base = copy.deepcopy(model)
    directory, logits = adapted(model, deltaw.LoRAConfig(rank=4, alpha=8), tmp_path / "a")
    report = write_gguf(read_lora_adapter(directory), model.config, tmp_path / "a.gguf")
    assert report.pairs == 14 and report.folded == 0 and report.architecture == ARCHITECTURES[model_type].name
    with torch.no_grad():
        assert not torch.allclose(base(TOKENS).logits, logits, atol=1e-3)  # the adapter matters
    assert torch.allclose(loaded_logits(base, tmp_path / "a.gguf"), logits, atol=1e-5)


def test_file_holds_llamacpp_keys_and_tensor_names(tmp_path):
    model = make_tiny_llama()
    directory, _ = adapted(model, deltaw.LoRAConfig(rank=4, alpha=8), tmp_path / "a")
    write_gguf(read_lora_adapter(directory), model.config, tmp_path / "a.gguf")
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert (field("general.architecture"), field("general.type"), field("adapter.type")) == ("llama", "adapter", "lora")
    assert field("adapter.lora.alpha") == 8.0
    assert json.loads(field("deltaw.metadata"))["fingerprint"] == deltaw.adapters.files.deltaw_section(
        read_lora_adapter(directory).config)["fingerprint"]
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 28
    a, b = tensors["blk.1.ffn_down.weight.lora_a"], tensors["blk.1.ffn_down.weight.lora_b"]
    assert list(a.shape) == [96, 4] and list(b.shape) == [4, 64]  # ggml's ne: innermost first
    assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32


def test_rslora_and_per_module_scalings_fold_into_lora_b(tmp_path):
    """llama.cpp applies alpha/r to every pair; deltaw's per-module scaling is folded into B so products agree."""
    model = make_tiny_llama()
    linears = list(linear_modules(model))
    generator = torch.Generator().manual_seed(0)
    ranks = {name: 2 + index % 3 for index, name in enumerate(linears)}
    scalings = {name: 0.5 + index / 7 for index, name in enumerate(linears)}
    weights = {name: (torch.randn(ranks[name], layer.in_features, generator=generator),
                      torch.randn(layer.out_features, ranks[name], generator=generator) * 0.1)
               for name, layer in linear_modules(model).items()}
    config = lora_config_dict(ranks, scalings, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj", "lm_head"], use_rslora=True)
    directory = write_adapter(tmp_path / "a", weights, config)
    expected = loaded_logits(make_tiny_llama(), directory)
    report = write_gguf(read_lora_adapter(directory), model.config, tmp_path / "a.gguf")
    assert report.folded > 0
    again = read_gguf_adapter(tmp_path / "a.gguf")
    alpha = again.alpha
    assert "lm_head" in again.weights  # written as output.weight.lora_a/_b
    for name in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.v_proj", "lm_head"):  # not rope-permuted
        lora_a, lora_b = again.weights[name]
        llamacpp_product = alpha / lora_a.shape[0] * lora_b @ lora_a
        assert torch.allclose(llamacpp_product, scalings[name] * weights[name][1] @ weights[name][0], atol=1e-5)
    assert torch.allclose(loaded_logits(make_tiny_llama(), tmp_path / "a.gguf"), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("outtype", "tensor_type", "atol"), [("f16", "F16", 5e-3), ("bf16", "BF16", 5e-2)])
def test_half_precision_outtypes(tmp_path, outtype, tensor_type, atol):
    model = make_tiny_llama()
    directory, logits = adapted(model, deltaw.LoRAConfig(rank=4, alpha=8), tmp_path / "a")
    report = write_gguf(read_lora_adapter(directory), model.config, tmp_path / "a.gguf", outtype=outtype)
    full = write_gguf(read_lora_adapter(directory), model.config, tmp_path / "full.gguf")
    assert report.size < 0.6 * full.size
    assert read_gguf_adapter(tmp_path / "a.gguf").tensor_types == (tensor_type,)
    assert torch.allclose(loaded_logits(make_tiny_llama(), tmp_path / "a.gguf"), logits, atol=atol)
    with pytest.raises(ValueError, match="outtype must be one of"):
        write_gguf(read_lora_adapter(directory), model.config, tmp_path / "x.gguf", outtype="q4_0")


def test_a_file_without_alpha_scales_by_one_as_llamacpp(tmp_path):
    model = make_tiny_llama()
    lora_a, lora_b = torch.randn(3, 64), torch.randn(96, 3) * 0.2
    writer = gguf.GGUFWriter(tmp_path / "old.gguf", "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_tensor("blk.0.ffn_up.weight.lora_a", lora_a.numpy())
    writer.add_tensor("blk.0.ffn_up.weight.lora_b", lora_b.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 64)
    expected = layer(x) + x @ lora_a.T @ lora_b.T
    deltaw.load_adapter(model, tmp_path / "old.gguf")  # named after the file
    deltaw.set_adapter(model, "old")
    assert torch.allclose(model.model.layers[0].mlp.up_proj(x), expected, atol=1e-5)


def test_the_bank_serves_a_gguf_adapter(tmp_path):
    model = make_tiny_llama()
    directory, logits = adapted(model, deltaw.LoRAConfig(rank=4, alpha=8), tmp_path / "a")
    write_gguf(read_lora_adapter(directory), model.config, tmp_path / "a.gguf")
    bank = AdapterBank(make_tiny_llama(), max_resident=2)
    bank.load("gguf", tmp_path / "a.gguf")
    with torch.no_grad():
        bank.set_routing([bank.acquire("gguf")])
        assert torch.allclose(bank.model(TOKENS).logits, logits, atol=1e-5)


def test_a_gguf_adapter_next_to_a_dora_adapter_gives_its_own_logits(tmp_path):
    gguf_dir, gguf_logits = adapted(make_tiny_llama(), deltaw.LoRAConfig(rank=4, alpha=8), tmp_path / "g")
    write_gguf(read_lora_adapter(gguf_dir), make_tiny_llama().config, tmp_path / "g.gguf")
    torch.manual_seed(1)
    dora_dir, dora_logits = adapted(make_tiny_llama(), deltaw.LoRAConfig(rank=2, alpha=8, use_dora=True), tmp_path / "d")
    assert not torch.allclose(gguf_logits, dora_logits, atol=1e-3)
    model = make_tiny_llama()
    for name, path in [("gguf", tmp_path / "g.gguf"), ("dora", dora_dir)]:
        deltaw.load_adapter(model, path, name)
    for name, expected in [("gguf", gguf_logits), ("dora", dora_logits)]:
        deltaw.set_adapter(model, name)
        with torch.no_grad():
            assert torch.allclose(model(TOKENS).logits, expected, atol=1e-5), name

    bank = AdapterBank(make_tiny_llama(), max_resident=2)  # and as two rows of one served batch
    bank.load("dora", dora_dir)
    bank.load("gguf", tmp_path / "g.gguf")
    with torch.no_grad():
        bank.set_routing([bank.acquire("gguf"), bank.acquire("dora")])
        together = bank.model(TOKENS.repeat(2, 1)).logits
    assert torch.allclose(together[0], gguf_logits[0], atol=1e-5)
    assert torch.allclose(together[1], dora_logits[0], atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_an_untied_embedding_lora_round_trips_in_llamacpps_layout(tmp_path, model_type):
    model = tiny_model(model_type)
    model.config.tie_word_embeddings = False
    base = copy.deepcopy(model)
    config = deltaw.LoRAConfig(rank=4, alpha=8, use_rslora=True, targets=["model.embed_tokens", r".*\.v_proj"])
    deltaw.add_lora(model, config, "a")
    randomize_lora_b(model, "a", std=0.3)
    model.model.embed_tokens.lora_embedding_A["a"].data.normal_(0.0, 0.5)  # a fresh embedding A is zero
    with torch.no_grad():
        logits = model(TOKENS).logits
    adapter = read_lora_adapter(deltaw.save_adapter(model, tmp_path / "a", "a"))
    report = write_gguf(adapter, model.config, tmp_path / "a.gguf")
    assert report.pairs == 3 and report.folded == 3  # rsLoRA's alpha/sqrt(r) folded into every B
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors if t.name.startswith("token_embd")}
    assert shapes == {"token_embd.weight.lora_a": [4, 128], "token_embd.weight.lora_b": [4, 64]}  # ggml ne order
    read_back = read_gguf_adapter(tmp_path / "a.gguf")
    assert read_back.embeddings == {"model.embed_tokens"}
    lora_a, _ = adapter.weights["model.embed_tokens"]
    assert torch.equal(read_back.weights["model.embed_tokens"][0], lora_a)
    with torch.no_grad():
        assert not torch.allclose(base(TOKENS).logits, logits, atol=1e-3)
    assert torch.allclose(loaded_logits(base, tmp_path / "a.gguf"), logits, atol=1e-5)
    bank = AdapterBank(tiny_model(model_type), max_resident=1)
    bank.model.config.tie_word_embeddings = False
    bank.load("gguf", tmp_path / "a.gguf")
    with torch.no_grad():
        bank.set_routing([bank.acquire("gguf")])
        assert torch.allclose(bank.model(TOKENS).logits, logits, atol=1e-5)


def test_describe_names_the_format(tmp_path):
    model = make_tiny_llama()
    directory, _ = adapted(model, deltaw.LoRAConfig(rank=4, alpha=8), tmp_path / "a")
    write_gguf(read_lora_adapter(directory), model.config, tmp_path / "a.gguf", outtype="f16")
    text = deltaw.describe_adapter(tmp_path / "a.gguf")
    assert "llama.cpp LoRA GGUF (architecture llama, adapter.lora.alpha 8)" in text
    assert "14 (attn_k: 2," in text and "(F16)" in text and "'shapes'" in text


# --------------------------------------------------------------------------------------------- refusals
def test_export_refuses_a_module_llamacpp_has_no_tensor_for(tmp_path):
    model = make_tiny_llama()
    weights = {"model.layers.0.mlp.up_proj": (torch.randn(2, 64), torch.randn(96, 2)),
               "model.layers.0.self_attn.rotary": (torch.randn(2, 64), torch.randn(64, 2))}
    directory = write_adapter(tmp_path / "a", weights, lora_config_dict({m: 2 for m in weights},
                                                                        {m: 1.0 for m in weights}, "x"))
    with pytest.raises(AdapterFormatError, match="'model.layers.0.self_attn.rotary' has no tensor in llama.cpp's"):
        write_gguf(read_lora_adapter(directory), model.config, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_export_refuses_an_architecture_outside_the_table(tmp_path):
    model = make_tiny_llama()
    directory, _ = adapted(model, deltaw.LoRAConfig(rank=4, alpha=8), tmp_path / "a")
    config = transformers.GPT2Config()
    with pytest.raises(AdapterFormatError, match="model_type 'gpt2' has no llama.cpp LoRA layout.*'llama'"):
        write_gguf(read_lora_adapter(directory), config, tmp_path / "a.gguf")


def test_loading_on_another_architecture_is_refused_and_changes_nothing(tmp_path):
    qwen = tiny_model("qwen2")
    directory, _ = adapted(qwen, deltaw.LoRAConfig(rank=4, alpha=8), tmp_path / "a")
    write_gguf(read_lora_adapter(directory), qwen.config, tmp_path / "a.gguf")
    llama = make_tiny_llama()
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(AdapterFormatError, match="llama.cpp architecture is llama, the adapter's is 'qwen2'"):
        deltaw.load_adapter(llama, tmp_path / "a.gguf", "x")
    assert deltaw.list_adapters(llama) == []
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_fingerprint_travels_in_the_file(tmp_path):
    model = make_tiny_llama()
    directory, _ = adapted(model, deltaw.LoRAConfig(rank=4, alpha=8), tmp_path / "a")
    write_gguf(read_lora_adapter(directory), model.config, tmp_path / "a.gguf")
    other = make_tiny_llama(seed=5)
    with pytest.raises(AdapterFormatError, match="made for another base model"):
        deltaw.load_adapter(other, tmp_path / "a.gguf", "x")
    deltaw.load_adapter(other, tmp_path / "a.gguf", "x", ignore_fingerprint=True)


def write_raw(path: Path, tensors: dict[str, np.ndarray], kv: dict[str, str], arch: str = "llama") -> Path:
    writer = gguf.GGUFWriter(path, arch)
    for key, value in kv.items():
        writer.add_string(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


ADAPTER_KV = {"general.type": "adapter", "adapter.type": "lora"}
PAIR = {"blk.0.attn_v.weight.lora_a": np.ones((2, 64), np.float32),
        "blk.0.attn_v.weight.lora_b": np.ones((32, 2), np.float32)}
BAD_FILES = [
    ({"general.type": "model"}, PAIR, "llama", "key 'general.type': expected 'adapter', found 'model'"),
    ({"general.type": "adapter", "adapter.type": "control_vector"}, PAIR, "llama", "expected 'lora'"),
    (ADAPTER_KV, PAIR, "gpt2", "key 'general.architecture': expected one of"),
    (ADAPTER_KV, {"blk.0.attn_v.weight.lora_a": PAIR["blk.0.attn_v.weight.lora_a"]}, "llama",
     "'blk.0.attn_v.weight.lora_b' is missing"),
    (ADAPTER_KV, {**PAIR, "output_norm.weight.lora_a": np.ones((2, 64), np.float32)}, "llama",
     "'output_norm.weight.lora_a' is not a LoRA pair deltaw reads"),
    (ADAPTER_KV, {**PAIR, "blk.0.attn_norm.weight": np.ones(64, np.float32)}, "llama", "norm vectors"),
    (ADAPTER_KV, {**PAIR, "token_embd.weight.lora_a": np.ones((128, 2), np.float32),
                  "token_embd.weight.lora_b": np.ones((64, 3), np.float32)}, "llama",
     "'token_embd.weight.lora_a' [128, 2] and '.lora_b' [64, 3] are not a LoRA pair (expected [vocab, r] and [dim, r])"),
    (ADAPTER_KV, {**PAIR, "blk.0.attn_v.weight.lora_b": np.ones((32, 3), np.float32)}, "llama",
     "are not a LoRA pair"),
    (ADAPTER_KV, {**PAIR, "blk.0.attn_v.weight.lora_b": np.full((32, 2), np.nan, np.float32)}, "llama",
     "contains NaN or Inf"),
    (ADAPTER_KV, {}, "llama", "holds no LoRA tensors"),
]


@pytest.mark.parametrize(("kv", "tensors", "arch", "message"), BAD_FILES, ids=[f[3][:30] for f in BAD_FILES])
def test_bad_files_are_refused_by_name(tmp_path, kv, tensors, arch, message):
    path = write_raw(tmp_path / "bad.gguf", tensors, kv, arch)
    with pytest.raises(AdapterFormatError, match=re.escape(message)) as error:
        deltaw.load_adapter(make_tiny_llama(), path, "x")
    assert str(path) in str(error.value)


def test_truncated_file_and_shape_mismatch_are_refused(tmp_path):
    model = make_tiny_llama()
    directory, _ = adapted(model, deltaw.LoRAConfig(rank=4, alpha=8), tmp_path / "a")
    write_gguf(read_lora_adapter(directory), model.config, tmp_path / "a.gguf")
    data = (tmp_path / "a.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match="truncated or corrupt GGUF"):
        deltaw.read_adapter(tmp_path / "cut.gguf")
    wide = write_raw(tmp_path / "wide.gguf", {"blk.0.attn_v.weight.lora_a": np.ones((2, 65), np.float32),
                                              "blk.0.attn_v.weight.lora_b": np.ones((32, 2), np.float32)}, ADAPTER_KV)
    with pytest.raises(AdapterFormatError, match="shape mismatch for 'model.layers.0.self_attn.v_proj'"):
        deltaw.load_adapter(make_tiny_llama(), wide, "x")


def test_a_file_that_is_no_adapter_format_is_named(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(AdapterFormatError, match="not an adapter directory.*ending in .gguf"):
        deltaw.load_adapter(make_tiny_llama(), tmp_path / "weights.bin", "x")


@pytest.mark.parametrize("config, what", [
    (deltaw.LoRAConfig(rank=4, alpha=8, use_dora=True), "DoRA magnitudes"),
    (deltaw.LoRAConfig(rank=4, alpha=8, trainable_tokens=[5, 7]), "trainable token rows"),
    (deltaw.LoRAConfig(rank=4, alpha=8, targets=["model.embed_tokens", r".*\.q_proj"]),
     r"a LoRA on an embedding tied to the output head \(llama.cpp would apply it to the head too\)"),
])
def test_export_refuses_what_a_llamacpp_lora_cannot_hold(tmp_path, config, what):
    model = make_tiny_llama(tie=True)
    directory, _ = adapted(model, config, tmp_path / "a")
    with pytest.raises(AdapterFormatError, match=f"llama.cpp's LoRA GGUF cannot hold {what}.*deltaw merge"):
        write_gguf(read_lora_adapter(directory), model.config, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
