"""The foundation demo (`make demo`): one base model, two LoRA adapters, switched at run time.

Until training lands the two adapters are random (B ~ N(0, std) instead of zero: a weight change of
a few percent), so their answers differ from the base's without being trained personas. The report shows
that switching changes the output, that merging gives the unmerged output, and that unmerge is exact.
"""

from __future__ import annotations

import tempfile
import time

import torch

import deltaw
from deltaw.adapters.lora import lora_layers

PROMPT = "Give me one tip for learning to cook."


def randomize(model: torch.nn.Module, name: str, seed: int, std: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        if name in layer.lora_B:
            layer.lora_B[name].data.normal_(0.0, std, generator=generator)


def answer(model: torch.nn.Module, tokenizer, max_new_tokens: int = 40) -> str:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    start = time.perf_counter()
    model, tokenizer = deltaw.load_model(deltaw.BUNDLED_NAME)
    print(f"loaded {deltaw.BUNDLED_NAME} in {time.perf_counter() - start:.1f} s")
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    print(deltaw.add_lora(model, deltaw.LoRAConfig(rank=16, alpha=32), name="alpha"))
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=8, alpha=16, targets=[r".*\.(q|v)_proj"]), name="beta")
    randomize(model, "alpha", seed=1, std=0.02)
    randomize(model, "beta", seed=2, std=0.03)

    with tempfile.TemporaryDirectory() as tmp:  # the adapters go to disk and come back
        for name in ("alpha", "beta"):
            deltaw.save_adapter(model, f"{tmp}/{name}", name)
            deltaw.delete_adapter(model, name)
            deltaw.load_adapter(model, f"{tmp}/{name}", name)
        print(f"\nsaved and reloaded both adapters (PEFT layout); alpha on disk:\n{deltaw.describe_adapter(f'{tmp}/alpha')}")

    print(f"\nprompt: {PROMPT!r}")
    with deltaw.disable_adapters(model):
        print(f"  base : {answer(model, tokenizer)!r}")
    answers = {}
    for name in ("alpha", "beta"):
        deltaw.set_adapter(model, name)
        answers[name] = answer(model, tokenizer)
        print(f"  {name:<5}: {answers[name]!r}")

    inputs = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    print("\nmerge / unmerge (fp32):")
    for name in ("alpha", "beta"):
        deltaw.unmerge_adapter(model)
        deltaw.set_adapter(model, name)
        with torch.no_grad():
            unmerged = model(inputs).logits
            t0 = time.perf_counter()
            deltaw.merge_adapter(model, name)
            merge_ms = 1000 * (time.perf_counter() - t0)
            merged = model(inputs).logits
        same_answer = answer(model, tokenizer) == answers[name]
        print(f"  {name:<5}: merge {merge_ms:6.1f} ms (the first includes warm-up), max |merged - unmerged| logits = "
              f"{(merged - unmerged).abs().max():.2e}, same greedy answer merged: {same_answer}")
    t0 = time.perf_counter()
    for i in range(100):
        deltaw.merge_adapter(model, "alpha" if i % 2 == 0 else "beta")
    switch_ms = 1000 * (time.perf_counter() - t0) / 100
    t0 = time.perf_counter()
    deltaw.unmerge_adapter(model)
    unmerge_ms = 1000 * (time.perf_counter() - t0)
    after = model.state_dict()
    exact = all(torch.equal(base_weights[k], after[k]) for k in base_weights)
    print(f"  100 switches by merge: {switch_ms:.1f} ms each; unmerge {unmerge_ms:.1f} ms; "
          f"base weights bit-identical after unmerge: {exact}")
    if not exact:
        raise SystemExit("unmerge did not restore the base weights exactly")


if __name__ == "__main__":
    main()
