"""QLoRA on tiny models: the NF4 linear op, the 4-bit base inside LoRA layers, no float copy, merge into NF4."""

import pytest
import torch
import torch.nn.functional as F

import deltaw
from deltaw.adapters.lora import LoRALinear
from deltaw.adapters.lora import lora_layers
from deltaw.adapters.lora import fused
from deltaw.quant.nf4 import NF4Weight, quantize
from deltaw.quant.linear import NF4Linear, linear_nf4, quantized_layers
from deltaw.models.quantized import load_quantized, nf4_bytes, quantize_model, save_quantized
from tests.conftest import make_tiny_llama, randomize_lora_b


def nf4_state(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": tensor.clone() for name, weight in quantized_layers(model).items()
            for key, tensor in weight.named_buffers()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_nf4_forward_and_input_gradient_equal_the_dequantized_linear(dtype):
    weight = quantize(torch.randn(48, 80) * 0.05)  # 3,840 values: 60 blocks
    bias = torch.randn(48, dtype=dtype)
    x = torch.randn(3, 5, 80, dtype=dtype, requires_grad=True)
    reference_x = x.detach().clone().requires_grad_(True)
    dense = weight.dequantize(dtype)
    y = linear_nf4(x, weight, bias)
    expected = F.linear(reference_x, dense, bias)
    assert y.dtype == dtype and torch.equal(y, expected)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    assert torch.allclose(x.grad, reference_x.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(33, 65), (96, 64)])  # a last partial block; whole blocks only
def test_dequantize_with_workspace_equals_plain_dequantize(shape):
    weight = quantize(torch.randn(*shape))
    count = weight.packed.numel()
    scratch = (torch.empty(count, dtype=torch.int32), torch.empty(2 * count))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = torch.empty(weight.numel(), dtype=dtype)
        assert torch.equal(weight.dequantize(dtype, out=out, scratch=scratch), weight.dequantize(dtype))


def test_quantize_model_frees_the_float_weights_and_holds_4_127_bits(tiny, tokens):
    float_bytes = sum(m.weight.nbytes for _, m in tiny.named_modules() if isinstance(m, torch.nn.Linear)
                      and m is not tiny.lm_head)
    report = quantize_model(tiny)
    assert report.layers == 14 and report.float_bytes == float_bytes
    for name, module in tiny.named_modules():
        assert not (isinstance(module, torch.nn.Linear) and module is not tiny.lm_head), name
    # Everything the quantized layers hold: 4 bits a weight, one absmax byte per 64, fp32 second level.
    assert report.nf4_bytes == nf4_bytes(tiny) < 0.3 * float_bytes / 2  # below 30% of the bf16 bytes
    held = sum(t.numel() * t.element_size() for t in tiny.state_dict().values() if isinstance(t, torch.Tensor))
    assert held < sum(p.numel() * 4 for p in make_tiny_llama().parameters()) - 0.8 * float_bytes
    assert tiny(tokens).logits.isfinite().all()


@pytest.mark.parametrize("fused_path", [True, False])
def test_qlora_forward_and_backward_never_hold_a_dequantized_weight(tiny, tokens, monkeypatch, fused_path):
    """Measured: every tensor autograd saves for backward, by shape; none is a weight-sized float copy. With
    the fused training path (deltaw.adapters.lora.fused) and without it."""
    monkeypatch.setattr(fused, "ENABLED", fused_path)
    quantize_model(tiny)
    deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=4))
    randomize_lora_b(tiny, "default")
    weight_shapes = {tuple(w.shape) for w in quantized_layers(tiny).values()}
    saved: list[torch.Size] = []

    def pack(tensor):
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = tiny(tokens).logits.square().mean()
    assert saved and not [s for s in saved if tuple(s) in weight_shapes]
    nodes = autograd_nodes(loss.grad_fn, "SharedInputLoRA" if fused_path else "_LinearNF4")
    # 14 quantized layers. Fused: one node per group (q/k/v, o, gate/up, down) of each of the 2 blocks. Layer
    # by layer: layer 0's q/k/v read the frozen embeddings, so their base products need no backward: 11 nodes.
    # Each node holds the packed weights and no float tensor
    assert len(nodes) == (8 if fused_path else 11)
    for node in nodes:
        weights = [layer.weight for layer in node.layers] if fused_path else [node.weight]
        assert all(isinstance(weight, NF4Weight) for weight in weights)
        assert not [v for v in vars(node).values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    loss.backward()
    trainable = [p for p in tiny.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def autograd_nodes(root, name: str) -> list:
    """The nodes of the graph behind `root` whose type name contains `name`."""
    found, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if name in node.name():
            found.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def test_qlora_training_changes_only_the_adapter(tiny, tokens):
    quantize_model(tiny)
    before = nf4_state(tiny)
    others = {k: v.clone() for k, v in tiny.named_parameters()}
    deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=4))
    fresh = tiny(tokens).logits
    with deltaw.disable_adapters(tiny):
        assert torch.equal(tiny(tokens).logits, fresh)  # B = 0: the adapter starts as a no-op
    optimizer = torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(tiny(tokens).logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = nf4_state(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)
    current = dict(tiny.named_parameters())
    assert all(torch.equal(others[k], current[k]) for k in others if k in current)


def test_cast_and_move_keep_the_quantized_state(tiny, tokens):
    quantize_model(tiny)
    before = nf4_state(tiny)
    tiny.to(torch.bfloat16)
    weight = next(iter(quantized_layers(tiny).values()))
    assert weight.dtype == torch.bfloat16 and weight.packed.dtype == torch.uint8
    after = nf4_state(tiny)
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert tiny(tokens).logits.dtype == torch.bfloat16


def test_merge_into_nf4_reports_its_error_and_unmerges_exactly(tiny, tokens):
    quantize_model(tiny)
    deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=4))
    randomize_lora_b(tiny, "default", std=0.02)
    unmerged = tiny(tokens).logits
    base = quantized_base(tiny, tokens)
    before = nf4_state(tiny)
    deltaw.merge_adapter(tiny, "default")
    errors = [layer.merge_error for _, layer in lora_layers(tiny)]
    assert all(0 < e < 1 for e in errors)  # re-quantization is lossy, but far smaller than the update
    merged = tiny(tokens).logits
    assert 0 < (merged - unmerged).abs().max() < 0.5 * (unmerged - base).abs().max()
    deltaw.unmerge_adapter(tiny)
    assert all(layer.merge_error is None for _, layer in lora_layers(tiny))
    after = nf4_state(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(tiny(tokens).logits, unmerged)


def quantized_base(model, tokens) -> torch.Tensor:
    with deltaw.disable_adapters(model):
        return model(tokens).logits


def test_saved_quantized_model_loads_back_with_the_same_outputs(tmp_path, tiny_model_dir, tokenizer):
    model, _ = deltaw.load_model(tiny_model_dir)
    quantize_model(model)
    tokens = torch.randint(0, 100, (2, 9))
    expected = model(tokens).logits
    save_quantized(model, tokenizer, tmp_path / "q")
    loaded, _ = deltaw.load_model(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, NF4Linear)
    assert torch.equal(loaded(tokens).logits, expected)
    assert nf4_state(loaded).keys() == nf4_state(model).keys()
    assert all(torch.equal(a, b) for a, b in zip(nf4_state(loaded).values(), nf4_state(model).values()))
    with pytest.raises(FileExistsError, match="not empty"):
        save_quantized(model, tokenizer, tmp_path / "q")
    with pytest.raises(ValueError, match="no NF4 layers"):
        save_quantized(make_tiny_llama(), tokenizer, tmp_path / "plain")
    assert load_quantized(tmp_path / "q", torch.bfloat16).model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def saved_qlora_adapter(model, tokens, path):
    """Quantize `model`, give it a random adapter, save that in PEFT's layout; returns the adapted logits."""
    quantize_model(model)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4))
    randomize_lora_b(model, "default")
    deltaw.save_adapter(model, path, "default")
    return model(tokens).logits


def test_adapter_trained_on_nf4_loads_from_peft_files_onto_a_quantized_model(tmp_path, tiny, tokens):
    expected = saved_qlora_adapter(tiny, tokens, tmp_path / "adapter")
    fresh = make_tiny_llama()
    quantize_model(fresh)
    deltaw.load_adapter(fresh, tmp_path / "adapter", "qlora")
    deltaw.set_adapter(fresh, "qlora")
    assert all(isinstance(layer.weight, NF4Weight) for _, layer in lora_layers(fresh))
    assert torch.equal(fresh(tokens).logits, expected)


def test_quantizing_twice_is_refused_with_a_clear_error(tiny):
    quantize_model(tiny)
    with pytest.raises(TypeError, match="nn.Linear"):
        quantize_model(tiny, targets=[r".*q_proj"])


def test_lora_layer_keeps_the_nf4_weight_object(tiny):
    quantize_model(tiny)
    weight = tiny.model.layers[0].self_attn.q_proj.weight
    deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=2))
    layer = tiny.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.quantized and layer.weight is weight


def test_state_dict_round_trip_carries_the_whole_nf4_weight(tokens):
    source, target = make_tiny_llama(seed=0), make_tiny_llama(seed=1)
    quantize_model(source)
    quantize_model(target)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(tokens).logits, source(tokens).logits)


def test_layers_with_biases_quantize_save_and_load(tmp_path, tokenizer, tokens):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(config).eval()
    quantize_model(model)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    save_quantized(model, tokenizer, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q", torch.float32)
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_export_merged_writes_the_qlora_model_in_float(tmp_path, tiny, tokens, tokenizer):
    from transformers import AutoModelForCausalLM

    quantize_model(tiny)
    deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=4))
    randomize_lora_b(tiny, "default")
    expected = tiny(tokens).logits
    deltaw.export_merged(tiny, tokenizer, "default", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert (merged(tokens).logits - expected).abs().max() <= 1e-5


def test_merging_a_zero_update_into_nf4_changes_nothing(tiny, tokens):
    quantize_model(tiny)
    before = nf4_state(tiny)
    deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=4))  # B = 0
    report = deltaw.merge_into_nf4(tiny, "default")
    assert set(report.layer_errors.values()) == {0.0}
    assert all(torch.equal(before[k], v) for k, v in nf4_state(tiny).items())


def test_prepare_base_rebuilds_the_recorded_nf4_layers_and_refuses_another(tiny):
    from deltaw.models.quantized import prepare_base, quantization_record

    quantize_model(tiny, targets=[r".*\.q_proj"])
    record = quantization_record(tiny, "fp32")
    fresh = make_tiny_llama()
    prepare_base(fresh, record)
    assert sorted(quantized_layers(fresh)) == record["modules"] == ["model.layers.0.self_attn.q_proj",
                                                                    "model.layers.1.self_attn.q_proj"]
    other = make_tiny_llama()
    quantize_model(other)
    with pytest.raises(ValueError, match="trained on a base with 2"):
        prepare_base(other, record)


def test_the_adapter_bank_serves_on_an_nf4_base(tmp_path, tiny, tokens):
    from deltaw.serve import AdapterBank

    expected = saved_qlora_adapter(tiny, tokens, tmp_path / "a")
    base = make_tiny_llama()
    quantize_model(base)
    bank = AdapterBank(base)
    bank.load("a", tmp_path / "a")
    route = bank.acquire("a")
    try:
        bank.set_routing([route, route])
        assert (base(tokens).logits - expected).abs().max() <= 1e-5
    finally:
        bank.release(route)


def test_extract_against_an_nf4_base_recovers_the_change_from_its_dequantized_weights(tmp_path, tiny_model_dir,
                                                                                      tokenizer):
    from deltaw.tools.svdtools import extract_adapter

    model, _ = deltaw.load_model(tiny_model_dir)
    quantize_model(model)
    save_quantized(model, tokenizer, tmp_path / "nf4")
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, targets=[r".*\.v_proj"]))
    randomize_lora_b(model, "default", std=0.2)
    deltaw.export_merged(model, tokenizer, "default", tmp_path / "tuned")  # dequantized base + a rank-4 change
    report = extract_adapter(str(tmp_path / "nf4"), str(tmp_path / "tuned"), tmp_path / "x", rank=4,
                             progress=False)
    assert len(report.layers) == 2 and report.rel_error <= 1e-5
