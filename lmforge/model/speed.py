"""Predicted speed and memory of training and inference on a `Hardware` (lmforge.model.hardware).

A roofline sum, term by term, so a reader can see what a step is made of:

Training step of b x s tokens:
    matmul time   = FLOPs (6N + attention, `flops_per_token`) / (peak x matmul efficiency)
    memory time   = bytes moved / elementwise bandwidth, where the bytes are
                      4 x the activations a step keeps (written in the forward, read in the
                      backward, their gradients written and read once),
                      2 x the logits (the loss reads them, its backward writes their gradient),
                      per parameter: the forward and backward read the weight (8 bytes), the
                      gradient is written and read (8), AdamW reads weight, gradient and its two
                      moments and writes three (28; SGD's one buffer: 20)
    step time     = matmul time + memory time  (no overlap counted: a CPU runs them in turn)

Decoding (one new token in each of b sequences, context c):
    bytes a step  = the weights (in their storage format) + the KV cache read (2 x layers x
                    kv width x c x b x its element size)
    step time     = max(bytes / bandwidth, FLOPs / peak) + a per-layer dispatch overhead
    prefill       = compute-bound: 2N + attention FLOPs a token at the matmul efficiency

Efficiencies. On this machine (kind "cpu") the matmul efficiency is measured: a product of the
model's own widest shape, timed now, against the measured peak; the bytes of a training step move
at the elementwise bandwidth, a share of the measured read bandwidth fitted to measured steps
(hardware.ELEMENTWISE_SHARE: ~10 GB/s here against ~48 GB/s of plain reads; norms, activations
and softmaxes write fresh tensors and compute as they go). (Checked: bench/bench_estimate.py.)
The overhead of a decoded token
beyond its bytes (CPU_LAYER_OVERHEAD_S a layer: the Engine's loop, sampling, the kernels' fork/joins)
is fitted to lmforge's own decoders on SmolLM2 at batch 1: 186.9 tokens/s in q4_1 (96.4 MB of
blocks, 2.4 ms at 40 GB/s) and 66.6 in fp32 (538 MB, 13.4 ms) leave 2.9 and 1.6 ms over 30 layers
(bench/README.md); 80 us a layer (2.4 ms) sits between. On a GPU nothing was measured (no GPU was lent to this project's checks): the
efficiencies below are assumptions stated as such: half the datasheet peak for matmuls, 80% of the
datasheet bandwidth, ~10 kernels of ~5 us a layer in eager mode.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.model import cpu_matmul
from lmforge.model.config import ModelConfig
from lmforge.model.estimate import estimate_memory
from lmforge.model.hardware import Hardware

# The process's peak over the sum of what a step keeps (`estimate_memory`'s total), as measured here
# (bench/bench_estimate.py: five configs from 4.5M to 135M parameters): while the backward runs,
# the gradients of the activations and the freed pages the allocator keeps add about the saved
# activations once more, and autograd's and the optimizer's first allocations ~80 MB. Fitted on
# this CPU; on a GPU, where the caching allocator behaves alike, not checked.
BACKWARD_ACTIVATION_FACTOR = 1.0
TRAINING_WARMUP_BYTES = 80 * 10**6

# What loading a model for inference adds besides its weights, measured here for SmolLM2 (RSS
# after `load_model` and a first generation, over the process before; bench/bench_estimate.py):
# the tokenizer, the decoder's compiled kernels and their imports.
INFERENCE_LOAD_BYTES = 200 * 10**6

GPU_MATMUL_EFFICIENCY = 0.5
GPU_BANDWIDTH_EFFICIENCY = 0.8
GPU_LAYER_OVERHEAD_S = 50e-6
CPU_LAYER_OVERHEAD_S = 80e-6

# Bytes per weight in each storage format (GGUF blocks of 32 weights: q8_0 = 2-byte scale + 32
# int8; q4_0 = scale + 16 bytes; q4_1 = scale + min + 16 bytes).
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "f16": 2.0, "q8_0": 34 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32}
# Per parameter per step: weights read by forward and backward, the gradient written and read,
# then the optimizer's reads and writes (module docstring).
_PARAM_TRAFFIC = {"adamw": 8 + 8 + 28, "sgd": 8 + 8 + 20}


@dataclass
class TrainingSpeed:
    tokens_per_step: int
    flops_per_step: float
    bytes_per_step: float
    matmul_efficiency: float
    matmul_seconds: float
    memory_seconds: float
    step_seconds: float
    tokens_per_s: float
    mfu: float  # against the hardware's peak

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class InferenceEstimate:
    batch_size: int
    context: int
    weight_format: str
    weight_bytes: int
    kv_cache_bytes: int  # at the full context, for the whole batch
    memory_bytes: int  # weights + KV cache + logits and activations of a step + loading (INFERENCE_LOAD_BYTES)
    decode_step_seconds: float
    decode_tokens_per_s: float  # aggregate over the batch
    ms_per_token: float  # the latency each sequence sees
    bound: str  # "bandwidth" or "compute"
    prefill_tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def _widest_matmul(config: ModelConfig, rows: int) -> tuple[int, int, int]:
    return rows, config.n_embd, max(config.intermediate_size, 3 * config.n_embd)


def matmul_efficiency(config: ModelConfig, hw: Hardware, rows: int) -> float:
    """The fraction of the peak a product of the model's widest shape reaches: measured on this
    machine, assumed on a GPU."""
    if hw.kind != "cpu":
        return GPU_MATMUL_EFFICIENCY
    m, k, n = _widest_matmul(config, max(1, min(rows, 4096)))
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        cpu_matmul.mm(a, b)  # the library the model's Linear layers use
        best = min(best, time.perf_counter() - t)
    return min(1.0, 2 * m * k * n / best / hw.peak_flops)


def _bandwidth(hw: Hardware) -> float:
    return hw.bandwidth * (GPU_BANDWIDTH_EFFICIENCY if hw.kind == "gpu" else 1.0)


def _elementwise_bandwidth(hw: Hardware) -> float:
    return hw.elementwise_bandwidth or _bandwidth(hw)


def training_estimate(config: ModelConfig, batch_size: int, seq_len: int, hw: Hardware, *,
                      optimizer: str = "adamw", activation_checkpointing: bool = False) -> dict:
    """`estimate_memory` as lmforge trains on `hw`: bf16 autocast keeps activations in 16 bits but
    the weights and their gradients in fp32."""
    est = estimate_memory(config, batch_size, seq_len, optimizer=optimizer,
                          dtype_bytes=2 if hw.precision == "bf16" else 4,
                          activation_checkpointing=activation_checkpointing)
    est["weights"] = est["grads"] = 4 * est["params"]
    est["total"] = sum(est[k] for k in ("weights", "grads", "optimizer", "activations", "logits"))
    est["peak"] = est["total"] + int(BACKWARD_ACTIVATION_FACTOR * est["activations"]) + TRAINING_WARMUP_BYTES
    return est


def training_speed(config: ModelConfig, batch_size: int, seq_len: int, hw: Hardware, *,
                   optimizer: str = "adamw", activation_checkpointing: bool = False) -> TrainingSpeed:
    est = training_estimate(config, batch_size, seq_len, hw, optimizer=optimizer,
                            activation_checkpointing=activation_checkpointing)
    tokens = batch_size * seq_len
    flops = float(est["flops_per_token"]) * tokens
    if activation_checkpointing:  # the forward runs twice: 8N instead of 6N
        flops *= 8 / 6
    moved = 4 * est["activations"] + 2 * est["logits"] + _PARAM_TRAFFIC[optimizer] * est["params"]
    eff = matmul_efficiency(config, hw, tokens)
    mm = flops / (hw.peak_flops * eff)
    mem = moved / _elementwise_bandwidth(hw)
    step = mm + mem
    return TrainingSpeed(tokens, flops, float(moved), eff, mm, mem, step, tokens / step,
                         flops / step / hw.peak_flops)


def kv_cache_bytes(config: ModelConfig, batch_size: int, context: int, element_bytes: int = 4) -> int:
    """Keys and values of every layer: 2 x layers x kv heads x head size x context x batch."""
    return 2 * config.n_layer * config.n_kv_head * config.head_dim * context * batch_size * element_bytes


def weight_bytes(config: ModelConfig, params: int, weight_format: str) -> int:
    """Bytes of the weights in a storage format. The 4-bit formats keep the token embedding (and
    the tied head) in q8_0, as `lmforge quantize` and llama.cpp do."""
    if weight_format not in ("q4_0", "q4_1"):
        return int(params * WEIGHT_BYTES[weight_format])
    embedding = config.vocab_size * config.n_embd
    return int((params - embedding) * WEIGHT_BYTES[weight_format] + embedding * WEIGHT_BYTES["q8_0"])


def inference_estimate(config: ModelConfig, hw: Hardware, *, batch_size: int = 1, context: int = 0,
                       weight_format: str = "fp32") -> InferenceEstimate:
    if weight_format not in WEIGHT_BYTES:
        raise LmforgeError(f"--weights {weight_format!r}: known formats: {', '.join(WEIGHT_BYTES)}")
    if config.is_encoder_decoder:
        raise LmforgeError("estimate --inference: decoder-only models only (an encoder-decoder's decode "
                           "also reads its source's cross-attention keys; not modelled)")
    context = context or config.block_size
    if batch_size < 1 or not 1 <= context <= config.block_size:
        raise LmforgeError(f"estimate --inference: batch {batch_size} and context {context} must be positive, "
                           f"the context at most the model's {config.block_size}")
    one = estimate_memory(config, 1, 1)  # meta-device counts: parameters and FLOPs a token
    params = one["params"]
    weights = weight_bytes(config, params, weight_format)
    kv_element = 2 if hw.precision == "bf16" else 4
    kv_full = kv_cache_bytes(config, batch_size, context, kv_element)
    activations = batch_size * (config.vocab_size + 4 * config.n_embd + 2 * config.intermediate_size) * 4
    n = one["flops_per_token"] // 6 - 2 * config.n_layer * config.n_head * config.head_dim  # N of 6N (context 1)
    # A step at the middle of the context (a reply's average position), each sequence one token.
    kv_read = kv_cache_bytes(config, batch_size, context // 2, kv_element)
    attention_flops = 4 * config.n_layer * config.n_head * config.head_dim * (context // 2)
    flops = batch_size * (2 * n + attention_flops)
    bw_s = (weights + kv_read) / _bandwidth(hw)
    # A few rows through each matrix: the products are matrix-vector, bandwidth-bound below the
    # peak; compute counts at the peak so that the bytes are not counted twice.
    compute_s = flops / hw.peak_flops
    overhead = config.n_layer * (CPU_LAYER_OVERHEAD_S if hw.kind == "cpu" else GPU_LAYER_OVERHEAD_S)
    step = max(bw_s, compute_s) + overhead
    prefill_eff = matmul_efficiency(config, hw, min(context, 512))
    prefill = hw.peak_flops * prefill_eff / (2 * n + attention_flops)
    memory = weights + kv_full + activations + INFERENCE_LOAD_BYTES
    return InferenceEstimate(batch_size, context, weight_format, weights, kv_full, memory,
                             step, batch_size / step, step * 1000, "bandwidth" if bw_s >= compute_s else "compute",
                             prefill)

