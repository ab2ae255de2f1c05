"""llama.cpp's names and row order for LoRA tensors: transformers module paths <-> GGUF tensor names, as data.

    transformers (PEFT keys)                              llama.cpp adapter GGUF
    model.layers.7.self_attn.q_proj  A [r, in], B [out, r] blk.7.attn_q.weight.lora_a [r, in]  (ggml ne = [in, r])
                                                           blk.7.attn_q.weight.lora_b [out, r] (ggml ne = [r, out])
    lm_head                                                output.weight.lora_a / .lora_b
    model.embed_tokens  lora_embedding_A [r, vocab]        token_embd.weight.lora_a [vocab, r] (A transposed:
                        lora_embedding_B [dim, r]          llama.cpp gathers its rows per token), .lora_b [dim, r]

llama.cpp scales every pair by `adapter.lora.alpha / r` (r = the pair's own rank, lora_b's ne[0]), or by 1
when the file has no alpha. Its llama-family graphs apply RoPE to adjacent dimension pairs (2i, 2i+1)
where transformers rotates the two halves of each head (i, i + d/2), so llama.cpp's converter stores the
q and k projections' output rows permuted; for a LoRA pair only B (the output side) moves. Architectures
whose llama.cpp graph uses the half-split ("NeoX") RoPE, such as Qwen and Gemma, keep transformers' order.
The names match llama.cpp's `convert_lora_to_gguf.py` and `src/llama-adapter.cpp` (b11312), tested
against gguf-py's own tensor-name map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GGUFArchitecture:
    """How llama.cpp holds one transformers architecture.

    Attributes:
        name: llama.cpp's `general.architecture` (the base model's and the adapter's must match).
        permute_qk: whether q_proj/k_proj output rows are stored in llama.cpp's RoPE order.
        untied_output: whether llama.cpp's graph has an output head of its own ("output.weight"; Gemma and
            Gemma 2 always reuse the token embedding).
    """

    name: str
    permute_qk: bool
    untied_output: bool = True


ARCHITECTURES: dict[str, GGUFArchitecture] = {  # transformers config.model_type -> llama.cpp
    "llama": GGUFArchitecture("llama", permute_qk=True),
    "mistral": GGUFArchitecture("llama", permute_qk=True),  # llama.cpp converts MistralForCausalLM as llama
    "qwen2": GGUFArchitecture("qwen2", permute_qk=False),
    "qwen3": GGUFArchitecture("qwen3", permute_qk=False),
    "gemma": GGUFArchitecture("gemma", permute_qk=False, untied_output=False),
    "gemma2": GGUFArchitecture("gemma2", permute_qk=False, untied_output=False),
    "gemma3_text": GGUFArchitecture("gemma3", permute_qk=False),
}

LAYER_TENSORS: dict[str, str] = {  # module path inside decoder layer N -> llama.cpp tensor blk.N.<name>.weight
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
OUTPUT_MODULE, EMBEDDING_MODULE = "lm_head", "model.embed_tokens"
MODEL_TENSORS: dict[str, str] = {OUTPUT_MODULE: "output", EMBEDDING_MODULE: "token_embd"}  # outside the layers
LAYERS_PREFIX = "model.layers"
ROPE_PERMUTED = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}  # tensor -> its head count

_LAYER_MODULE = re.compile(rf"{re.escape(LAYERS_PREFIX)}\.(?P<block>\d+)\.(?P<path>.+)")
_LAYER_TENSOR = re.compile(r"blk\.(?P<block>\d+)\.(?P<name>[a-z_0-9]+)\.weight")
_LAYER_NAMES = {name: path for path, name in LAYER_TENSORS.items()}
_MODEL_NAMES = {name: path for path, name in MODEL_TENSORS.items()}


def architecture_for(model_type: str) -> GGUFArchitecture:
    """llama.cpp's view of transformers' `model_type`; ValueError naming the supported ones otherwise."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} has no llama.cpp LoRA layout in deltaw; supported: "
                         f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def tensor_name(module: str, arch: GGUFArchitecture | None = None) -> str | None:
    """llama.cpp's base tensor name for a transformers module path (None when llama.cpp has no such tensor,
    in any architecture or in `arch`).

    "model.layers.3.mlp.down_proj" -> "blk.3.ffn_down.weight"; "lm_head" -> "output.weight".
    """
    if module == OUTPUT_MODULE and arch is not None and not arch.untied_output:
        return None
    if module in MODEL_TENSORS:
        return f"{MODEL_TENSORS[module]}.weight"
    match = _LAYER_MODULE.fullmatch(module)
    if match is None or match["path"] not in LAYER_TENSORS:
        return None
    return f"blk.{match['block']}.{LAYER_TENSORS[match['path']]}.weight"


def module_path(name: str) -> str | None:
    """The transformers module path of llama.cpp base tensor `name` (the inverse of `tensor_name`)."""
    if name.endswith(".weight") and name.removesuffix(".weight") in _MODEL_NAMES:
        return _MODEL_NAMES[name.removesuffix(".weight")]
    match = _LAYER_TENSOR.fullmatch(name)
    if match is None or match["name"] not in _LAYER_NAMES:
        return None
    return f"{LAYERS_PREFIX}.{match['block']}.{_LAYER_NAMES[match['name']]}"


def rope_heads(name: str, config: object) -> int | None:
    """The head count whose rows llama.cpp permutes in base tensor `name` (None: not permuted)."""
    match = _LAYER_TENSOR.fullmatch(name)
    if match is None or match["name"] not in ROPE_PERMUTED:
        return None
    heads = getattr(config, ROPE_PERMUTED[match["name"]], None)
    return heads if heads is not None else getattr(config, "num_attention_heads")


def to_llamacpp_rows(lora_b: torch.Tensor, heads: int) -> torch.Tensor:
    """B [out, r] with each head's rows reordered from transformers' RoPE halves to llama.cpp's pairs.

    Row (head, half, i) with i < d/2 moves to (head, 2·i + half), d = out / heads.
    """
    out = lora_b.shape[0]
    return lora_b.reshape(heads, 2, out // heads // 2, -1).transpose(1, 2).reshape(lora_b.shape)


def from_llamacpp_rows(lora_b: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `to_llamacpp_rows`: B [out, r] back in transformers' row order."""
    out = lora_b.shape[0]
    return lora_b.reshape(heads, out // heads // 2, 2, -1).transpose(1, 2).reshape(lora_b.shape)
