"""The pieces of distributed training that run in one process: shares of a batch, errors before launch, NF4 held
as shardable parameters, the pinned fingerprint, the per-rank plan. The 2-process runs are in
tests/integration/test_distributed.py."""

from __future__ import annotations

import json

import pytest
import torch

import deltaw
from deltaw import cli
from deltaw.adapters.fingerprint import model_fingerprint, pin_fingerprint
from deltaw.quant.linear import NF4Linear, quantized_layers
from deltaw.train.checkpoint import latest_checkpoint
from deltaw.train.distributed import Ranks, check_launch, rank_device
from deltaw.tools.plan import Layout, PlanOptions, plan
from tests.conftest import chat, write_jsonl


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_rank_takes_a_disjoint_share_and_together_they_take_the_batch(world):
    for size in range(1, 9):
        indices = list(range(10, 10 + size))
        shares = [Ranks(rank, world).share(indices) for rank in range(world)]
        counted = [i for mine, counts in shares if counts for i in mine]
        assert sorted(counted) == indices  # each example exactly once
        for mine, counts in shares:
            assert mine and (counts or mine == indices[:1])  # a rank left out runs one example that counts 0


def test_a_run_of_one_process_is_rank_0_of_1():
    ranks = Ranks()
    assert ranks.main and not ranks.distributed and ranks.share([3, 1, 2]) == ([3, 1, 2], True)
    assert ranks.sum(torch.tensor([2.0, 5.0])).tolist() == [2.0, 5.0]
    with pytest.raises(KeyError, match="the original"):  # a failure is re-raised as it is
        with ranks.together():
            raise KeyError("the original")


def test_settings_that_cannot_work_with_the_ranks_are_refused_before_anything_loads():
    with pytest.raises(ValueError, match="--fsdp shards the base model across processes: launch with torchrun"):
        check_launch(Ranks(), batch_size=4, fsdp=True)
    check_launch(Ranks(rank=1, world=4), batch_size=4, fsdp=False)
    with pytest.raises(ValueError, match="--batch-size 2 is the global micro-batch, split over 3 ranks"):
        check_launch(Ranks(rank=1, world=3), batch_size=2, fsdp=False)


def test_fsdp_without_torchrun_is_a_one_line_error_with_exit_2(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = write_jsonl(tmp_path / "d.jsonl", [chat("Hi?", "Hello.")])
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", data, "--out", str(tmp_path / "o"),
                     "--steps", "1", "--fsdp", "--no-progress"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("deltaw train: error: --fsdp shards") and "\n" not in error
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_device_cuda_without_a_gpu_is_refused_with_the_fix(tiny_model_dir, tmp_path):
    config = deltaw.train.TrainConfig(data="d", out=str(tmp_path), steps=1, device="cuda")
    with pytest.raises(ValueError, match="--device cuda: this torch sees no CUDA device.*use --device cpu"):
        config.check()


@pytest.mark.parametrize(("local_rank", "local_world"), [(0, "2"), (1, "2"), (1, None)])
def test_device_cuda_with_more_ranks_than_gpus_stops_every_rank_with_one_line(
        tiny_model_dir, tmp_path, monkeypatch, capsys, local_rank, local_world):
    """Each rank of `torchrun --nproc-per-node 2` on a 1-GPU machine, the one with a GPU too, stops before it
    joins the process group (which would wait for the other) with exit 2 and the fix."""
    for name, value in {"WORLD_SIZE": "2", "RANK": str(local_rank), "LOCAL_RANK": str(local_rank),
                        "LOCAL_WORLD_SIZE": local_world}.items():
        monkeypatch.setenv(name, value) if value else monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    data = write_jsonl(tmp_path / "d.jsonl", [chat("Hi?", "Hello.")])
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", data, "--out", str(tmp_path / "o"),
                     "--steps", "1", "--device", "cuda", "--no-progress"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error, error
    assert "this machine runs 2 ranks (this one LOCAL_RANK " in error and "torch sees 1 CUDA device(s)" in error
    assert error.endswith("(torchrun --nproc-per-node 1) or train with --device cpu")
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # enough GPUs: this rank takes its own
    assert rank_device("cuda", local_rank) == torch.device("cuda", local_rank)


def test_a_checkpoint_records_the_world_size(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(f"{i}?", f"{i}.") for i in range(4)])
    deltaw.train.train(deltaw.train.TrainConfig(data=data, out=str(tmp_path / "o"), model=str(tiny_model_dir),
                                                steps=1, batch_size=2, dtype="fp32", progress=False))
    assert json.loads((latest_checkpoint(tmp_path / "o") / "state.json").read_text())["world_size"] == 1


def test_nf4_held_as_parameters_keeps_keys_values_and_gradients(tiny):
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(tiny.model.layers[0].mlp.up_proj)
    x = torch.randn(3, layer.in_features, requires_grad=True)
    keys, before = sorted(layer.state_dict()), layer(x)
    (grad,) = torch.autograd.grad(before.sum(), x)
    layer.weight.hold_as_parameters()
    assert sorted(name for name, _ in layer.weight.named_parameters()) == ["absmax", "nested_absmax", "packed"]
    assert not any(p.requires_grad for p in layer.parameters()) and layer.weight.packed.dtype == torch.uint8
    assert sorted(layer.state_dict()) == keys  # the same keys, so NF4 directories and checkpoints do not change
    after = layer.to(torch.float32)(x)
    assert torch.equal(after, before)
    assert torch.equal(torch.autograd.grad(after.sum(), x)[0], grad)


def test_a_pinned_fingerprint_outlives_the_weights_it_was_taken_from(tiny):
    deltaw.quantize_model(tiny)
    fingerprint = pin_fingerprint(tiny)
    assert fingerprint == model_fingerprint(tiny)
    with torch.no_grad():
        tiny.get_input_embeddings().weight.zero_()  # what a rank holding one shard would see
    assert model_fingerprint(tiny) == fingerprint and quantized_layers(tiny)


def test_plan_per_rank_splits_the_batch_and_fsdp_shards_the_states():
    layout = Layout(world=4, fsdp=True, layers=10)
    assert layout.weights(1000, 100) == pytest.approx(100 * 1.25 + 1000 * (0.25 + 0.2))
    assert layout.trainable(80) == 20 and layout.buckets(80) == 0
    assert Layout(world=4, layers=10).buckets(80) == 80 and Layout(layers=10).buckets(80) == 0
    one, ddp, fsdp = (plan(PlanOptions(batch=4, seq_len=128, **extra)) for extra in
                      ({}, {"world_size": 2}, {"world_size": 2, "fsdp": True}))
    lora = [p.rows[1] for p in (one, ddp, fsdp)]
    assert lora[1].activations == pytest.approx(lora[0].activations / 2) and lora[1].weights == lora[0].weights
    assert lora[2].weights < lora[1].weights and lora[2].optimizer == pytest.approx(lora[0].optimizer / 2)
    assert "per rank of 2 (FSDP)" in str(fsdp)
    with pytest.raises(ValueError, match="--batch 4 is split over 8 ranks"):
        plan(PlanOptions(batch=4, seq_len=128, world_size=8))
