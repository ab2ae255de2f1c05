"""LoRA (Hu et al., 2021): y = W·x + scaling·B·(A·x) on the model's linear layers.

    config.py    LoRAConfig and the scaling rule
    layer.py     LoRALinear: the layer, merge and unmerge (and the NF4 branch of QLoRA)
    inject.py    add_lora: wrap the targeted linear layers, add a fresh adapter
    files.py     PEFT's LORA files: read, check against a model, write, describe
    routed.py    RoutedLinear: a different adapter per batch row, for serving
    kind.py      the kind's registration (deltaw.adapters.kinds) and its serving slots
"""

from deltaw.adapters.lora.config import LoRAConfig
from deltaw.adapters.lora.inject import LoRAReport, add_lora, lora_layers
from deltaw.adapters.lora.kind import LORA
from deltaw.adapters.lora.layer import LoRALinear

__all__ = ["LORA", "LoRAConfig", "LoRALinear", "LoRAReport", "add_lora", "lora_layers"]
