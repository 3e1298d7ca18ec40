"""Quantized weights: GGUF's block formats (formats.py), their place in a model dir (store.py), the
kernels' in-memory layout (packed.py), numba products on it (kernels.py) and the torch modules
that compute with them (modules.py)."""

from lmforge.quant.formats import (BLOCK, FORMATS, BlockFormat, QuantTensor, block_format, format_for_ggml_type,
                                   from_gguf_bytes, quantize, to_gguf_bytes)

__all__ = ["BLOCK", "FORMATS", "BlockFormat", "QuantTensor", "block_format", "format_for_ggml_type",
           "from_gguf_bytes", "quantize", "to_gguf_bytes"]
