"""The `deltaw` command end to end on the bundled model: merge (export) and inspect, and its errors."""


import pytest
import torch
from transformers import AutoModelForCausalLM

import deltaw
from tests.conftest import randomize_lora_b
from tests.cli import run_cli as run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter_dir(bundled_pristine, tmp_path_factory):
    """A non-trivial adapter for the bundled model, saved with deltaw."""
    import copy

    model = copy.deepcopy(bundled_pristine[0])
    torch.manual_seed(0)  # A's init comes from the global generator: fix it, whatever ran before
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=16, alpha=32))
    randomize_lora_b(model, "default", seed=4, std=0.02)
    return deltaw.save_adapter(model, tmp_path_factory.mktemp("cli") / "adapter", "default")


def greedy(model, tokenizer, max_new_tokens=24):
    messages = [{"role": "user", "content": "Name three things people keep in a kitchen."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_merge_exports_a_model_transformers_loads_with_the_same_greedy_tokens(bundled, adapter_dir, tmp_path):
    model, tokenizer = bundled
    base_tokens = greedy(model, tokenizer)
    deltaw.load_adapter(model, adapter_dir, "a")
    deltaw.set_adapter(model, "a")
    adapter_tokens = greedy(model, tokenizer)
    assert adapter_tokens != base_tokens  # the adapter changes the answer

    result = run("merge", "--adapter", str(adapter_dir), "--out", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert "merged" in result.stdout
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert all(type(m).__name__ != "LoRALinear" for m in exported.modules())
    assert not any("lora_" in key for key in exported.state_dict())
    assert greedy(exported, tokenizer) == adapter_tokens


def test_merge_refuses_a_non_empty_output_directory(adapter_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    result = run("merge", "--adapter", str(adapter_dir), "--out", str(tmp_path / "taken"))
    assert result.returncode == 2
    assert "not empty" in result.stderr and "--overwrite" in result.stderr
    assert (tmp_path / "taken" / "file").read_text() == "keep me"


def test_merge_reports_a_corrupt_adapter_without_a_traceback(adapter_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapter_dir / "adapter_config.json").read_bytes())
    data = (adapter_dir / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    result = run("merge", "--adapter", str(broken), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "truncated or corrupt" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_inspect_prints_config_targets_rank_size_and_fingerprint(adapter_dir):
    result = run("inspect", str(adapter_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "r=16, alpha=32" in out and "210 (" in out and "4,884,480" in out
    assert "MiB" in out and "'weights'" in out and "smollm2-135m-instruct" in out


def test_inspect_of_a_missing_directory_is_an_error(tmp_path):
    result = run("inspect", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "not a directory" in result.stderr
