"""`train(method="prefix")` through the one training loop, on a tiny random Llama: learns, saves, resumes."""

import json

import pytest
import torch

import deltaw
from deltaw.train.checkpoint import latest_checkpoint
from deltaw.train.metrics import read_metrics
from deltaw.adapters.prefix import PrefixConfig, prefix_values
from deltaw.train.loop import TrainConfig, train
from tests.conftest import chat, write_jsonl
from tests.unit.test_training import interrupted_at_step


@pytest.fixture
def data(tmp_path):
    records = [chat(f"What is {i} plus {i}?", f"Arr, {i} plus {i} be {2 * i}, matey!") for i in range(24)]
    return write_jsonl(tmp_path / "train.jsonl", records)


def config(tiny_model_dir, data, out, **overrides) -> TrainConfig:
    prefix = PrefixConfig(**{"num_virtual_tokens": 6, **overrides.pop("prefix", {})})
    settings = dict(model=str(tiny_model_dir), data=data, out=str(out), method="prefix", prefix=prefix,
                    steps=10, batch_size=3, lr=3e-2, dtype="fp32", progress=False)
    return TrainConfig(**{**settings, **overrides})


def losses(out) -> list[float]:
    return [record["loss"] for record in read_metrics(out / "metrics.jsonl")]


def test_prefix_training_learns_and_writes_a_prefix_adapter(tiny_model_dir, data, tmp_path):
    result = train(config(tiny_model_dir, data, tmp_path / "out", steps=25, lr=0.3, dtype="bf16"))
    curve = losses(tmp_path / "out")  # a prefix moves a random 2-layer model's loss less than LoRA does
    assert sum(curve[-5:]) / 5 < 0.9 * curve[0], curve
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["num_virtual_tokens"] == 6
    assert saved["deltaw"]["training"]["method"] == "prefix" and saved["deltaw"]["init"] == "activations"
    model, _ = deltaw.load_model(tiny_model_dir)
    deltaw.load_adapter(model, tmp_path / "out", "trained")
    assert prefix_values(model, "trained").dtype == torch.float32 and result.steps == 25


def test_projection_run_resumed_after_interruption_gives_the_uninterrupted_losses(tiny_model_dir, data, tmp_path,
                                                                                  monkeypatch):
    settings = dict(prefix={"projection": True, "projection_hidden": 16}, save_every=3)
    train(config(tiny_model_dir, data, tmp_path / "straight", **dict(settings)))
    interrupted_at_step(8, monkeypatch,
                        lambda: train(config(tiny_model_dir, data, tmp_path / "resumed", **dict(settings))))
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000006"
    train(config(tiny_model_dir, data, tmp_path / "resumed", resume=True, **dict(settings)))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    saved = json.loads((tmp_path / "straight" / "adapter_config.json").read_text())
    assert saved["prefix_projection"] is False and saved["deltaw"]["projection_hidden"] == 16


CLASS_WORDS = (("bad", "awful", "poor", "dull", "weak", "sad"), ("good", "great", "fine", "nice", "bright", "happy"))
LABELS = (" negative", " positive")


def classification_prompt(word: str) -> str:
    return " ".join([word] * 3)  # ends on the word: a random 2-layer model carries it best from there


def label_accuracy(model_dir, adapter_dir, flipped: bool) -> float:
    """The share of the 12 prompts whose right label token outscores the other, with the saved adapter."""
    model, tokenizer = deltaw.load_model(model_dir)
    deltaw.load_adapter(model, adapter_dir, "trained")
    deltaw.set_adapter(model, "trained")
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in LABELS]
    correct = 0
    for label, words in enumerate(CLASS_WORDS):
        for word in words:
            ids = torch.tensor([tokenizer(classification_prompt(word), add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                scores = model(input_ids=ids).logits[0, -1, label_ids]
            correct += int(scores.argmax()) == label ^ flipped
    return correct / sum(len(words) for words in CLASS_WORDS)


def test_projection_training_learns_a_two_class_task(tiny_model_dir, tmp_path):
    """The label depends on the prompt's word, and each labelling and its flip are trained. A prefix that
    ignores the prompt scores 0.5 on both; the random base's own leaning scores s on one and
    1 - s on the other: only a prefix that learned the task averages clearly above 0.5."""
    scores = []
    for flipped in (False, True):
        records = [{"prompt": classification_prompt(word), "completion": LABELS[label ^ flipped]}
                   for _ in range(4) for label, words in enumerate(CLASS_WORDS) for word in words]
        data = write_jsonl(tmp_path / f"classes-{flipped}.jsonl", records)
        out = tmp_path / f"out-{flipped}"
        prefix = {"num_virtual_tokens": 8, "projection": True, "projection_hidden": 32}
        train(config(tiny_model_dir, data, out, prefix=prefix, steps=60, batch_size=8, lr=5e-2, dtype="bf16"))
        scores.append(label_accuracy(tiny_model_dir, out, flipped))
    assert sum(scores) / 2 >= 0.7, scores  # measured: 0.79, 0.88, 0.79 with seeds 0, 1, 2


def test_bad_prefix_settings_are_refused_before_loading_anything(tmp_path):
    for prefix, message in [({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
                            ({"projection": True, "init": "activations"}, "--prefix-init random")]:
        with pytest.raises(ValueError, match=message):
            PrefixConfig(**prefix)
    with pytest.raises(ValueError, match="--method must be one of"):
        train(TrainConfig(data="d.jsonl", out=str(tmp_path), steps=5, method="ia3"))
