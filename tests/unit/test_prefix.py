"""Prefix-tuning on tiny random Llamas (grouped-query attention): masking, positions, cache, per-row choice."""

import copy

import pytest
import torch

import deltaw
from deltaw import compat
from deltaw.adapters.prefix import PrefixConfig, add_prefix, prefix_rows, prefix_values, set_prefix_rows
from deltaw.adapters.prefix.encoder import PrefixEncoder, activation_prefix
from deltaw.adapters.prefix.layout import PrefixShape, join_prefix, split_prefix
from tests.conftest import make_tiny_llama

ATTENTION = ("sdpa", "eager")


def prefixed_model(attention: str = "sdpa", tokens: int = 5, name: str = "default", seed: int = 1):
    """A tiny Llama with one active random prefix adapter (std 1, so it changes the logits a lot)."""
    model = make_tiny_llama()
    model.set_attn_implementation(attention)
    torch.manual_seed(seed)
    add_prefix(model, PrefixConfig(num_virtual_tokens=tokens), name)
    return model


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_split_and_join_follow_peft_layout():
    shape = PrefixShape(num_layers=3, num_kv_heads=2, head_dim=4)
    flat = torch.arange(5 * shape.width, dtype=torch.float32).reshape(5, shape.width)
    split = split_prefix(flat, shape)  # [layers, 2, kv_heads, T, head_dim]
    assert split.shape == (3, 2, 2, 5, 4)
    # PEFT: view(T, layers*2, heads, head_dim).permute(2, 0, 3, 1, 4); layer l's key is index 2l, value 2l+1
    peft = flat.view(5, 6, 2, 4).permute(1, 2, 0, 3)
    assert torch.equal(split[1, 0], peft[2]) and torch.equal(split[2, 1], peft[5])
    assert torch.equal(join_prefix(split), flat)


def test_shape_and_parameter_count_of_the_tiny_model():
    model = make_tiny_llama()
    report = add_prefix(model, PrefixConfig(num_virtual_tokens=5))
    assert PrefixShape.of_model(model) == PrefixShape(num_layers=2, num_kv_heads=2, head_dim=16)
    assert report.trainable == 5 * 2 * 2 * 32 == prefix_values(model, "default").numel()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["deltaw_prefixes.default.prompt_embeddings"]


@pytest.mark.parametrize("attention", ATTENTION)
def test_a_padded_row_equals_the_same_row_unpadded(attention, tokens):
    model = prefixed_model(attention)
    short = tokens[1, :7]
    alone = logits(model, short[None])[0]
    pad = torch.zeros(5, dtype=torch.long)
    left = logits(model, torch.stack([tokens[0], torch.cat([pad, short])]),
                  torch.stack([torch.ones(12), torch.cat([torch.zeros(5), torch.ones(7)])]).long())[1, 5:]
    right = logits(model, torch.stack([tokens[0], torch.cat([short, pad])]),
                   torch.stack([torch.ones(12), torch.cat([torch.ones(7), torch.zeros(5)])]).long())[1, :7]
    assert (left - alone).abs().max() <= 1e-5 and (right - alone).abs().max() <= 1e-5
    with deltaw.disable_adapters(model):
        assert (logits(model, short[None])[0] - alone).abs().max() > 0.1  # the prefix matters


@pytest.mark.parametrize("attention", ATTENTION)
def test_generation_with_and_without_kv_cache_agree(attention, tokens):
    model = prefixed_model(attention)
    with torch.no_grad():
        settings = dict(attention_mask=torch.ones_like(tokens), max_new_tokens=10, do_sample=False, pad_token_id=0)
        cached = model.generate(input_ids=tokens, use_cache=True, **settings)
        uncached = model.generate(input_ids=tokens, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    # the cache holds real tokens only and every decode step sees the prefix: step by step = one full forward
    full = logits(model, cached)
    with torch.no_grad():
        step = model(input_ids=cached[:, :12], use_cache=True)
        cache, decoded = step.past_key_values, []
        for position in range(12, cached.shape[1]):
            decoded.append(model(input_ids=cached[:, position:position + 1], past_key_values=cache).logits)
    assert cache.get_seq_length() == cached.shape[1]  # no prefix entries in the cache
    assert (torch.cat(decoded, dim=1) - full[:, 12:]).abs().max() <= 1e-5


def test_activation_init_acts_as_the_prompt_it_was_taken_from(tokens):
    """Prefix = the base model's keys/values of X at positions 0..T-1, so model(Y) = base(X ++ Y) on Y."""
    model = make_tiny_llama()
    prompt, text = tokens[0, :6], tokens[1]
    base = logits(model, torch.cat([prompt, text])[None])[0, 6:]
    add_prefix(model, PrefixConfig(num_virtual_tokens=6, init="activations"), init_ids=tokens[0])
    assert torch.equal(prefix_values(model, "default").detach(), activation_prefix(model, prompt))
    assert (logits(model, text[None])[0] - base).abs().max() <= 1e-5


@pytest.mark.parametrize("attention", ATTENTION)
def test_activation_init_decodes_as_the_prompt_would(attention, tokens):
    """The same reference through the KV cache: generate() and a step-by-step decode given only the cache (no mask,
    no position ids) continue Y as the base model continues X ++ Y."""
    model = make_tiny_llama()
    model.set_attn_implementation(attention)
    prompt, text = tokens[0, :6], tokens[1][None]
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        whole = torch.cat([prompt[None], text], dim=1)
        expected = model.generate(input_ids=whole, attention_mask=torch.ones_like(whole), **settings)[:, 6:]
        add_prefix(model, PrefixConfig(num_virtual_tokens=6, init="activations"), init_ids=prompt)
        assert torch.equal(model.generate(input_ids=text, attention_mask=torch.ones_like(text), **settings), expected)
        cache = compat.find_cache(model(input_ids=expected[:, :12], use_cache=True).values())
        decoded = [model(input_ids=expected[:, i:i + 1], **compat.cache_argument(model, cache)).logits
                   for i in range(12, 16)]
        with deltaw.disable_adapters(model):
            base = logits(model, torch.cat([prompt[None], expected], dim=1))[:, 6 + 12:6 + 16]
    assert (torch.cat(decoded, dim=1) - base).abs().max() <= 1e-5


@pytest.mark.parametrize("attention", ATTENTION)
def test_each_row_gets_its_own_prefix_or_none(attention, tokens):
    model = prefixed_model(attention, tokens=5, name="five")
    torch.manual_seed(2)
    add_prefix(model, PrefixConfig(num_virtual_tokens=3), "three")
    ids = torch.cat([tokens, tokens[:1]])
    solo = {}
    for name in ("five", "three"):
        deltaw.set_adapter(model, name)
        solo[name] = logits(model, ids)
    with deltaw.disable_adapters(model):
        base = logits(model, ids)
    set_prefix_rows(model, ["three", None, "five"])
    mixed = logits(model, ids)
    assert (mixed[0] - solo["three"][0]).abs().max() <= 1e-5
    assert (mixed[1] - base[1]).abs().max() <= 1e-5
    assert (mixed[2] - solo["five"][2]).abs().max() <= 1e-5
    set_prefix_rows(model, [prefix_values(model, "three").detach(), "three", None])  # a tensor works as a name does
    assert (logits(model, ids)[0] - solo["three"][0]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="3 rows but the batch has 2"):
        logits(model, tokens)
    with pytest.raises(KeyError, match="no prefix adapter named 'nope'"):
        set_prefix_rows(model, ["nope"])
    with prefix_rows(model, None):
        assert torch.equal(logits(model, ids), solo["three"])  # the active adapter again
    set_prefix_rows(model, None)


def test_rows_without_any_prefix_run_the_unchanged_base(tokens):
    model = prefixed_model()
    base = copy.deepcopy(make_tiny_llama())
    with prefix_rows(model, [None, None]):
        assert torch.equal(logits(model, tokens), logits(base, tokens))


def test_training_moves_only_the_prefix_and_keeps_the_base_bit_identical(tokens):
    model = prefixed_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items() if "deltaw_prefixes" not in name}
    start = prefix_values(model, "default").detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not torch.equal(prefix_values(model, "default"), start)


def test_projection_trains_through_an_mlp_and_saves_the_final_prefixes(tmp_path, tokens):
    model = make_tiny_llama()
    report = add_prefix(model, PrefixConfig(num_virtual_tokens=4, projection=True, projection_hidden=8))
    shape = PrefixShape.of_model(model)
    assert report.trainable == 4 * 32 + (8 * 32 + 8) + (shape.width * 8 + shape.width)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert model.deltaw_prefixes.default.embedding.grad.abs().sum() > 0
    deltaw.save_adapter(model, tmp_path / "p", "default")
    loaded = make_tiny_llama()
    deltaw.load_adapter(loaded, tmp_path / "p", "p")
    deltaw.set_adapter(loaded, "p")
    assert (logits(loaded, tokens) - logits(model, tokens)).abs().max() <= 1e-5


def projection_step(shape: PrefixShape, hidden: int, lr: float = 1e-3) -> float:
    """RMS change of a projection's prefixes after one AdamW step at `lr`, divided by lr (a fixed linear loss)."""
    torch.manual_seed(0)
    encoder = PrefixEncoder(shape, PrefixConfig(num_virtual_tokens=20, projection=True, projection_hidden=hidden),
                            torch.float32, torch.device("cpu"))
    direction = torch.randn(20, shape.width)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.0)
    before = encoder().detach()
    (encoder() * direction).sum().backward()
    optimizer.step()
    return ((encoder().detach() - before).pow(2).mean().sqrt() / lr).item()


def test_one_optimizer_step_moves_projected_prefixes_by_a_few_lr():
    """A direct prefix moves by lr per AdamW step; through PEFT's MLP with nn.Linear's weights a step moves the
    bundled model's prefixes by ~53·lr (training at lr 1e-3 then blows up). Equalized: a few lr."""
    bundled = PrefixShape(num_layers=30, num_kv_heads=3, head_dim=64)
    steps = {hidden: projection_step(bundled, hidden) for hidden in (64, 512)}
    assert all(1.0 < step < 6.0 for step in steps.values()), steps


def test_projection_starts_as_peft_init_and_runs_in_fp32_under_autocast():
    shape = PrefixShape(num_layers=30, num_kv_heads=3, head_dim=64)
    torch.manual_seed(0)
    encoder = PrefixEncoder(shape, PrefixConfig(num_virtual_tokens=20, projection=True, projection_hidden=512),
                            torch.float32, torch.device("cpu"))
    torch.manual_seed(0)
    peft_like = torch.nn.Sequential(torch.nn.Linear(shape.token_dim, 512), torch.nn.Tanh(),
                                    torch.nn.Linear(512, shape.width))  # PEFT's transform, nn.Linear's init
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prefixes = encoder()
        reference = peft_like(torch.randn(20, shape.token_dim)).float()
    assert prefixes.dtype == torch.float32
    assert abs(prefixes.std() / reference.std() - 1) < 0.1, (prefixes.std(), reference.std())


def test_prefix_adapters_live_in_the_adapter_registry(tokens):
    model = prefixed_model(name="p")
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=2))
    assert deltaw.list_adapters(model) == ["p", "default"]
    with pytest.raises(ValueError, match="prefix adapter.*no weight change to merge"):
        deltaw.merge_adapter(model, "p")
    deltaw.delete_adapter(model, "p")
    assert "p" not in model.deltaw_prefixes and deltaw.list_adapters(model) == ["default"]


def test_gradient_checkpointing_gives_the_same_prefix_gradients(tokens):
    """PEFT refuses prefix-tuning with gradient checkpointing (its prefix rides in the cache); deltaw's does not."""
    grads = []
    for checkpointing in (False, True):
        model = prefixed_model()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append(model.deltaw_prefixes.default.prompt_embeddings.grad)
    assert grads[0].abs().max() > 0 and torch.equal(grads[0], grads[1])
