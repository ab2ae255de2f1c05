"""Logprobs from the engine: each row's from its own logits (a mixed batch equals solo and the model's own
teacher-forced distribution), the prompt's with `echo`, and the wire shapes."""

from __future__ import annotations

import pytest
import torch

from deltaw.serve import engine as engine_module
from deltaw.serve.engine import SamplingParams
from deltaw.serve.logprobs import TokenLogprob, completion_logprobs, prompt_logprobs, token_logprobs
from tests.unit.test_engine import CHOICES, PROMPTS, engine  # noqa: F401 (the fixture)


def reference_logprobs(engine, prompt: list[int], tokens: list[int], choice) -> torch.Tensor:
    """log_softmax over the vocabulary at every position of prompt + tokens, from one plain forward with
    `choice` routed for the single row (no batching, no cache): [len(prompt + tokens), vocab]."""
    bank = engine.bank
    route = bank.acquire(choice)
    try:
        with bank.forward_lock, torch.no_grad():  # the engine sets its own routing again before its next forward
            bank.set_routing([route])
            logits = bank.model(torch.tensor([prompt + tokens])).logits[0]
    finally:
        bank.release(route)
    return torch.log_softmax(logits.float(), dim=-1)


def assert_entries_match(entries: list[TokenLogprob], reference: torch.Tensor, tokens: list[int], start: int) -> None:
    """entries[i] is token i at position start + i of `reference` (the log_softmax rows before each token)."""
    for i, (entry, token) in enumerate(zip(entries, tokens)):
        row = reference[start + i - 1]
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        expected = row.topk(len(entry.top))
        assert [t for t, _ in entry.top] == expected.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(expected.values.tolist(), abs=1e-4)


def test_a_mixed_batch_reports_each_rows_own_logprobs(engine):
    params = SamplingParams(max_tokens=6, logprobs=5)
    solo = [engine.submit(prompt, choice, params).result() for prompt, choice in zip(PROMPTS, CHOICES)]
    handles = [engine.submit(prompt, choice, params) for prompt, choice in zip(PROMPTS, CHOICES)]
    batched = [handle.result() for handle in handles]
    for prompt, choice, alone, together in zip(PROMPTS, CHOICES, solo, batched):
        tokens = [entry.token_id for entry in alone.logprobs]
        assert len(tokens) == 6 and [entry.token_id for entry in together.logprobs] == tokens
        for a, b in zip(alone.logprobs, together.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and [t for t, _ in a.top] == [t for t, _ in b.top]
        assert_entries_match(together.logprobs, reference_logprobs(engine, prompt, tokens, choice), tokens, len(prompt))
        assert all(entry.logprob == max(entry.top[0][1], entry.logprob) for entry in together.logprobs)  # greedy


def test_sampled_tokens_report_the_models_own_distribution(engine):
    params = SamplingParams(max_tokens=5, temperature=1.7, seed=3, logprobs=2)
    result = engine.submit(PROMPTS[0], "attn", params).result()
    tokens = [entry.token_id for entry in result.logprobs]
    reference = reference_logprobs(engine, PROMPTS[0], tokens, "attn")
    assert_entries_match(result.logprobs, reference, tokens, len(PROMPTS[0]))


@pytest.mark.parametrize("budget", [1 << 28, 1])  # one prefill for all, or one row per prefill
def test_prompt_logprobs_with_echo_equal_a_plain_forward(engine, monkeypatch, budget):
    monkeypatch.setattr(engine_module, "PROMPT_LOGITS_BYTES", budget)
    echo = SamplingParams(max_tokens=2, logprobs=1, prompt_logprobs=3)
    handles = [engine.submit(prompt, choice, echo if index != 1 else SamplingParams(max_tokens=2))
               for index, (prompt, choice) in enumerate(zip(PROMPTS, CHOICES))]
    results = [handle.result() for handle in handles]
    assert results[1].prompt_logprobs is None and results[1].logprobs == []
    for index in (0, 2):
        prompt, result = PROMPTS[index], results[index]
        assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
        reference = reference_logprobs(engine, prompt, [], CHOICES[index])
        assert_entries_match(result.prompt_logprobs[1:], reference, prompt[1:], 1)
    assert results[3].prompt_logprobs == [None]  # a one-token prompt: nothing predicts it


def test_prefill_groups_keep_echo_logits_in_budget(monkeypatch):
    monkeypatch.setattr(engine_module, "PROMPT_LOGITS_BYTES", 3 * 10 * 100 * 4)
    rows = [engine_module._Row(None, (), SamplingParams(prompt_logprobs=None if i % 3 == 0 else 1), None, None, [0] * n)
            for i, n in enumerate([4, 10, 10, 2, 10, 9, 3])]
    groups = engine_module.prefill_groups(rows, vocab_size=100)
    index = {id(row): i for i, row in enumerate(rows)}
    assert [[index[id(row)] for row in group] for group in groups] == [[0, 3, 6], [1, 2, 4], [5]]


def test_logprob_settings_are_checked():
    for name in ("logprobs", "prompt_logprobs"):
        for bad in (-1, 21, 1.5, True):
            with pytest.raises(ValueError, match=f"{name} must be an integer in \\[0, 20\\]"):
                SamplingParams(**{name: bad}).check()


def test_token_and_prompt_logprob_helpers():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    entries = token_logprobs(logits, [0, 0], [2, None])
    logp = torch.log_softmax(logits[0], -1)
    assert entries[1] is None and entries[0].token_id == 0 and entries[0].logprob == pytest.approx(logp[0].item())
    assert [t for t, _ in entries[0].top] == [2, 1]
    prompt = prompt_logprobs(logits, [1, 0], k=0)
    assert prompt[0] is None and prompt[1].logprob == pytest.approx(logp[0].item()) and prompt[1].top == []


def test_completions_shape_includes_the_chosen_token_and_offsets(tokenizer):
    ids = tokenizer(" Paris is nice")["input_ids"]
    entries = [None] + [TokenLogprob(token, -0.5, [(token, -0.5), (ids[0], -1.0)]) for token in ids[1:]]
    body = completion_logprobs(entries, ids, tokenizer, offset=3)
    assert "".join(body["tokens"]) == " Paris is nice"
    assert body["token_logprobs"][0] is None and body["top_logprobs"][0] is None
    assert body["text_offset"] == [3 + len("".join(body["tokens"][:i])) for i in range(len(ids))]
    assert set(body["top_logprobs"][1]) == {body["tokens"][1], body["tokens"][0]}

