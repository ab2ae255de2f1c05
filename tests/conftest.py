"""Shared fixtures: tiny random Llamas built in the test (no downloads) and the bundled SmolLM2."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltaw


def make_tiny_llama(seed: int = 0, tie: bool = False, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention, random weights, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def randomize_lora_b(model: torch.nn.Module, name: str, seed: int = 1, std: float = 0.1) -> None:
    """Give adapter `name` a non-zero B (a fresh adapter is a no-op), reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in deltaw.adapters.lora.lora_layers(model):
        if name in layer.lora_B:
            b = layer.lora_B[name]
            b.data.copy_(torch.randn(b.shape, generator=generator) * std)


PEERS = Path(__file__).resolve().parent / "peers"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/peers (vLLM, llama-server) runs only when named on the command line: `make test-peers`, or
    `pytest tests/peers`; `make test` and a plain `pytest tests` leave it out."""
    if collection_path.resolve() != PEERS:
        return None
    named = [Path(str(arg).split("::")[0]).resolve() for arg in config.args]
    return not any(path == PEERS or PEERS in path.parents for path in named)


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same global RNG state (LoRA's A init draws from it), whatever ran before."""
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def bundled_pristine():
    """The bundled SmolLM2-135M-Instruct in fp32, loaded once; tests take copies via `bundled`."""
    return deltaw.load_model(deltaw.BUNDLED_NAME)


@pytest.fixture
def bundled(bundled_pristine):
    """A private copy of the bundled model (tests may add adapters and merge) and its tokenizer."""
    model, tokenizer = bundled_pristine
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="session")
def bundled_tokens(bundled_pristine) -> torch.Tensor:
    _, tokenizer = bundled_pristine
    text = ["The quick brown fox jumps over the lazy dog, and then", "def fibonacci(n):\n    return"]  # row 0 is unpadded
    return tokenizer(text, return_tensors="pt", padding=True)["input_ids"]


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled model's tokenizer (chat template included), without loading the model."""
    from transformers import AutoTokenizer

    from deltaw.models.loading import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(deltaw.BUNDLED_NAME))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the bundled tokenizer's vocabulary, saved as an HF directory.

    initializer_range 0.3 (not 0.02) gives the frozen random head logits wide enough for an adapter
    to move the loss a long way; with 0.02 no logit can exceed ~0.6 and the loss stays near log(V)."""
    path = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, initializer_range=0.3,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def write_jsonl(path, records) -> str:
    """Write records (dicts, or raw strings written as they are) one per line; return the path."""
    import json

    with open(path, "w") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
