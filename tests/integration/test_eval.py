"""`deltaw eval` on a tiny model directory: its loss is training's validation loss, exact match and choice
picks follow the model's own greedy answers and first-token logprobs, a running `deltaw serve` scored through
/v1/completions gives the same report as the engine in this process, and bad files and servers are named."""

from __future__ import annotations

import contextlib
import copy
import json
import math

import pytest
import torch

import deltaw
from deltaw.cli import main
from deltaw.serve.logprobs import token_text
from deltaw.tools.eval import EvalOptions, ExampleScore, evaluate, run_eval
from deltaw.tools.eval_backends import EvalServerError, Reply, ServerBackend, Target, parse_reply
from deltaw.tools.eval_data import EvalExample, load_eval_data
from deltaw.train.data import DataError, load_jsonl
from deltaw.train.config import TrainConfig
from deltaw.train.loop import evaluate as training_loss
from deltaw.train.loop import train
from tests.conftest import chat, randomize_lora_b, write_jsonl
from tests.integration.serving import API_KEY, running_server

QUESTIONS = ["Is fire hot? Answer yes or no:", "Is ice hot? Answer yes or no:", "Do fish swim? Answer yes or no:"]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """(model dir, adapters dir with 'sharp', test file, tokenizer)."""
    root = tmp_path_factory.mktemp("eval")
    model, tokenizer = deltaw.load_model(tiny_model_dir)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, alpha=8), "sharp")
    randomize_lora_b(model, "sharp", std=0.5)
    deltaw.save_adapter(model, root / "adapters" / "sharp", "sharp")
    records = [{"prompt": q, "completion": a, "choices": [" yes", " no"]}
               for q, a in zip(QUESTIONS, [" yes", " no", " yes"])]
    records += [{"messages": [{"role": "user", "content": "Name a colour."},
                              {"role": "assistant", "content": "Blue."}]},
                {"text": "The quick brown fox jumps over the lazy dog."}]
    return tiny_model_dir, root / "adapters", write_jsonl(root / "test.jsonl", records), tokenizer


def local_report(setup, **extra):
    model_dir, adapters, data, _ = setup
    return run_eval(EvalOptions(data=data, model=str(model_dir), adapter=[f"sharp={adapters / 'sharp'}"],
                                max_new_tokens=8, seq_len=64, **extra))


def test_loss_is_the_training_loss(setup):
    model_dir, adapters, data, tokenizer = setup
    report = local_report(setup)
    model, _ = deltaw.load_model(model_dir)
    examples = load_jsonl(data, tokenizer, seq_len=64).examples
    with torch.no_grad():
        base = training_loss(model, examples, 8, tokenizer.pad_token_id, contextlib.nullcontext())
        deltaw.load_adapter(model, adapters / "sharp", "sharp")
        deltaw.set_adapter(model, "sharp")
        sharp = training_loss(model, examples, 8, tokenizer.pad_token_id, contextlib.nullcontext())
    losses = {target.name: target.loss for target in report.targets}
    assert losses == pytest.approx({"base": base, "sharp": sharp}, abs=1e-4)
    assert report.targets[0].perplexity == pytest.approx(math.exp(base), rel=1e-4)
    assert abs(base - sharp) > 0.01  # the adapter matters


def test_a_trained_dora_adapter_scores_the_validation_loss_training_reported(setup, tmp_path):
    model_dir = setup[0]
    records = [chat(f"What is {i} plus {i}?", f"Arr, {i} plus {i} be {2 * i}, matey!") for i in range(12)]
    data, held_out = write_jsonl(tmp_path / "train.jsonl", records[:8]), write_jsonl(tmp_path / "val.jsonl", records[8:])
    result = train(TrainConfig(model=str(model_dir), data=data, val_data=held_out, out=str(tmp_path / "dora"), steps=4,
                               batch_size=4, lr=2e-2, seq_len=64, lora=deltaw.LoRAConfig(rank=4, alpha=8, use_dora=True),
                               dtype="fp32", progress=False))
    report = run_eval(EvalOptions(data=held_out, model=str(model_dir), adapter=[f"dora={tmp_path / 'dora'}"],
                                  max_new_tokens=2, seq_len=64))
    losses = {target.name: target.loss for target in report.targets}
    assert losses["dora"] == pytest.approx(result.final_val_loss, abs=1e-4)
    assert abs(losses["base"] - losses["dora"]) > 0.01  # the adapter (its magnitudes included) is applied


def test_answers_and_choice_picks_follow_the_models_own_greedy_tokens(setup):
    model_dir, _, data, tokenizer = setup
    report = local_report(setup)
    model, _ = deltaw.load_model(model_dir)
    examples = load_eval_data(data, tokenizer, 64)
    base = report.targets[0].examples
    for example, score in zip(examples[:3], base):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([example.prompt_ids])).logits[0, -1], -1)
        assert score.first_token == token_text(tokenizer, int(logprobs.argmax()))
        assert score.pick == int(torch.stack([logprobs[c] for c in example.choices]).argmax())
        assert score.correct == (score.pick == example.correct)
        assert score.exact == (score.answer.strip() == example.answer.strip())
    assert base[4].answer is None and base[4].loss_tokens > 0  # a text line: loss only


def test_exact_match_counts_an_answer_that_is_the_completion(setup, tmp_path):
    model_dir, _, _, tokenizer = setup
    first = local_report(setup).targets[0].examples[0].answer
    data = write_jsonl(tmp_path / "own.jsonl", [{"prompt": QUESTIONS[0], "completion": first},
                                                 {"prompt": QUESTIONS[0], "completion": first + " and more"}])
    report = run_eval(EvalOptions(data=data, model=str(model_dir), max_new_tokens=8, seq_len=64))
    assert [score.exact for score in report.targets[0].examples] == [True, False]


def test_a_running_deltaw_serve_gives_the_same_report(setup):
    model_dir, adapters, data, tokenizer = setup
    local = local_report(setup)
    model, _ = deltaw.load_model(model_dir)
    with running_server(model, tokenizer, "tiny", adapters, ["sharp"], max_model_len=96) as (url, _):
        backend = ServerBackend(url, API_KEY, concurrency=3)
        targets = backend.targets(["sharp"])
        assert targets[0].fields["lora"] == [{"id": 0, "scale": 0.0}]  # explicit: server-wide scales never leak in
        by_lora = Target("sharp-by-id", fields={"model": "tiny", "lora": [{"id": 0, "scale": 1.0}]})
        remote = evaluate(backend, load_eval_data(data, tokenizer, 64), targets + [by_lora], tokenizer, 8)
    for here, there in zip(local.targets + local.targets[1:], remote.targets):
        assert there.loss == pytest.approx(here.loss, abs=1e-4)
        assert [(s.answer, s.first_token, s.pick) for s in there.examples] == [
            (s.answer, s.first_token, s.pick) for s in here.examples]


def test_a_weighted_mix_is_scored_on_a_deltaw_server_by_name(setup):
    model_dir, adapters, data, tokenizer = setup
    model, _ = deltaw.load_model(model_dir)
    with running_server(model, tokenizer, "tiny", adapters, ["sharp"], max_model_len=96) as (url, _):
        backend = ServerBackend(url, API_KEY, concurrency=3)
        targets = backend.targets(["sharp*0.5", "sharp"])
        assert targets[1].fields == {"model": "sharp*0.5"}
        by_list = Target("by-list", fields={"model": "tiny", "lora": [{"id": 0, "scale": 0.5}]})
        report = evaluate(backend, load_eval_data(data, tokenizer, 64), targets + [by_list], tokenizer, 4)
    base, half, full, listed = (target.loss for target in report.targets)
    assert half == pytest.approx(listed, abs=1e-5)
    assert min(abs(half - base), abs(half - full)) > 0.01  # neither the base nor the whole adapter


def test_a_weighted_mix_for_llama_server_is_a_lora_list_with_its_scales():
    class LlamaServer(ServerBackend):  # what llama-server lists: no adapter models, adapters by file
        def _request(self, method, path, body=None):
            return {"/v1/models": {"data": [{"id": "base.gguf"}]},
                    "/lora-adapters": [{"id": 0, "path": "/a/pirate.gguf", "scale": 0.0},
                                       {"id": 1, "path": "/a/robot.gguf", "scale": 0.0}]}[path]

    targets = LlamaServer("http://x").targets(["pirate*0.5+robot*0.25", "robot"])
    assert [target.fields["lora"] for target in targets] == [
        [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}], [{"id": 0, "scale": 0.5}, {"id": 1, "scale": 0.25}],
        [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]]
    assert {target.fields["model"] for target in targets} == {"base.gguf"}
    with pytest.raises(EvalServerError, match=r"named 'pirate\*0.5\+parrot' \(nor a mix of them"):
        LlamaServer("http://x").targets(["pirate*0.5+parrot"])


def test_a_server_without_prompt_logprobs_reports_no_loss():
    class NoEcho:  # llama-server refuses echo ("Only no echo is supported")
        def complete_many(self, jobs):
            return [EvalServerError("HTTP 500: Only no echo is supported") if job.echo else
                    Reply(" yes", " yes", {" yes": -0.1, " no": -2.5}) for job in jobs]

    example = EvalExample(1, [5, 6, 7], [-100, 6, 7], [5], " yes", [6, 7], 0)
    report = evaluate(NoEcho(), [example], [Target("base")], tokenizer=_TwoTokens(), max_new_tokens=4)
    target = report.targets[0]
    assert target.loss is None and "Only no echo" in target.loss_error
    assert target.rate("exact") == (1, 1) and target.rate("correct") == (1, 1)
    assert "base: no loss: HTTP 500: Only no echo is supported" in report.table()


class _TwoTokens:
    def decode(self, ids, skip_special_tokens=False):
        return {6: " yes", 7: " no"}[ids[0]]


def test_llamacpp_logprobs_shape_is_read():
    choice = {"text": " Paris.", "logprobs": {"content": [
        {"id": 7042, "token": " Paris", "logprob": -0.31, "top_logprobs": [
            {"id": 7042, "token": " Paris", "logprob": -0.31}, {"id": 260, "token": " the", "logprob": -2.66}]}]}}
    reply = parse_reply(choice, 0)
    assert (reply.text, reply.first_token, reply.first_top) == (" Paris.", " Paris", {" Paris": -0.31, " the": -2.66})
    openai_shape = {"text": "ab c", "logprobs": {"tokens": ["a", "b", " c"], "token_logprobs": [None, -1.0, -0.5],
                                                   "top_logprobs": [None, {"b": -1.0}, {" c": -0.5, " d": -1.5}]}}
    echoed = parse_reply(openai_shape, 2)
    assert echoed.prompt_logprobs == [None, -1.0] and echoed.first_token == " c" and echoed.first_top[" d"] == -1.5


BAD_LINES = [
    ({"prompt": "Q:", "completion": " yes", "choices": " yes"}, "'choices' must be a list of at least two"),
    ({"prompt": "Q:", "completion": " maybe", "choices": [" yes", " no"]}, "is the first token of none of 'choices'"),
    ({"prompt": "Q:", "completion": " yes", "choices": [" yes", " yes please"]}, "do not differ in their first token"),
    ({"text": "Hello there.", "choices": [" yes", " no"]}, "'choices' needs a prompt"),
    ({"prompt": "Q:"}, "'completion' must be a string"),
]


@pytest.mark.parametrize(("record", "message"), BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_bad_lines_are_named(setup, tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q:", "completion": " yes"}, record])
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
        load_eval_data(path, setup[3], 64)


def test_the_command_prints_the_table_and_writes_each_example(setup, tmp_path, capsys):
    model_dir, adapters, data, _ = setup
    out = tmp_path / "scores.jsonl"
    status = main(["eval", "--data", str(data), "--model", str(model_dir), "--adapter", f"sharp={adapters / 'sharp'}",
                   "--max-new-tokens", "4", "--seq-len", "64", "--output", str(out)])
    printed = capsys.readouterr().out
    assert status == 0 and "choice accuracy" in printed and printed.count("/3 (") == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and {row["model"] for row in rows} == {"base", "sharp"}
    assert set(rows[0]) == {"model", *ExampleScore.__dataclass_fields__}

    assert main(["eval", "--data", str(data), "--model", str(model_dir), "--no-base"]) == 2
    assert "--no-base leaves nothing to score" in capsys.readouterr().err
    assert main(["eval", "--data", str(data), "--model", str(model_dir), "--url", "http://127.0.0.1:9"]) == 2
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err


def test_unknown_server_adapter_is_named(setup):
    model_dir, adapters, _, tokenizer = setup
    model, _ = deltaw.load_model(model_dir)
    with running_server(copy.deepcopy(model), tokenizer, "tiny", adapters, ["sharp"]) as (url, _):
        with pytest.raises(EvalServerError, match="serves no model or llama.cpp adapter named 'blunt'.*'sharp'"):
            ServerBackend(url, API_KEY).targets(["blunt"])
