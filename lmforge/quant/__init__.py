"""Quantized weights: GGUF's block formats (formats.py) and numba products on them (kernels.py)."""

from lmforge.quant.formats import (BLOCK, FORMATS, BlockFormat, QuantTensor, block_format, format_for_ggml_type,
                                   from_gguf_bytes, quantize, to_gguf_bytes)

__all__ = ["BLOCK", "FORMATS", "BlockFormat", "QuantTensor", "block_format", "format_for_ggml_type",
           "from_gguf_bytes", "quantize", "to_gguf_bytes"]
