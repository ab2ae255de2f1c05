"""`deltaw eval`: a JSONL test set scored with the base model and every adapter, side by side.

    deltaw eval --adapter pirate=adapters/pirate --adapter robot=adapters/robot --data test.jsonl
    deltaw eval --url http://127.0.0.1:8000 --adapter pirate --data test.jsonl     (a running server)

Per model: the mean loss over the answer tokens (the training loss: the completion and its end token,
or every assistant turn) and its perplexity, the exact match of greedy answers (whitespace-stripped),
and, on lines with "choices", the accuracy of the answer's first token against the alternatives
(deltaw.tools.eval_data has the file format). In this process the numbers come from deltaw's serving
engine; with --url, from any OpenAI-compatible server through /v1/completions (deltaw serve, vLLM;
llama-server returns no prompt logprobs, so its loss is n/a). See eval_backends.py.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from deltaw.adapters import parse_adapter_spec
from deltaw.models.loading import BUNDLED_NAME, DTYPES, resolve_model_dir
from deltaw.serve.app import build_engine
from deltaw.serve.config import ServeConfig
from deltaw.serve.logprobs import token_text
from deltaw.tools.eval_backends import EvalServerError, Job, LocalBackend, Reply, ServerBackend, Target
from deltaw.tools.eval_data import EvalExample, load_eval_data


@dataclass
class EvalOptions:
    """What `deltaw eval` scores, and where.

    Attributes:
        data: the JSONL test file ({"prompt", "completion"} or {"messages"} lines, optionally with "choices").
        model: the base model (with --url: only its tokenizer is read, which must be the server's).
        adapter: NAME=DIR: an adapter to score beside the base model (repeatable); with --url, NAME: an adapter
            the server serves (a model name, or for llama-server an adapter file's stem).
        url: score on a running OpenAI-compatible server (deltaw serve, vLLM, llama-server) at this base URL.
        api_key: the server's API key (with --url).
        no_base: leave the base model out.
        max_new_tokens: most tokens of each greedy answer.
        seq_len: longer examples are truncated (as in training).
        batch_size: requests in flight together (the engine's batch; with --url, concurrent requests).
        dtype: the weights' dtype (in this process).
        output: write each example's scores here as JSONL (one line per model and example).
    """

    data: str
    model: str = BUNDLED_NAME
    adapter: list[str] = field(default_factory=list, metadata={"repeat": True, "metavar": "NAME=DIR"})
    url: str | None = None
    api_key: str | None = field(default_factory=lambda: os.environ.get("DELTAW_API_KEY"),
                                metadata={"default_help": "$DELTAW_API_KEY"})
    no_base: bool = False
    max_new_tokens: int = 64
    seq_len: int = 1024
    batch_size: int = 8
    dtype: str = field(default="fp32", metadata={"choices": tuple(DTYPES)})
    output: str | None = None


@dataclass
class ExampleScore:
    """One model's scores on one example (None: not measured)."""

    line: int
    loss_sum: float | None = None
    loss_tokens: int = 0
    answer: str | None = None
    exact: bool | None = None
    first_token: str | None = None
    pick: int | None = None
    correct: bool | None = None


@dataclass
class TargetScore:
    """One model's scores on the whole file; `loss_error` says why there is no loss."""

    name: str
    examples: list[ExampleScore]
    loss_error: str | None = None

    @property
    def loss(self) -> float | None:
        """Mean loss per answer token, over the whole file."""
        tokens = sum(score.loss_tokens for score in self.examples)
        if self.loss_error or not tokens:
            return None
        return sum(score.loss_sum for score in self.examples if score.loss_sum is not None) / tokens

    @property
    def perplexity(self) -> float | None:
        return None if self.loss is None else math.exp(self.loss)

    def rate(self, key: str) -> tuple[int, int]:
        """(hits, examples measured) of a boolean score ("exact" or "correct")."""
        values = [getattr(score, key) for score in self.examples if getattr(score, key) is not None]
        return sum(values), len(values)


@dataclass
class EvalReport:
    """Every model's scores on one test file."""

    data: Path
    targets: list[TargetScore]

    def table(self) -> str:
        lines = [f"{'model':<24} {'loss':>8} {'perplexity':>11} {'exact match':>17} {'choice accuracy':>17}"]
        for target in self.targets:
            loss = "n/a" if target.loss is None else f"{target.loss:.4f}"
            ppl = "n/a" if target.perplexity is None else f"{target.perplexity:.2f}"
            lines.append(f"{target.name:<24} {loss:>8} {ppl:>11} {_rate(*target.rate('exact')):>17} "
                         f"{_rate(*target.rate('correct')):>17}")
        lines += [f"{target.name}: no loss: {target.loss_error}" for target in self.targets if target.loss_error]
        return "\n".join(lines)


def _rate(hits: int, total: int) -> str:
    return "n/a" if not total else f"{hits}/{total} ({100 * hits / total:.1f}%)"


# --------------------------------------------------------------------------------------------- scoring
def evaluate(backend: LocalBackend | ServerBackend, examples: list[EvalExample], targets: list[Target], tokenizer,
             max_new_tokens: int = 64, data: str | Path = "") -> EvalReport:
    """Score `examples` with every target. Per example: one echoed request for the loss, one greedy answer, and
    per alternative in "choices" one echoed request of the prompt and the alternative's first token, which
    gives that token's exact logprob (where a server returns no prompt logprobs, the answer's top 20 decide)."""
    plan = [(target, example) for target in targets for example in examples]
    jobs = [job for target, example in plan for job in _jobs(target, example, max_new_tokens)]
    replies = iter(backend.complete_many(jobs))
    scores = {target.name: TargetScore(target.name, []) for target in targets}
    for target, example in plan:
        score = ExampleScore(example.line)
        scores[target.name].examples.append(score)
        _score_loss(scores[target.name], score, example, next(replies))
        if example.prompt_ids is not None:
            answer = _checked(next(replies))
            alternatives = [next(replies) for _ in example.choices or []]
            _score_answer(score, example, answer, alternatives, tokenizer)
    return EvalReport(Path(data), list(scores.values()))


def _jobs(target: Target, example: EvalExample, max_new_tokens: int) -> list[Job]:
    """The requests that score `example` on `target`, in the order `evaluate` reads their replies."""
    jobs = [Job(target, example.ids, 1, echo=True)]
    if example.prompt_ids is not None:
        jobs.append(Job(target, example.prompt_ids, max_new_tokens))
        jobs += [Job(target, example.prompt_ids + [choice], 1, echo=True) for choice in example.choices or []]
    return jobs


def _checked(reply: Reply | EvalServerError) -> Reply:
    if isinstance(reply, EvalServerError):
        raise reply
    return reply


def _score_loss(target: TargetScore, score: ExampleScore, example: EvalExample, reply: Reply | EvalServerError) -> None:
    """Token i's loss is -log p(ids[i] | ids[:i]) where labels[i] has one (as training; token 0 never has)."""
    if target.loss_error:
        return
    if isinstance(reply, EvalServerError) or reply.prompt_logprobs is None:
        failed = isinstance(reply, EvalServerError)
        target.loss_error = str(reply) if failed else "the server returned no prompt logprobs"
        return
    positions = [i for i, label in enumerate(example.labels) if i > 0 and label >= 0]
    score.loss_sum = -sum(reply.prompt_logprobs[i] for i in positions)
    score.loss_tokens = len(positions)


def _score_answer(score: ExampleScore, example: EvalExample, answer: Reply, alternatives: list[Reply | EvalServerError],
                  tokenizer) -> None:
    """Exact match, and the pick among the choices: exact logprobs from the echoed alternatives, else the answer's
    top 20 (an alternative outside them counts as least likely; none inside: no pick)."""
    score.answer, score.first_token = answer.text, answer.first_token
    score.exact = answer.text.strip() == example.answer.strip()
    if example.choices is None:
        return
    if all(isinstance(reply, Reply) and reply.prompt_logprobs for reply in alternatives):
        found = [reply.prompt_logprobs[-1] for reply in alternatives]
    else:
        found = [answer.first_top.get(token_text(tokenizer, choice), -math.inf) for choice in example.choices]
    best = max(range(len(found)), key=found.__getitem__)
    score.pick = best if found[best] > -math.inf else None
    score.correct = score.pick == example.correct


# --------------------------------------------------------------------------------------------- the command
def run_eval(options: EvalOptions) -> EvalReport:
    """What `deltaw eval` runs: load the data, score every model, print the table (and write --output)."""
    if options.max_new_tokens < 1 or options.batch_size < 1:
        raise ValueError("--max-new-tokens and --batch-size must be at least 1")
    names = [parse_adapter_spec(spec)[0] for spec in options.adapter]
    if not names and options.no_base:
        raise ValueError("--no-base leaves nothing to score: give at least one --adapter")
    if options.url:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(options.model))
        examples = load_eval_data(options.data, tokenizer, options.seq_len)
        backend = ServerBackend(options.url, options.api_key, options.batch_size)
        report = evaluate(backend, examples, backend.targets(names, not options.no_base), tokenizer,
                          options.max_new_tokens, options.data)
    else:
        report = _run_local(options, names)
    print(f"deltaw eval: {len(report.targets[0].examples) if report.targets else 0} examples from {options.data}"
          + (f" on {options.url}" if options.url else ""))
    print(report.table())
    if options.output:
        _write_examples(report, Path(options.output))
    return report


def _run_local(options: EvalOptions, names: list[str]) -> EvalReport:
    engine, _, tokenizer = build_engine(ServeConfig(
        model=options.model, adapter=list(options.adapter), dtype=options.dtype, max_batch_size=options.batch_size,
        max_model_len=options.seq_len + options.max_new_tokens + 1))
    try:
        examples = load_eval_data(options.data, tokenizer, options.seq_len)
        targets = ([] if options.no_base else [Target("base")]) + [Target(name, name) for name in names]
        return evaluate(LocalBackend(engine, tokenizer), examples, targets, tokenizer, options.max_new_tokens,
                        options.data)
    finally:
        engine.shutdown()


def _write_examples(report: EvalReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for target in report.targets:
            for score in target.examples:
                handle.write(json.dumps({"model": target.name, **asdict(score)}) + "\n")
