"""The training loop on a tiny random Llama: it learns, accumulates exactly, stops on NaN, resumes exactly."""

import json
import math

import pytest
import torch

import deltaw
from deltaw.train import loop as train_module
from deltaw.train import losses as losses_module
from deltaw.train.checkpoint import latest_checkpoint
from deltaw.train.metrics import read_metrics
from deltaw.train.loop import BatchOrder, TrainConfig, TrainingError, lr_factor, train
from tests.conftest import chat, write_jsonl


@pytest.fixture
def data(tmp_path):
    records = [chat(f"What is {i} plus {i}?", f"Arr, {i} plus {i} be {2 * i}, matey!") for i in range(24)]
    return write_jsonl(tmp_path / "train.jsonl", records)


def config(tiny_model_dir, data, out, **overrides) -> TrainConfig:
    lora = deltaw.LoRAConfig(**{"rank": 4, "alpha": 8, **overrides.pop("lora", {})})
    settings = dict(model=str(tiny_model_dir), data=data, out=str(out), steps=8, batch_size=4, lr=5e-3,
                    lora=lora, dtype="fp32", progress=False)
    return TrainConfig(**{**settings, **overrides})


def losses(out) -> list[float]:
    return [record["loss"] for record in read_metrics(out / "metrics.jsonl")]


def interrupted_at_step(step: int, monkeypatch, run) -> None:
    """Call `run()` (a training run) with its optimizer step number `step` raising KeyboardInterrupt."""
    real = train_module._optimizer_step
    calls = {"n": 0}

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "_optimizer_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(train_module, "_optimizer_step", real)


def test_lr_schedules():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5) and lr_factor(10, 10, 2, "linear") == 0.0


def test_batch_order_is_a_seeded_permutation_per_epoch():
    order = BatchOrder(10, 4, seed=3)
    epoch = [i for b in range(order.per_epoch) for i in order.batch(b)]
    assert sorted(epoch) == list(range(10)) and order.per_epoch == 3
    again = BatchOrder(10, 4, seed=3)
    assert [again.batch(b) for b in range(6)] == [order.batch(b) for b in range(6)]
    assert [order.batch(b) for b in range(3)] != [order.batch(b) for b in range(3, 6)]


def test_training_learns_and_writes_adapter_metrics_and_plot(tiny_model_dir, data, tmp_path):
    result = train(config(tiny_model_dir, data, tmp_path / "out", steps=30, val_split=0.2, val_every=10, lr=3e-2, lora={"rank": 8}))
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    keys = {"step", "loss", "lr", "grad_norm", "tokens", "step_time_s", "tokens_per_s"}
    assert all(keys <= r.keys() for r in records)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert records[-1]["val_loss"] < records[9]["val_loss"]
    assert (tmp_path / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config_json = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    training = config_json["deltaw"]["training"]
    assert training["steps"] == 30 and training["final_loss"] == pytest.approx(result.final_loss)
    assert len(training["data_sha256"]) == 64 and training["final_val_loss"] == pytest.approx(result.final_val_loss)
    model, _ = deltaw.load_model(tiny_model_dir)
    deltaw.load_adapter(model, tmp_path / "out", "trained")  # a loadable PEFT-layout adapter


def test_grad_accumulation_changes_nothing(tiny_model_dir, data, tmp_path):
    train(config(tiny_model_dir, data, tmp_path / "a", steps=5, batch_size=4, grad_accum=1))
    train(config(tiny_model_dir, data, tmp_path / "b", steps=5, batch_size=2, grad_accum=2))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)


def test_bf16_training_keeps_adapter_and_optimizer_fp32(tiny_model_dir, data, tmp_path):
    train(config(tiny_model_dir, data, tmp_path / "out", steps=4, dtype="bf16", save_every=2))
    checkpoint = latest_checkpoint(tmp_path / "out")
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(checkpoint / "optimizer.safetensors")).values()} == {torch.float32}
    assert {t.dtype for t in load_file(str(tmp_path / "out" / "adapter_model.safetensors")).values()} == {torch.float32}
    assert all(math.isfinite(x) for x in losses(tmp_path / "out"))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tiny_model_dir, data, tmp_path, monkeypatch):
    real = losses_module.lm_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, count = real(model, batch)
        return (loss * float("nan"), count) if calls["n"] == 5 else (loss, count)

    monkeypatch.setattr(losses_module, "lm_loss_sum", poisoned)
    with pytest.raises(TrainingError, match="loss is nan at step 5.*last good checkpoint is .*step-000004"):
        train(config(tiny_model_dir, data, tmp_path / "out", save_every=2))
    assert latest_checkpoint(tmp_path / "out").name == "step-000004"
    assert json.loads((latest_checkpoint(tmp_path / "out") / "state.json").read_text())["step"] == 4
    assert not (tmp_path / "out" / "adapter_config.json").exists()  # no "finished" adapter from a failed run


def test_an_earlier_run_is_never_overwritten_without_resume(tiny_model_dir, data, tmp_path):
    train(config(tiny_model_dir, data, tmp_path / "out", steps=2))
    with pytest.raises(TrainingError, match="holds checkpoints of an earlier run.*--resume"):
        train(config(tiny_model_dir, data, tmp_path / "out", steps=2))
    with pytest.raises(TrainingError, match="--resume: no checkpoint"):
        train(config(tiny_model_dir, data, tmp_path / "fresh", steps=2, resume=True))


def test_resuming_a_finished_run_is_refused(tiny_model_dir, data, tmp_path):
    train(config(tiny_model_dir, data, tmp_path / "out", steps=2))
    with pytest.raises(TrainingError, match="finished run"):
        train(config(tiny_model_dir, data, tmp_path / "out", steps=2, resume=True))


def test_resume_with_other_settings_is_refused(tiny_model_dir, data, tmp_path):
    train(config(tiny_model_dir, data, tmp_path / "out", steps=4, save_every=2))
    with pytest.raises(TrainingError, match="other settings: lr 0.005 -> 0.001"):
        train(config(tiny_model_dir, data, tmp_path / "out", steps=4, lr=1e-3, resume=True))


def test_resume_after_interruption_gives_the_uninterrupted_losses(tiny_model_dir, data, tmp_path, monkeypatch):
    settings = dict(steps=10, save_every=3, lora={"dropout": 0.2}, batch_size=3)
    train(config(tiny_model_dir, data, tmp_path / "straight", **settings))
    interrupted_at_step(8, monkeypatch, lambda: train(config(tiny_model_dir, data, tmp_path / "resumed", **settings)))
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000006"
    train(config(tiny_model_dir, data, tmp_path / "resumed", resume=True, **settings))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == list(range(1, 11))


def test_bad_settings_are_refused_before_loading_anything(tmp_path):
    for overrides, message in [({"steps": None}, "exactly one of --steps and --epochs"),
                               ({"epochs": 1.0}, "exactly one"), ({"batch_size": 0}, "--batch-size"),
                               ({"schedule": "step"}, "--schedule"), ({"dtype": "fp8"}, "--dtype"),
                               ({"val_data": "v.jsonl", "val_split": 0.1}, "not both")]:
        with pytest.raises(ValueError, match=message):
            train(TrainConfig(**{"data": "d.jsonl", "out": str(tmp_path), "steps": 5, **overrides}))
