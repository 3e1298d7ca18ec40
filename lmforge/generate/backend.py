"""Which path runs decode steps faster on the machine at hand, measured once per architecture.

'torch': the model's own forward. 'numpy': the NumpyDecoder (numba kernels) where it supports
the model, else the torch forward with its Linear layers on numpy's BLAS
(`runtime.inference_backend`). Only CPU fp32 models are candidates; a quantized one takes the
decoder without a measurement.
"""

from __future__ import annotations

import sys
import time

import torch

from lmforge.runtime import inference_backend

_CHOICE: dict[tuple, str] = {}


def choose_inference_backend(model: torch.nn.Module) -> str:
    """'numpy' where it decodes at least 10% faster here, else 'torch'."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return "torch"
    from lmforge.generate import numpy_decode  # on use: it loads numba
    from lmforge.quant.modules import is_quantized

    if is_quantized(model) and numpy_decode.supports(model):
        # Both paths run the same block kernels; the decoder saves torch's per-operator dispatch
        # (~2,000 small operations a token), which nothing on the torch side makes up for.
        return "numpy"
    config = model.config
    # Whether the decoder runs is part of the key: a LoRA-wrapped model of the same shape takes
    # the BLAS path, whose speed the decoder's measurement says nothing about.
    key = (config.n_layer, config.n_embd, config.intermediate_size, config.vocab_size, torch.get_num_threads(),
           numpy_decode.supports(model))
    if key not in _CHOICE:
        _CHOICE[key] = _measure(model, numpy_decode.decoder_for(model))
    return _CHOICE[key]


def _measure(model: torch.nn.Module, decoder) -> str:
    """Time one decode step each way, as the Engine runs it. The decoder's first step compiles or
    loads its kernels, so each backend is warmed up before timing."""
    from lmforge.generate.kernels import compiled_before

    if decoder is not None and not compiled_before():
        print("lmforge: compiling the decode kernels (once per machine, ~10 s)", file=sys.stderr, flush=True)
    timings: dict[str, list[float]] = {}
    token = torch.zeros((1, 1), dtype=torch.long)
    for backend in ("torch", "numpy", "torch", "numpy"):
        with inference_backend(model, backend, switch_layers=decoder is None), torch.inference_mode():
            cache = model.new_cache(1, 8)
            model(token, cache=cache, logits_to_keep=1)
            use_decoder = backend == "numpy" and decoder is not None
            runs = []
            for i in range(4):  # the first is the warm-up
                start = time.perf_counter()
                if use_decoder:
                    decoder.step(token, cache)
                else:
                    model(token, cache=cache, logits_to_keep=1)
                if i:
                    runs.append(time.perf_counter() - start)
        timings.setdefault(backend, []).extend(runs)
    best = {b: sorted(t)[len(t) // 2] for b, t in timings.items()}
    return "numpy" if best["numpy"] < 0.9 * best["torch"] else "torch"
