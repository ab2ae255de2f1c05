"""LoRA (Hu et al., 2021): y = W·x + scaling·B·(A·x) on the model's linear layers.

    config.py    LoRAConfig and the scaling rule
    layer.py     LoRALinear: the layer, merge and unmerge (and the NF4 branch of QLoRA, the DoRA branch)
    dora.py      DoRA's math: the magnitude per output row, the detached norm, the merged weight
    embedding.py LoRAEmbedding (LoRA on the embedding, trainable token rows) and TokenHead (a tied head)
    inject.py    add_lora: wrap the targeted layers, add a fresh adapter
    layout.py    PEFT's tensor keys of a LORA file
    parts.py     DoRA magnitudes, token rows and PEFT's base copies: checked, attached, collected
    files.py     PEFT's LORA files: read, check against a model, write, describe
    routed.py    RoutedLinear: a different adapter per batch row, for serving (DoRA: a per-row gain)
    routed_embedding.py  RoutedEmbedding: per-row embedding LoRA and token rows, for serving
    kind.py      the kind's registration (deltaw.adapters.kinds) and its serving slots
"""

from deltaw.adapters.lora.config import LoRAConfig
from deltaw.adapters.lora.embedding import LoRAEmbedding, TokenHead
from deltaw.adapters.lora.inject import LoRAReport, adapter_layers, add_lora, lora_layers
from deltaw.adapters.lora.kind import LORA
from deltaw.adapters.lora.layer import LoRALinear

__all__ = ["LORA", "LoRAConfig", "LoRAEmbedding", "LoRALinear", "LoRAReport", "TokenHead", "adapter_layers",
           "add_lora", "lora_layers"]
