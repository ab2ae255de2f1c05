"""Prefix-tuning (Li & Liang, 2021): trainable keys and values at every attention layer of a frozen model.

    config.py     PrefixConfig
    layout.py     PEFT's flat prefix layout and the per-layer view
    attention.py  the prefixes at transformers' attention interface, one per batch row
    encoder.py    the trainable prefixes (or the reparameterizing MLP); add_prefix
    files.py      PEFT's PREFIX_TUNING files
    kind.py       the kind's registration (deltaw.adapters.kinds)
"""

from deltaw.adapters.prefix.attention import prefix_rows, set_prefix_rows
from deltaw.adapters.prefix.config import PrefixConfig
from deltaw.adapters.prefix.encoder import PrefixReport, add_prefix, prefix_values
from deltaw.adapters.prefix.kind import PREFIX

__all__ = ["PREFIX", "PrefixConfig", "PrefixReport", "add_prefix", "prefix_rows", "prefix_values", "set_prefix_rows"]
