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
                             2d*a*s^2*b, plus a dropout mask k*a*s^2*b (if dropout > 0);
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
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError
from lmforge.model.attention import short_kernel_applies
from lmforge.model.config import ModelConfig
from lmforge.model.gpt import GPT

OPTIMIZER_STATE_BYTES = {
    "adamw": 8,  # exp_avg and exp_avg_sq, fp32 each
    "sgd": 4,  # the momentum buffer, fp32
}


def activation_bytes_per_layer(config: ModelConfig, batch_size: int, seq_len: int, dtype_bytes: int = 4,
                               fused_attention: bool = True, dropout_mask_bytes: int = 1) -> int:
    """The per-layer formula from the module docstring."""
    s, b, d, k = seq_len, batch_size, dtype_bytes, dropout_mask_bytes
    h, a, kv, i = config.n_embd, config.n_head, config.n_kv_head * config.head_dim, config.intermediate_size
    m = 3 if config.mlp == "swiglu" else 2
    dropout = config.dropout > 0
    rms = 2 * h if config.norm == "rmsnorm" and d != 4 else 0
    n = d * s * b * (6 * h + 2 * kv + rms) + d * s * b * m * i
    if dropout:
        n += 2 * k * s * b * h
    # cpu=True: the estimate does not know the device; on a GPU this overcounts short sequences.
    if fused_attention and short_kernel_applies(s, cpu=True, fp32=d == 4, dropout=config.dropout):
        n += d * a * s * s * b
    elif fused_attention:
        n += 4 * a * s * b
    else:
        n += 2 * d * a * s * s * b + (k * a * s * s * b if dropout else 0)
    return n


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
        model = GPT(config)
    n = model.param_count()
    s, b, d, h, v = seq_len, batch_size, dtype_bytes, config.n_embd, config.vocab_size
    layer = activation_bytes_per_layer(config, b, s, d, fused_attention, dropout_mask_bytes)
    if activation_checkpointing:
        activations = config.n_layer * d * s * b * h + layer
    else:
        activations = config.n_layer * layer
    activations += (3 if config.norm == "rmsnorm" and d != 4 else 2) * d * s * b * h  # final norm
    if config.dropout > 0:
        activations += dropout_mask_bytes * s * b * h  # embedding dropout
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
