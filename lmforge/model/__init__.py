"""Models: ModelConfig and presets, the decoder-only GPT (GPT-2 and Llama layouts), model dirs.

The submodules are the API; the names below are re-exported for convenience.
"""

from lmforge.model.config import PRESETS, ModelConfig, get_preset
from lmforge.model.gpt import GPT, KVCache
from lmforge.model.io import load_model_dir, save_model_dir

__all__ = ["GPT", "KVCache", "ModelConfig", "PRESETS", "get_preset", "load_model_dir", "save_model_dir"]
