"""``from melo_fast.export import exported_adapters``: the PEFT export's public import path (the README
shows it); the export itself is ``melo_fast.io.export``."""

from melo_fast.io.export import BASE_ADAPTER, adapter_name, exported_adapters, lora_alpha

__all__ = ["BASE_ADAPTER", "adapter_name", "exported_adapters", "lora_alpha"]
