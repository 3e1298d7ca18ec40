"""Models: ModelConfig and presets, the decoder-only GPT (GPT-2 and Llama layouts), the
encoder-decoder Seq2Seq on the same parts, model dirs.

The submodules are the API; the names below are re-exported lazily, so that importing the
config (as the CLI does to build its options) does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "ModelConfig": "lmforge.model.config", "PRESETS": "lmforge.model.config", "get_preset": "lmforge.model.config",
    "GPT": "lmforge.model.gpt", "KVCache": "lmforge.model.gpt",
    "Seq2Seq": "lmforge.model.seq2seq", "Seq2SeqCache": "lmforge.model.seq2seq",
    "load_model_dir": "lmforge.model.io", "save_model_dir": "lmforge.model.io",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.model' has no attribute {name!r}")
