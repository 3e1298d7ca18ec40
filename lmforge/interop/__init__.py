"""Interop with other ecosystems: Hugging Face folders (hf.py), GGUF files (gguf.py), the model
registry and cache (registry.py), `lmforge convert` (convert.py); bundle.py is what they share."""
