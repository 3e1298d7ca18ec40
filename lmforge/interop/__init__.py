"""Interop with other ecosystems: Hugging Face transformers layouts (hf.py)."""
