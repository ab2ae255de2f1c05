"""Training DoRA, embedding / head LoRA and trainable tokens through the one loop: they learn, the saved adapter
holds what was trained, and an interrupted run resumes to the same losses."""

import json

import pytest
import torch
from safetensors.torch import load_file

import deltaw
from deltaw.train.checkpoint import latest_checkpoint
from deltaw.train.loop import train
from tests.unit.test_training import config, data, interrupted_at_step, losses  # noqa: F401 (the data fixture)

VARIANTS = {
    "dora": {"use_dora": True},
    "embedding and head": {"targets": [r".*embed_tokens", "lm_head", r".*q_proj"]},
    "trainable tokens": {"targets": [r".*v_proj"], "trainable_tokens": "<|im_start|>,<|im_end|>,Arr"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_learn_and_save_what_they_trained(tiny_model_dir, data, tmp_path, variant):
    out = tmp_path / "out"
    train(config(tiny_model_dir, data, out, steps=12, lr=2e-2, lora=VARIANTS[variant]))
    history = losses(out)
    assert history[-1] < 0.95 * history[0]
    saved = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    if variant == "dora":
        assert saved["use_dora"] is True and sum("lora_magnitude_vector" in key for key in tensors) == 14
    elif variant == "trainable tokens":
        model, tokenizer = deltaw.load_model(tiny_model_dir)
        ids = [tokenizer.convert_tokens_to_ids(token) for token in ("<|im_start|>", "<|im_end|>", "Arr")]
        assert saved["trainable_token_indices"] == ids
        rows = tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
        moved = (rows - model.model.embed_tokens.weight.detach()[ids]).abs().amax(dim=1)
        assert (moved > 0).all()  # every chosen row trained (the third appears only through its id)
    else:
        assert saved["target_modules"] == ["embed_tokens", "lm_head", "q_proj"]
        assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].abs().sum() > 0


def test_a_dora_run_with_token_rows_resumes_to_the_uninterrupted_losses(tiny_model_dir, data, tmp_path, monkeypatch):
    settings = dict(steps=6, save_every=2, lora={"use_dora": True, "dropout": 0.1, "trainable_tokens": [1, 2]})
    train(config(tiny_model_dir, data, tmp_path / "straight", **settings))
    interrupted_at_step(5, monkeypatch, lambda: train(config(tiny_model_dir, data, tmp_path / "resumed", **settings)))
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000004"
    train(config(tiny_model_dir, data, tmp_path / "resumed", resume=True, **settings))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    straight = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_qlora_with_dora_trains_on_the_dequantized_norm_and_merges_exactly(tiny_model_dir, data, tmp_path):
    from deltaw.tools.merge import MergeOptions, merge_to_dir

    out = tmp_path / "out"
    train(config(tiny_model_dir, data, out, steps=6, lr=2e-2, method="qlora", lora={"use_dora": True}))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["deltaw"]["base_quantization"]["format"] == "nf4"
    assert losses(out)[-1] < losses(out)[0]
    merge_to_dir(MergeOptions(adapter=str(out), out=str(tmp_path / "merged"), model=str(tiny_model_dir)))
    model, _ = deltaw.load_model(tiny_model_dir)
    from deltaw.models.quantized import prepare_base

    prepare_base(model, saved["deltaw"]["base_quantization"])
    deltaw.load_adapter(model, out, "q")
    deltaw.set_adapter(model, "q")
    merged, _ = deltaw.load_model(str(tmp_path / "merged"))
    tokens = torch.arange(3, 15).reshape(1, 12)
    with torch.no_grad():  # the merged fp32 model computes the QLoRA + DoRA model it was trained as
        assert (merged(tokens).logits - model(tokens).logits).abs().max() <= 1e-4
