"""What the peer tests share: a pirate adapter trained on the bundled model, the test prompts, deltaw's own
scores on them (the reference), and the comparison table printed at the end of the run.

The adapter is trained with rsLoRA (alpha 8, r 16: scaling 2, where llama.cpp's alpha/r would give 0.5),
so llama-server's answers also test that the GGUF export folds deltaw's scaling into the tensors.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import deltaw
from deltaw.models.loading import BUNDLED_NAME, bundled_gguf, resolve_model_dir
from deltaw.tools.eval import EvalReport, evaluate
from deltaw.tools.eval_backends import LocalBackend, Target
from deltaw.tools.eval_data import load_eval_data
from deltaw.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
PERSONAS = REPO / "examples" / "personas"
TRAIN_LINES, TEST_LINES = 180, 24  # pirate.jsonl: train on the first 180 conversations, test on the next 24
MAX_NEW_TOKENS = 40
sys.path.insert(0, str(PERSONAS))
from personas import PIRATE  # noqa: E402


@dataclass
class Comparison:
    """One engine and model against deltaw's answers for the same model (a row of the printed table)."""

    engine: str
    model: str
    same_answer: tuple[int, int] | None  # None: deltaw itself, the reference
    same_first_token: tuple[int, int] | None
    pirate: tuple[int, int]
    loss: float | None
    deltaw_loss: float | None


ROWS: list[Comparison] = []


def pytest_terminal_summary(terminalreporter) -> None:
    if ROWS:
        terminalreporter.write_line("\n" + table(ROWS))


def table(rows: list[Comparison]) -> str:
    """The comparison as a Markdown table (the README has one)."""
    lines = ["| engine | model | same greedy answer as deltaw | same first token | pirate answers | loss (deltaw) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        loss = "n/a (no prompt logprobs)" if row.loss is None else f"{row.loss:.4f}"
        loss += f" ({row.deltaw_loss:.4f})" if row.same_answer is not None and row.loss is not None else ""
        lines.append(f"| {row.engine} | {row.model} | {_rate(row.same_answer)} | {_rate(row.same_first_token)} | "
                     f"{_rate(row.pirate)} | {loss} |")
    return "\n".join(lines)


def _rate(pair: tuple[int, int] | None) -> str:
    return "(reference)" if pair is None else f"{pair[0]}/{pair[1]}"


@pytest.fixture(scope="session")
def peer_data(tmp_path_factory) -> tuple[Path, Path]:
    """(training file, test file): disjoint slices of the pirate persona data."""
    root = tmp_path_factory.mktemp("peer-data")
    lines = (PERSONAS / "pirate.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[:TRAIN_LINES]) + "\n")
    (root / "test.jsonl").write_text("\n".join(lines[TRAIN_LINES : TRAIN_LINES + TEST_LINES]) + "\n")
    return root / "train.jsonl", root / "test.jsonl"


@pytest.fixture(scope="session")
def pirate(peer_data, tmp_path_factory) -> Path:
    """A real pirate adapter: rsLoRA r=16 alpha=8 on every linear layer, 30 steps of batch 8 (bf16)."""
    out = tmp_path_factory.mktemp("adapters") / "pirate"
    train(TrainConfig(data=str(peer_data[0]), out=str(out), steps=30, batch_size=8, lr=2e-3, warmup=3, seq_len=256,
                      lora=deltaw.LoRAConfig(rank=16, alpha=8, use_rslora=True), progress=False))
    return out


@pytest.fixture(scope="session")
def hf_dir() -> Path:
    """The bundled model as an HF directory (deltaw's cached conversion of the GGUF): what vLLM loads."""
    return Path(resolve_model_dir(BUNDLED_NAME))


@pytest.fixture(scope="session")
def base_gguf() -> Path:
    """The bundled Q4_1 GGUF: what llama-server loads."""
    return bundled_gguf()


@pytest.fixture(scope="session")
def reference(pirate, peer_data) -> tuple[EvalReport, list, object]:
    """deltaw's own scores (fp32, its serving engine) for the base model and the pirate adapter, the test
    examples and the tokenizer."""
    from deltaw.serve.app import build_engine
    from deltaw.serve.config import ServeConfig

    engine, _, tokenizer = build_engine(ServeConfig(adapter=[f"pirate={pirate}"], max_batch_size=8, dtype="fp32"))
    try:
        examples = load_eval_data(peer_data[1], tokenizer, seq_len=512)
        report = evaluate(LocalBackend(engine, tokenizer), examples, [Target("base"), Target("pirate", "pirate")],
                          tokenizer, MAX_NEW_TOKENS)
    finally:
        engine.shutdown()
    for target in report.targets:
        pirates = sum(PIRATE.speaks(score.answer) for score in target.examples)
        ROWS.append(Comparison("deltaw, fp32 (the reference)", target.name, None, None, (pirates, len(examples)),
                               target.loss, target.loss))
    assert ROWS[-1].pirate[0] >= 0.8 * len(examples), f"the adapter did not learn the persona: {ROWS[-1]}"
    return report, examples, tokenizer


def compare(engine: str, report: EvalReport, reference: EvalReport) -> list[Comparison]:
    """One row per model: how often `report` (a peer engine) gives deltaw's greedy answer and first token."""
    rows = []
    for theirs, ours in zip(report.targets, reference.targets):
        pairs = list(zip(theirs.examples, ours.examples))
        rows.append(Comparison(
            engine, ours.name,
            (sum(a.answer.strip() == b.answer.strip() for a, b in pairs), len(pairs)),
            (sum(a.first_token == b.first_token for a, b in pairs), len(pairs)),
            (sum(PIRATE.speaks(a.answer) for a, _ in pairs), len(pairs)),
            theirs.loss, ours.loss))
    ROWS.extend(rows)
    return rows


def assert_as_often_as_the_bases(base: Comparison, adapter: Comparison, slack: int = 2) -> None:
    """The noise floor: the engine gives deltaw's answers for the adapter at least as often as for the base model
    (whose numbers differ only by the engine's arithmetic), give or take `slack` examples; and the adapter is
    really applied (pirate answers) and not leaking into the base model."""
    count = adapter.same_answer[1]
    assert adapter.same_first_token[0] >= base.same_first_token[0] - slack, (base, adapter)
    assert adapter.same_answer[0] >= base.same_answer[0] - slack, (base, adapter)
    assert adapter.pirate[0] >= 0.8 * count and base.pirate[0] <= 0.1 * count, (base, adapter)
