"""CUDA: the same LoRA/QLoRA invariants on the GPU, and the Triton NF4 kernels against the torch path.

Skipped without a CUDA device (the CI machine has none); run on a GPU machine with
`python -m pytest tests/unit/test_cuda.py`.
"""

import pytest
import torch
import torch.nn.functional as F

import deltaw
from deltaw.quant.nf4 import quantize
from deltaw.quant.linear import linear_nf4, quantized_layers
from deltaw.models.quantized import quantize_model
from tests.conftest import make_tiny_llama, randomize_lora_b

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("shape", [(1536, 576), (33, 65), (192, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_dequantize_equals_the_torch_path_bit_for_bit(shape, dtype):
    from deltaw.quant.triton import dequantize_cuda, triton_available

    assert triton_available()
    weight = quantize(torch.randn(*shape) * 0.02).to(CUDA)
    assert torch.equal(dequantize_cuda(weight, dtype), weight.dequantize(dtype))


@pytest.mark.parametrize("rows", [1, 7, 64, 100])
def test_fused_triton_matmul_equals_the_dequantized_matmul(rows):
    from deltaw.quant.triton import matmul_nf4_cuda

    weight = quantize(torch.randn(200, 576) * 0.02).to(CUDA)  # 200: a partial tile of output columns
    x = torch.randn(rows, 576, device=CUDA, dtype=torch.bfloat16)
    expected = x.float() @ weight.dequantize(torch.bfloat16).float().t()
    assert (matmul_nf4_cuda(x, weight).float() - expected).abs().max() <= 1e-2 * expected.abs().max()


@pytest.mark.parametrize("rows", [1, 7, 64, 1024])
def test_linear_nf4_on_cuda_matches_the_dequantized_matmul(rows):
    """linear_nf4 on CUDA (Triton dequantize + cuBLAS, or the fused kernel) equals the reference."""
    weight = quantize(torch.randn(1536, 576) * 0.02).to(CUDA)
    weight.dtype = torch.bfloat16
    x = torch.randn(rows, 576, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    y = linear_nf4(x, weight)
    expected = x.detach().float() @ weight.dequantize(torch.float32).t()
    assert (y.float() - expected).abs().max() <= 2e-2 * expected.abs().max()
    y.sum().backward()
    grad = torch.ones(rows, 1536, device=CUDA) @ weight.dequantize(torch.float32)
    assert (x.grad.float() - grad).abs().max() <= 2e-2 * grad.abs().max()


def test_lora_merge_and_unmerge_are_exact_on_cuda():
    model = make_tiny_llama().to(CUDA)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4))
    randomize_lora_b(model, "default")
    tokens = torch.randint(0, 128, (2, 12), device=CUDA)
    unmerged = model(tokens).logits
    base = {k: v.clone() for k, v in model.state_dict().items()}
    deltaw.merge_adapter(model, "default")
    assert (model(tokens).logits - unmerged).abs().max() <= 1e-4
    deltaw.unmerge_adapter(model)
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())


def test_qlora_on_cuda_equals_qlora_on_cpu_and_trains():
    cpu = make_tiny_llama()
    quantize_model(cpu)
    deltaw.add_lora(cpu, deltaw.LoRAConfig(rank=4))
    randomize_lora_b(cpu, "default")
    gpu = make_tiny_llama()
    quantize_model(gpu)
    deltaw.add_lora(gpu, deltaw.LoRAConfig(rank=4))
    randomize_lora_b(gpu, "default")
    gpu.to(CUDA)
    state = {k: v for k, v in gpu.state_dict().items() if "lora_" not in k and isinstance(v, torch.Tensor)}
    assert all(v.device.type == "cuda" for v in state.values())
    tokens = torch.randint(0, 128, (2, 12))
    expected = cpu(tokens).logits
    assert (gpu(tokens.to(CUDA)).logits.cpu() - expected).abs().max() <= 1e-4
    before = {name: w.packed.clone() for name, w in quantized_layers(gpu).items()}
    optimizer = torch.optim.AdamW([p for p in gpu.parameters() if p.requires_grad], lr=1e-2)
    tokens = tokens.to(CUDA)
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = gpu(tokens).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[name], w.packed) for name, w in quantized_layers(gpu).items())


def word_tokenizer(vocab_size: int = 128):
    """An in-memory tokenizer (one word a token) so the engine test needs no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="w1", pad_token="w0")


def test_serving_engine_on_cuda_gives_each_request_its_solo_output(tmp_path):
    from deltaw.serve import AdapterBank, Engine, SamplingParams
    from tests.unit.test_bank import ALL, ATTENTION, write_random_adapter

    model = make_tiny_llama().to(CUDA)
    bank = AdapterBank(model, max_resident=4)
    bank.load("attn", write_random_adapter(tmp_path / "attn", model, ATTENTION, rank=2, seed=1, std=1.0))
    bank.load("full", write_random_adapter(tmp_path / "full", model, ALL, rank=8, seed=2, std=1.0))
    prompts = [[5, 9, 17, 3, 44, 12], [7, 7, 8], [100, 3, 55, 21, 9, 10, 11, 60, 2, 30]]
    choices = [None, "attn", "full"]
    with Engine(model, word_tokenizer(), bank, max_batch_size=8, max_model_len=128) as engine:
        engine.eos_ids = set()
        greedy = SamplingParams(max_tokens=10)
        solo = [engine.submit(p, c, greedy).result().text for p, c in zip(prompts, choices)]
        assert len(set(solo)) == 3
        handles = [engine.submit(p, c, greedy) for p, c in zip(prompts, choices)]
        assert [h.result().text for h in handles] == solo


def test_prefix_tuning_on_cuda_equals_cpu_and_keeps_the_cache_free_of_prefixes():
    from tests.unit.test_prefix import prefixed_model

    cpu = prefixed_model("sdpa")
    gpu = prefixed_model("sdpa").to(CUDA)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = cpu(input_ids=tokens).logits
        got = gpu(input_ids=tokens.to(CUDA)).logits.cpu()
        assert (got - expected).abs().max() <= 1e-4
        settings = dict(attention_mask=torch.ones_like(tokens, device=CUDA), max_new_tokens=8, do_sample=False,
                        pad_token_id=0)
        cached = gpu.generate(input_ids=tokens.to(CUDA), use_cache=True, **settings)
        uncached = gpu.generate(input_ids=tokens.to(CUDA), use_cache=False, **settings)
    assert torch.equal(cached, uncached)


def test_dora_and_token_rows_train_merge_and_serve_on_cuda_as_on_cpu(tmp_path):
    """DoRA and trainable tokens on a tied model: CUDA logits equal CPU's, merge is exact, and the bank's batched
    rows equal the per-row reference on the GPU."""
    from deltaw.serve import AdapterBank
    from tests.unit.test_bank import routed_logits

    config = deltaw.LoRAConfig(rank=4, alpha=8, use_dora=True, trainable_tokens=[3, 5])
    cpu = make_tiny_llama(tie=True)
    deltaw.add_lora(cpu, config)
    generator = torch.Generator().manual_seed(1)
    for name, param in cpu.named_parameters():
        if param.requires_grad:
            param.data += torch.randn(param.shape, generator=generator) * 0.1
    path = deltaw.save_adapter(cpu, tmp_path / "a", "default")
    model = make_tiny_llama(tie=True).to(CUDA)
    deltaw.load_adapter(model, path, "a")
    deltaw.set_adapter(model, "a")
    tokens = torch.tensor([[3, 9, 5, 100, 3, 7]])
    on_gpu = model(tokens.to(CUDA)).logits
    assert (on_gpu.cpu() - cpu(tokens).logits).abs().max() <= 1e-4
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    deltaw.merge_adapter(model, "a")
    assert (model(tokens.to(CUDA)).logits - on_gpu).abs().max() <= 1e-4
    deltaw.unmerge_adapter(model)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    bank = AdapterBank(make_tiny_llama(tie=True).to(CUDA), max_resident=4)
    bank.load("a", path)
    batch = tokens.repeat(3, 1).to(CUDA)
    choices = ["a", None, {"a": 0.5}]
    fast = routed_logits(bank, batch, choices)
    assert (fast - routed_logits(bank, batch, choices, reference=True)).abs().max() <= 1e-4
    assert (fast[0] - on_gpu[0]).abs().max() <= 1e-4
