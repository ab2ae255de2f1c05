"""The engine on a tiny random Llama: continuous batching equals solo runs, seeds, stop strings,
max_tokens, EOS, cancellation, submit-time errors and the `model` field's mix syntax."""

from __future__ import annotations

import asyncio
import pydoc
import threading
from pathlib import Path

import pytest
import torch

from deltaw.serve import engine as engine_module
from deltaw.serve.bank import AdapterBank, UnknownAdapterError
from deltaw.serve.engine import Engine, SamplingParams, parse_adapter_choice
from tests.conftest import make_tiny_llama
from tests.unit.test_bank import ALL, ATTENTION, write_random_adapter

PROMPTS = [[5, 9, 17, 3, 44, 12], [7, 7, 8], [100, 3, 55, 21, 9, 10, 11, 60, 2, 30], [1]]


@pytest.fixture
def engine(tmp_path: Path, tokenizer):
    """An engine on the tiny Llama with adapters "attn" and "full"; EOS disabled so lengths are exact."""
    model = make_tiny_llama()
    bank = AdapterBank(model, max_resident=4)
    bank.load("attn", write_random_adapter(tmp_path / "attn", model, ATTENTION, rank=2, seed=1, std=1.0))
    bank.load("full", write_random_adapter(tmp_path / "full", model, ALL, rank=8, seed=2, std=1.0))
    engine = Engine(model, tokenizer, bank, max_batch_size=8, max_model_len=128)
    engine.eos_ids = set()
    with engine:
        yield engine


def run(engine: Engine, prompt: list[int], adapter, params: SamplingParams) -> list[int]:
    """The token ids of one request, streamed."""
    return [event.token_id for event in engine.submit(prompt, adapter, params) if event.token_id is not None]


CHOICES = [None, "attn", "full", {"attn": 0.5, "full": 0.5}]


def test_a_mixed_batch_with_a_late_joiner_equals_each_request_alone(engine):
    greedy = SamplingParams(max_tokens=12)
    solo = [run(engine, prompt, choice, greedy) for prompt, choice in zip(PROMPTS, CHOICES)]
    assert len({tuple(ids) for ids in solo}) == len(solo)  # adapters and the mix change the output
    long_request = engine.submit(PROMPTS[0], CHOICES[0], SamplingParams(max_tokens=100))
    first = long_request.next_event(timeout=60)
    handles = [engine.submit(prompt, choice, greedy) for prompt, choice in zip(PROMPTS, CHOICES)]
    assert not long_request.done  # the newcomers join a running batch
    batched = [[e.token_id for e in handle if e.token_id is not None] for handle in handles]
    assert batched == solo
    long_ids = [first.token_id] + [e.token_id for e in long_request if e.token_id is not None]
    assert long_ids[:12] == solo[0]


def test_a_seed_gives_the_same_sample_alone_and_in_a_batch(engine):
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone = run(engine, PROMPTS[1], "attn", sampled)
    others = [engine.submit(prompt, "full", SamplingParams(max_tokens=10, temperature=1.0)) for prompt in PROMPTS]
    assert run(engine, PROMPTS[1], "attn", sampled) == alone
    assert run(engine, PROMPTS[1], "attn", SamplingParams(max_tokens=10, temperature=1.0, seed=8)) != alone
    assert all(handle.result().finish_reason == "length" for handle in others)


def test_stop_strings_end_the_text_before_them(engine):
    full = engine.submit(PROMPTS[2], "full", SamplingParams(max_tokens=20)).result().text
    stop = full[6:8]
    cut = full.index(stop)
    handle = engine.submit(PROMPTS[2], "full", SamplingParams(max_tokens=20, stop=["never there", stop]))
    pieces = [event.text for event in handle]
    result = handle.result()
    assert result.text == "".join(pieces) == full[:cut]
    assert result.finish_reason == "stop" and result.completion_tokens < 20


def test_max_tokens_and_eos_set_the_finish_reason(engine):
    result = engine.submit(PROMPTS[0], None, SamplingParams(max_tokens=5)).result()
    assert (result.completion_tokens, result.finish_reason, result.prompt_tokens) == (5, "length", 6)
    first = run(engine, PROMPTS[0], None, SamplingParams(max_tokens=5))
    engine.eos_ids = {first[2]}
    result = engine.submit(PROMPTS[0], None, SamplingParams(max_tokens=5)).result()
    assert (result.completion_tokens, result.finish_reason) == (3, "stop")
    ignoring = engine.submit(PROMPTS[0], None, SamplingParams(max_tokens=5, ignore_eos=True)).result()
    assert (ignoring.completion_tokens, ignoring.finish_reason) == (5, "length")


def test_a_cancelled_request_leaves_the_batch_and_frees_its_slot(engine):
    handle = engine.submit(PROMPTS[0], "full", SamplingParams(max_tokens=50))
    handle.next_event(timeout=60)
    handle.cancel()
    events = list(handle)
    assert events[-1].finish_reason == "cancelled" and handle.result().completion_tokens < 50
    assert engine.submit(PROMPTS[1], "attn", SamplingParams(max_tokens=3)).result().completion_tokens == 3
    assert sum(engine.bank._users) == 0
    stats = engine.stats()
    assert stats["requests_total"] == 2 and stats["requests_running"] == 0
    assert stats["completion_tokens_total"] == handle.completion_tokens + 3


def test_a_cancelled_waiting_request_ends_without_running(engine):
    engine.max_batch_size = 1
    running = engine.submit(PROMPTS[0], None, SamplingParams(max_tokens=100))
    running.next_event(timeout=60)
    waiting = engine.submit(PROMPTS[1], "attn", SamplingParams(max_tokens=5))
    waiting.cancel()
    assert [(e.token_id, e.finish_reason) for e in waiting] == [(None, "cancelled")]
    assert not running.done  # it ended while the only batch row was still busy
    running.cancel()
    assert running.result().finish_reason == "cancelled"


def test_concurrent_clients_from_threads_all_finish(engine):
    results = {}

    def client(index: int) -> None:
        prompt, choice = PROMPTS[index % 4], CHOICES[index % 4]
        results[index] = engine.submit(prompt, choice, SamplingParams(max_tokens=4 + index)).result()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i].completion_tokens for i in range(12)] == [4 + i for i in range(12)]


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "prompt is empty"),
    ([1] * 120, SamplingParams(max_tokens=9), "exceeds the model length limit of 128"),
    ([1, 999], SamplingParams(), r"integers in \[0, 128\)"),
    ([1], SamplingParams(max_tokens=0), "max_tokens must be an integer >= 1"),
    ([1], SamplingParams(temperature=-1), "temperature"),
    ([1], SamplingParams(top_p=0), r"top_p must be a number in \(0, 1\]"),
    ([1], SamplingParams(stop=[""]), "stop must be a list of non-empty strings"),
    ([1], SamplingParams(seed=-3), "seed"),
    ([1], SamplingParams(seed=2**64), r"seed must be an integer in \[0, 2\*\*64\)"),
    ([1], SamplingParams(stop=["x"] * 33), "at most 32 stop strings, found 33"),
    ([1], SamplingParams(stop=["x" * 257]), "at most 256 characters, found one of 257"),
])
def test_submit_rejects_bad_requests_before_queueing(engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        engine.submit(prompt, None, params)
    assert engine.stats()["requests_total"] == 0


def test_submit_names_the_known_adapters_for_an_unknown_one(engine):
    with pytest.raises(UnknownAdapterError, match="known adapters: attn, full"):
        engine.submit([1, 2], "pirate", SamplingParams(max_tokens=5))


def test_parse_adapter_choice():
    assert parse_adapter_choice("pirate", "smollm2") == "pirate"
    assert parse_adapter_choice("smollm2", "smollm2") is None
    assert parse_adapter_choice("pirate*0.5+robot*0.5", "base") == {"pirate": 0.5, "robot": 0.5}
    assert parse_adapter_choice(" pirate * 2 + robot ", "base") == {"pirate": 2.0, "robot": 1.0}
    for bad, message in [("pirate*x", "not a finite number"), ("pirate+pirate", "twice"), ("a*1+", "invalid adapter name"),
                         ("base*0.5+a", "cannot be part of a mix"), ("a*nan", "finite"),
                         ("a*1e30+b", r"outside \[-100, 100\]"), ("a*-101", "outside")]:
        with pytest.raises(ValueError, match=message):
            parse_adapter_choice(bad, "base")


def test_a_bf16_model_serves_in_bf16(tmp_path, tokenizer):
    model = make_tiny_llama(dtype=torch.bfloat16)
    bank = AdapterBank(model)
    bank.load("attn", write_random_adapter(tmp_path / "attn", make_tiny_llama(), ATTENTION, rank=2, seed=1, std=1.0))
    assert bank.stores["lora"].layers["model.layers.0.self_attn.q_proj"].lora_a.dtype == torch.bfloat16
    bank.load("full", write_random_adapter(tmp_path / "full", make_tiny_llama(), ALL, rank=8, seed=2, std=1.0))
    choices = [None, "attn", "full", {"attn": 0.5, "full": 0.5}]
    with Engine(model, tokenizer, bank, max_model_len=64) as engine:
        engine.eos_ids = set()
        solo = [run(engine, prompt, choice, SamplingParams(max_tokens=6)) for prompt, choice in zip(PROMPTS, choices)]
        running = engine.submit(PROMPTS[3], "full", SamplingParams(max_tokens=30))
        running.next_event(timeout=60)
        handles = [engine.submit(prompt, choice, SamplingParams(max_tokens=6)) for prompt, choice in zip(PROMPTS, choices)]
        batched = [[e.token_id for e in handle if e.token_id is not None] for handle in handles]
    assert [len(ids) for ids in solo] == [6] * 4 and batched == solo  # bf16 (oneDNN-packed weights): exact too


def test_a_failing_forward_ends_its_requests_with_an_error_and_the_engine_serves_on(engine, monkeypatch):
    forward = engine._forward

    def fail_once(*args):
        monkeypatch.setattr(engine, "_forward", forward)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "_forward", fail_once)
    handle = engine.submit(PROMPTS[0], "attn", SamplingParams(max_tokens=4))
    assert [(e.token_id, e.finish_reason) for e in handle] == [(None, "error")]
    with pytest.raises(RuntimeError, match="out of memory"):
        handle.result()
    assert engine.submit(PROMPTS[0], "attn", SamplingParams(max_tokens=4)).result().completion_tokens == 4
    assert sum(engine.bank._users) == 0


# ----------------------------------------------------------------------------- a bad request fails alone

@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=8, temperature=1e-44),  # logits / temperature would overflow to inf
    SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-46, seed=3),  # below the smallest float32
], ids=["tiny temperature", "tiny top_p"])
def test_degenerate_temperature_and_top_p_take_the_most_likely_token(engine, params):
    greedy = run(engine, PROMPTS[2], "full", SamplingParams(max_tokens=8))
    assert run(engine, PROMPTS[2], "full", params) == greedy


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_row_with_non_finite_logits_or_a_failing_sampler_ends_alone(engine, monkeypatch, bad):
    """Neighbours already decoding when two bad rows join finish exactly as they do alone; one non-finite logit
    is enough."""
    greedy = SamplingParams(max_tokens=12)
    solo = [run(engine, prompt, choice, greedy) for prompt, choice in zip(PROMPTS[:3], CHOICES[:3])]
    forward, sample = engine._forward, engine_module.sample_token

    def nan_for_mixes(rows, *args):  # the forward of a row routed to a mix yields one non-finite logit
        logits = forward(rows, *args)
        logits[[index for index, row in enumerate(rows) if len(row.route) > 1], :, 7] = bad
        return logits

    def failing_for_seed_13(logits, params, generator):
        if params.seed == 13:
            raise RuntimeError("sampler failure")
        return sample(logits, params, generator)

    monkeypatch.setattr(engine, "_forward", nan_for_mixes)
    monkeypatch.setattr(engine_module, "sample_token", failing_for_seed_13)
    neighbours = [engine.submit(prompt, choice, greedy) for prompt, choice in zip(PROMPTS[:3], CHOICES[:3])]
    firsts = [handle.next_event(timeout=60) for handle in neighbours]  # all three are in the batch now
    bad_logits = engine.submit(PROMPTS[3], CHOICES[3], greedy)
    bad_sampler = engine.submit(PROMPTS[3], "attn", SamplingParams(max_tokens=12, temperature=1.0, seed=13))
    for handle, message in ((bad_logits, "non-finite logits"), (bad_sampler, "sampler failure")):
        with pytest.raises(RuntimeError, match=message):
            handle.result()
    batched = [[first.token_id] + [e.token_id for e in handle if e.token_id is not None]
               for first, handle in zip(firsts, neighbours)]
    assert batched == solo
    assert sum(engine.bank._users) == 0


def test_a_row_whose_prompt_logprobs_fail_ends_alone(engine, monkeypatch):
    """A row failing in its prompt logprobs ends alone: a neighbour decoding already, and one prefilled with it
    (also asking for prompt logprobs), finish exactly as they do alone."""
    greedy, echo = SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, prompt_logprobs=1)
    solo = [run(engine, PROMPTS[0], "attn", greedy), run(engine, PROMPTS[1], "full", echo)]
    record = engine_module.prompt_logprobs

    def failing_for_k_2(logits, prompt, k):
        if k == 2:
            raise RuntimeError("prompt logprobs failure")
        return record(logits, prompt, k)

    monkeypatch.setattr(engine_module, "prompt_logprobs", failing_for_k_2)
    running = engine.submit(PROMPTS[0], "attn", greedy)
    first = running.next_event(timeout=60)
    with engine._wakeup:  # the two newcomers are queued together, so they are prefilled in one group
        bad = engine.submit(PROMPTS[2], MIX, SamplingParams(max_tokens=12, prompt_logprobs=2))
        neighbour = engine.submit(PROMPTS[1], "full", echo)
    with pytest.raises(RuntimeError, match="prompt logprobs failure"):
        bad.result()
    assert [first.token_id] + [e.token_id for e in running if e.token_id is not None] == solo[0]
    assert [e.token_id for e in neighbour if e.token_id is not None] == solo[1]
    assert [entry and entry.token_id for entry in neighbour.prompt_logprobs] == [None, *PROMPTS[1][1:]]
    assert sum(engine.bank._users) == 0


MIX = {"attn": 0.5, "full": 0.5}
SUBMIT_STEPS = [  # what submit goes through, in order; each is made to fail in turn
    "deltaw.serve.engine.RequestHandle",
    "deltaw.serve.sampling.SamplingParams.generator",
    "deltaw.serve.engine.TextStream",
    "deltaw.serve.bank.AdapterBank._acquire_one",  # fails for the mix's second adapter, after the first
    "deltaw.serve.requests.EngineStats.submitted",
]


@pytest.mark.parametrize("step", SUBMIT_STEPS, ids=[step.rsplit(".", 1)[-1] for step in SUBMIT_STEPS])
def test_a_submit_that_fails_at_any_step_holds_no_slot(engine, monkeypatch, step):
    target = pydoc.locate(step)
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        if step.endswith("_acquire_one") and len(calls) == 1:
            return target(*args, **kwargs)
        raise RuntimeError(f"injected failure in {step}")

    monkeypatch.setattr(step, fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.submit(PROMPTS[0], MIX, SamplingParams(max_tokens=4, temperature=1.0, seed=1, stop=["x"]))
    monkeypatch.undo()
    assert sum(engine.bank._users) == 0
    assert engine.stats()["requests_waiting"] == 0
    assert engine.submit(PROMPTS[0], MIX, SamplingParams(max_tokens=4)).result().completion_tokens == 4


def test_a_submit_to_a_stopped_engine_or_with_an_overflowing_seed_holds_no_slot(engine):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        engine.submit(PROMPTS[0], MIX, SamplingParams(seed=2**64))
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(PROMPTS[0], MIX, SamplingParams(max_tokens=4))
    assert sum(engine.bank._users) == 0


def test_a_long_prompt_is_prefilled_in_chunks_that_give_the_same_answer_and_do_not_stall_decoding(engine):
    long_prompt = PROMPTS[2] * 3  # 30 tokens: 8 chunks of 4
    greedy = SamplingParams(max_tokens=8)
    whole = run(engine, long_prompt, "full", greedy)  # prefill_chunk 256: one forward
    engine.prefill_chunk = 4
    running = engine.submit(PROMPTS[0], "attn", SamplingParams(max_tokens=60))
    running.next_event(timeout=60)
    chunked = engine.submit(long_prompt, "full", greedy)
    first = chunked.next_event(timeout=60)
    assert running.completion_tokens >= 8 and not running.done  # it decoded once per chunk meanwhile
    assert [first.token_id] + [e.token_id for e in chunked if e.token_id is not None] == whole
    running.cancel()


def test_newcomers_are_admitted_while_their_padded_prompts_fit_the_prefill_chunk(engine):
    engine.prefill_chunk = 12  # PROMPTS padded to 10 columns: one per step; [7, 7, 8] and [1] fit together
    solo = [run(engine, prompt, choice, SamplingParams(max_tokens=5)) for prompt, choice in zip(PROMPTS, CHOICES)]
    handles = [engine.submit(prompt, choice, SamplingParams(max_tokens=5)) for prompt, choice in zip(PROMPTS, CHOICES)]
    assert [[e.token_id for e in handle if e.token_id is not None] for handle in handles] == solo


def test_a_cancelled_prompt_leaves_between_its_chunks(engine):
    engine.prefill_chunk = 1
    handle = engine.submit(PROMPTS[2] * 5, "full", SamplingParams(max_tokens=5))
    handle.cancel()
    assert handle.result().finish_reason == "cancelled" and handle.result().completion_tokens == 0
    assert engine.submit(PROMPTS[1], None, SamplingParams(max_tokens=2)).result().completion_tokens == 2
    assert sum(engine.bank._users) == 0 and engine.stats()["requests_running"] == 0


def test_events_are_awaited_on_the_event_loop_that_the_engine_wakes(engine):
    greedy = SamplingParams(max_tokens=6)

    async def collect() -> list:
        handle = engine.submit(PROMPTS[0], "attn", greedy)
        events = [await handle.next_event_async()]
        while events[-1].finish_reason is None:
            events.append(await handle.next_event_async())
        assert (await handle.next_event_async()) is events[-1]  # after the end: the final event again
        return [event.token_id for event in events if event.token_id is not None]

    assert asyncio.run(collect()) == run(engine, PROMPTS[0], "attn", greedy)

    async def abandon():
        handle = engine.submit(PROMPTS[1], None, SamplingParams(max_tokens=20))
        waiting = asyncio.ensure_future(handle.next_event_async())
        await asyncio.sleep(0)
        waiting.cancel()
        return handle

    handle = asyncio.run(abandon())  # its loop is closed while the engine still emits: no harm done
    assert handle.result().completion_tokens == 20
