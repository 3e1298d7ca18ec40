"""lmforge: build language models end to end, on a laptop CPU first and on GPUs later."""

__version__ = "0.1.0"
