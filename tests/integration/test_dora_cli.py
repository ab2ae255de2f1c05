"""`deltaw train --use-dora` and `--trainable-tokens` on the bundled model: PEFT loads the adapters with the same
logits, `deltaw inspect` describes them, and `deltaw merge` exports a merged DoRA model that computes the same."""

import copy
import json
import warnings

import pytest
import torch

import deltaw
from tests.integration.test_train_cli import PERSONAS, run

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("dora-data") / "pirate.jsonl"
    path.write_text("\n".join((PERSONAS / "pirate.jsonl").read_text().splitlines()[:16]) + "\n")
    return str(path)


def train(data, out, *flags):
    result = run("train", "--data", data, "--out", str(out), "--steps", "3", "--batch-size", "2", "--seq-len", "64",
                 "--lr", "5e-3", "--no-progress", *flags)
    assert result.returncode == 0, result.stderr
    return out


def logits_both_ways(bundled_pristine, path, tokens):
    """(deltaw's logits, PEFT's logits) with the adapter in `path` on the bundled model."""
    base, _ = bundled_pristine
    ours = copy.deepcopy(base)
    deltaw.load_adapter(ours, path, "a")
    deltaw.set_adapter(ours, "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    with torch.no_grad():
        return ours(tokens).logits, theirs(tokens).logits, base(tokens).logits


def test_dora_trained_on_the_bundled_model_loads_in_peft_and_merges(data, tmp_path, bundled_pristine, bundled_tokens):
    out = train(data, tmp_path / "dora", "--use-dora", "--rank", "8")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["deltaw"]["training"]["adapter"]["use_dora"] is True
    ours, theirs, base = logits_both_ways(bundled_pristine, out, bundled_tokens)
    assert (ours - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= 1e-4
    described = run("inspect", str(out))
    assert described.returncode == 0 and "DoRA" in described.stdout and "magnitude vectors on 210 modules" in described.stdout
    merged = run("merge", "--adapter", str(out), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    model, _ = deltaw.load_model(str(tmp_path / "merged"))
    with torch.no_grad():  # a merged fp32 model differs from the unmerged one by rounding, over 30 layers
        assert (model(bundled_tokens).logits - ours).abs().max() <= 1e-5 * ours.abs().max()


def test_trainable_chat_tokens_on_the_tied_bundled_model_load_in_peft(data, tmp_path, bundled_pristine, bundled_tokens,
                                                                      tokenizer):
    out = train(data, tmp_path / "tokens", "--trainable-tokens", "<|im_start|>,<|im_end|>", "--targets", r".*q_proj")
    config = json.loads((out / "adapter_config.json").read_text())
    ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert config["trainable_token_indices"] == ids
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, return_tensors="pt",
                                         add_generation_prompt=True, return_dict=True)["input_ids"]
    ours, theirs, base = logits_both_ways(bundled_pristine, out, chat)
    assert (ours - base)[..., ids].abs().max() > 0  # the tied head's rows moved too
    assert (ours - theirs).abs().max() <= 1e-4
    missing = run("train", "--data", data, "--out", str(tmp_path / "x"), "--steps", "1", "--trainable-tokens",
                  "<|nope|>", "--no-progress")
    assert missing.returncode == 2 and "'<|nope|>' is not in the tokenizer's vocabulary" in missing.stderr
