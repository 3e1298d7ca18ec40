"""Back-of-the-envelope memory and compute for training a ModelConfig, before buying the GPU.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (section 4.1), which counts s*b*h*(34 + 5*a*s/h) bytes per layer for
GPT-style layers in 16-bit with dropout, where s = sequence length, b = batch, h = n_embd,
a = n_head. We redo their count term by term for any element size d (dtype_bytes) and for the
choices this model allows, per layer:

    d * s*b * (6h + 2kv)     norm_1 input, qkv input, q, k (kv wide), v (kv wide),
                             attention output (= proj input), norm_2 input, fc input
  + d * s*b * 2h             rmsnorm in 16-bit weights only: it runs as separate ops (in fp32,
                             as HF does), so each of the two norms also keeps its normalised
                             input (fp32 weights take lmforge.model.fused, which keeps x alone)
  + d * s*b * m*I            MLP hidden of width I: gelu keeps its input and output (m = 2);
                             swiglu keeps gate|up (lmforge.model.fused) and their product (m = 3)
  + 2 * k * s*b*h            two dropout masks on the residual branches (if dropout > 0)
  + attention scores         fused SDPA (flash / memory-efficient): only a fp32 log-sum-exp,
                             4*a*s*b; materialised: softmax output and its dropout output,
                             2d*a*s^2*b, plus a dropout mask k*a*s^2*b (if dropout > 0)
                             and, with grouped-query attention, k and v repeated for every
                             query head, 2d*s*b*(h - kv);
                             lmforge's short-sequence kernel (fp32, s <= SHORT_SEQUENCE, no
                             dropout; CPU only, counted everywhere as an upper bound): the
                             softmax output, d*a*s^2*b

k is the size of a dropout mask element: 1 byte on CUDA (bool masks, the paper's case), d on
the CPU, where torch keeps masks in the activation dtype. Fused attention is the default on
CUDA and on the CPU without attention dropout; with dropout the CPU takes the materialised path.

For GPT-2 (kv = h, I = 4h, gelu, dropout) at d = 2 with materialised attention this is exactly
the paper's 34*s*b*h + 5*a*s^2*b. Outside the layers: the final norm's input and output
(2*d*s*b*h; 3*d*s*b*h for rmsnorm in 16-bit), the embedding dropout mask (k*s*b*h) and the logits (see `logits`). With activation checkpointing each layer keeps only
its input (d*s*b*h) and one layer's activations exist at a time, during its recomputation.

An encoder-decoder (sources and targets both seq_len tokens) counts its encoder layers as the
layers above, but never causal (the short-sequence kernel is causal only), and its decoder
layers as the layers above plus, for cross-attention (`cross_attention_bytes_per_layer`):

    d * s*b * (4h + 2kv)     norm_cross input, q input, q, k and v over the source (kv wide
                             each), attention output (= proj input)
  + d * s*b * h              rmsnorm in 16-bit weights only: its normalised input
  + k * s*b*h                the residual dropout mask (if dropout > 0)
  + attention scores         as for self-attention, never causal

The encoder output, which every cross-attention's k|v projection reads, is one tensor: the
encoder's final norm output. Outside the layers each stack has a final norm (as above) and a
norm on its embeddings (its input, d*s*b*h; in 16-bit rmsnorm also the normalised input), and
with dropout an embedding dropout mask.
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError
from lmforge.model.attention import short_kernel_applies
from lmforge.model.config import ModelConfig
from lmforge.model.io import model_class

OPTIMIZER_STATE_BYTES = {
    "adamw": 8,  # exp_avg and exp_avg_sq, fp32 each
    "sgd": 4,  # the momentum buffer, fp32
}


def activation_bytes_per_layer(config: ModelConfig, batch_size: int, seq_len: int, dtype_bytes: int = 4,
                               fused_attention: bool = True, dropout_mask_bytes: int = 1, causal: bool = True) -> int:
    """The per-layer formula from the module docstring (causal=False: an encoder layer)."""
    s, b, d, k = seq_len, batch_size, dtype_bytes, dropout_mask_bytes
    h, kv, i = config.n_embd, config.n_kv_head * config.head_dim, config.intermediate_size
    m = 3 if config.mlp == "swiglu" else 2
    dropout = config.dropout > 0
    rms = 2 * h if config.norm == "rmsnorm" and d != 4 else 0
    n = d * s * b * (6 * h + 2 * kv + rms) + d * s * b * m * i
    if dropout:
        n += 2 * k * s * b * h
    return n + _attention_score_bytes(config, b, s, d, k, fused_attention, causal)


def cross_attention_bytes_per_layer(config: ModelConfig, batch_size: int, seq_len: int, dtype_bytes: int = 4,
                                    fused_attention: bool = True, dropout_mask_bytes: int = 1) -> int:
    """What cross-attention adds to an encoder-decoder's decoder layer (the module docstring)."""
    s, b, d, k = seq_len, batch_size, dtype_bytes, dropout_mask_bytes
    h, kv = config.n_embd, config.n_kv_head * config.head_dim
    rms = h if config.norm == "rmsnorm" and d != 4 else 0
    n = d * s * b * (4 * h + 2 * kv + rms)
    if config.dropout > 0:
        n += k * s * b * h
    return n + _attention_score_bytes(config, b, s, d, k, fused_attention, causal=False)


def _attention_score_bytes(config: ModelConfig, b: int, s: int, d: int, k: int, fused: bool, causal: bool) -> int:
    a = config.n_head
    # cpu=True: the estimate does not know the device; on a GPU this overcounts short sequences.
    if fused and causal and short_kernel_applies(s, cpu=True, fp32=d == 4, dropout=config.dropout):
        return d * a * s * s * b
    if fused:
        return 4 * a * s * b
    # Materialised, grouped-query attention repeats k and v for every query head, and keeps the copies.
    repeated_kv = 2 * d * s * b * (config.n_embd - config.n_kv_head * config.head_dim)
    return 2 * d * a * s * s * b + (k * a * s * s * b if config.dropout > 0 else 0) + repeated_kv


def estimate_memory(config: ModelConfig, batch_size: int, seq_len: int, *, optimizer: str = "adamw",
                    dtype_bytes: int = 4, activation_checkpointing: bool = False,
                    fused_attention: bool = True, dropout_mask_bytes: int = 1) -> dict[str, int]:
    """Bytes needed to train `config` on batches of [batch_size, seq_len] tokens.

    weights and grads are in dtype_bytes per parameter; optimizer states are fp32.
    fused_attention and dropout_mask_bytes: see the module docstring. The total
    sums every term, an upper bound on the peak (activations are freed while grads appear).
    Returns bytes for weights, grads, optimizer, activations, logits, total; plus params and
    flops_per_token (training, forward + backward).
    """
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise LmforgeError(f"estimate: unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_STATE_BYTES)}")
    if batch_size < 1 or seq_len < 1:
        raise LmforgeError(f"estimate: batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if seq_len > config.block_size:
        raise LmforgeError(f"estimate: seq_len {seq_len} exceeds the model's block_size {config.block_size}")
    with torch.device("meta"):  # exact counts without allocating a single weight
        model = model_class(config)(config)
    n = model.param_count()
    s, b, d, h, v = seq_len, batch_size, dtype_bytes, config.n_embd, config.vocab_size
    k = dropout_mask_bytes
    rms16 = config.norm == "rmsnorm" and d != 4
    layer = activation_bytes_per_layer(config, b, s, d, fused_attention, k)
    final_norm = (3 if rms16 else 2) * d * s * b * h
    if config.is_encoder_decoder:
        encoder_layer = activation_bytes_per_layer(config, b, s, d, fused_attention, k, causal=False)
        decoder_layer = layer + cross_attention_bytes_per_layer(config, b, s, d, fused_attention, k)
        stacks = [(config.n_encoder_layer, encoder_layer), (config.n_layer, decoder_layer)]
        embedding_norm = (2 if rms16 else 1) * d * s * b * h
        outside, embedding_dropouts = 2 * (final_norm + embedding_norm), 2
    else:
        stacks, outside, embedding_dropouts = [(config.n_layer, layer)], final_norm, 1
    if activation_checkpointing:
        activations = sum(n_layers for n_layers, _ in stacks) * d * s * b * h + max(per for _, per in stacks)
    else:
        activations = sum(n_layers * per for n_layers, per in stacks)
    activations += outside
    if config.dropout > 0:
        activations += embedding_dropouts * k * s * b * h
    # Logits in the model dtype, their fp32 copy for the loss (when not fp32 already), and the
    # fp32 log-softmax cross_entropy keeps for backward.
    logits = s * b * v * (d + (4 if d != 4 else 0) + 4)
    out = {
        "params": n,
        "weights": n * d,
        "grads": n * d,
        "optimizer": n * OPTIMIZER_STATE_BYTES[optimizer],
        "activations": activations,
        "logits": logits,
    }
    out["total"] = out["weights"] + out["grads"] + out["optimizer"] + out["activations"] + out["logits"]
    out["flops_per_token"] = model.flops_per_token(seq_len)
    return out
