"""One decode step of an lmforge GPT in numpy and numba kernels: the same arithmetic as
`GPT.forward` for new tokens [B, 1] against a filled KVCache, without torch's per-operator dispatch.

Decoding one token is ~120 matrix-vector products and ~2,000 small operations. On a CPU the
products are bound by memory bandwidth, and in eager PyTorch the small operations cost 3-5 us
each in dispatch alone: as much time again as the products (SmolLM2-135M on 2 cores: 24 ms of
products, 13-27 ms of the rest). Here each layer is eight kernel calls (`kernels`: norms, the
few-row products that read each weight once for the whole batch, attention with RoPE and the
cache write, SwiGLU) and a few numpy additions. The Engine uses it for CPU fp32 models whose
projections are plain `lmforge.model.gpt.Linear` or quantized (`lmforge.quant.modules`: the block
kernels of lmforge.quant.kernels, the same call for every family), not LoRA-wrapped ones; for
fp32 models only when it measured faster than torch on the machine at hand. Tests hold its
logits to the torch path's.

Prefill of a quantized model's short prompt (`prefills`: up to PREFILL_TOKENS tokens) runs here
too, on the products torch's quantized layers call (`lmforge.quant.kernels.linear`): in torch a
42-token prefill of SmolLM2 spent ~10 ms in operators around its ~22 ms of products. Every
token's keys, values and logits are then computed row by row, whatever tokens are prefilled
with it: a prompt prefilled in pieces, or after a prefix already in the cache (the serving
batcher's prefix reuse), gives the same bits as the prompt prefilled whole. Longer prompts stay
in torch, whose attention is faster than the per-row kernel's over hundreds of positions.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.generate.kernels import ROWS, decode_attention, few_row_linear, kernel_threads, norm, silu_mul
from lmforge.generate.threads import ThreadGovernor
from lmforge.model.gpt import GPT, KVCache, Linear
from lmforge.quant import kernels as quant_kernels
from lmforge.quant.modules import QuantEmbedding, QuantLinear, matmul as quant_matmul
from lmforge.quant.packed import PackedWeight

# The longest prompt `NumpyDecoder.prefill` takes; longer ones go to torch. SmolLM2 Q4_1 on 2 cores,
# torch vs here: 42 tokens 31.4 vs 26.4 ms, 128: 88.6 vs 79.6, 256: 175 vs 173, 512: 392 vs 415.
PREFILL_TOKENS = 256

def supports(model: GPT) -> bool:
    """Whether `NumpyDecoder` computes exactly this model: CPU fp32, plain or quantized layers,
    inference."""
    w = model.norm_f.weight
    if w.device.type != "cpu" or w.dtype != torch.float32 or model.training:
        return False
    layers = [model.lm_head] + [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)]
    # LoRA-wrapped or replaced layers compute something else.
    return all(type(layer) in (Linear, QuantLinear) for layer in layers)


def check_int8_activations(model: GPT) -> None:
    """Refuse int8 activations where they cannot be had: they are the quantized products' (an
    fp32 model has none), on a CPU with AVX2 or AVX-512 VNNI, in the numpy decoder."""
    from lmforge.quant.modules import is_quantized

    if not is_quantized(model):
        raise LmforgeError("int8 activations apply to a quantized model's products; this model is not quantized "
                           "(`lmforge quantize MODEL --to q8_0|q4_0|q4_1 -o OUT` makes one)")
    if quant_kernels.INT8 is None:
        raise LmforgeError("int8 activations need a CPU with AVX2 or AVX-512 VNNI; this one (as numba targets it) "
                           "has neither: decode without --int8-activations")
    if not supports(model):
        raise LmforgeError("int8 activations run in the numpy decoder, which does not compute this model "
                           "(LoRA layers, or not a CPU fp32 model in eval mode): merge the adapters first")


def decoder_for(model: GPT, *, int8_activations: bool = False) -> "NumpyDecoder | None":
    """A NumpyDecoder for `model` (kernels on torch's thread count now), or None where the
    decoder does not compute this model (see `supports`): the caller decodes in torch then.
    With int8_activations a model the decoder cannot run is refused (check_int8_activations)."""
    if int8_activations:
        return NumpyDecoder(model, int8_activations=True)
    return NumpyDecoder(model) if supports(model) else None


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


def _weight(layer) -> np.ndarray | PackedWeight:
    """A layer's weight as the products take it: an fp32 view, or the packed blocks."""
    return layer.packed if isinstance(layer, QuantLinear) else _np(layer.weight)


class _Layer:
    """Numpy views of one block's weights (shared memory: no copy, always the current values)."""

    def __init__(self, block) -> None:
        self.norm_1 = (_np(block.norm_1.weight), _np(getattr(block.norm_1, "bias", None)))
        self.norm_2 = (_np(block.norm_2.weight), _np(getattr(block.norm_2, "bias", None)))
        self.qkv, self.qkv_b = _weight(block.attn.qkv), _np(block.attn.qkv.bias)
        self.proj, self.proj_b = _weight(block.attn.proj), _np(block.attn.proj.bias)
        self.fc, self.fc_b = _weight(block.mlp.fc), _np(block.mlp.fc.bias)
        self.down, self.down_b = _weight(block.mlp.proj), _np(block.mlp.proj.bias)


class NumpyDecoder:
    """Decode steps for one model. Build it per generation: it holds views of the weights."""

    def __init__(self, model: GPT, threads: int | None = None, *, int8_activations: bool = False) -> None:
        """threads: for the kernels (default torch's count now); the Engine builds the decoder
        while torch still has all its threads and holds torch at one during decode steps.
        int8_activations: round the inputs of the quantized products to int8 per block
        (lmforge.quant.kernels.int8_linear): faster batched steps, not the dequantized model's
        exact sums."""
        if not supports(model):
            raise LmforgeError("NumpyDecoder: the model is not a plain CPU fp32 lmforge GPT in eval mode")
        if int8_activations:
            check_int8_activations(model)
        self.int8 = int8_activations
        self.threads = threads or torch.get_num_threads()
        # Threads per step, fewer while other processes hold a core (the Engine shares one
        # governor between its decoders, so what a generation learned carries to the next).
        self.governor = ThreadGovernor(self.threads)
        c = model.config
        self.rms = c.norm == "rmsnorm"
        self.eps = c.norm_eps
        self.H, self.Hkv, self.hd = c.n_head, c.n_kv_head, c.head_dim
        self.scale = 1.0 / float(np.sqrt(c.head_dim))
        emb = model.tok_emb
        self.emb = emb.packed if isinstance(emb, QuantEmbedding) else _np(emb.weight)
        self.pos_emb = _np(model.pos_emb.weight) if model.pos_emb is not None else None
        self.rope = (_np(model.rope_cos), _np(model.rope_sin_signed)) if c.position == "rope" else None
        self.layers = [_Layer(b) for b in model.blocks]
        self.norm_f = (_np(model.norm_f.weight), _np(getattr(model.norm_f, "bias", None)))
        self.head, self.head_b = _weight(model.lm_head), _np(model.lm_head.bias)
        self.gelu = {"gelu": "tanh", "gelu_exact": "none"}.get(c.mlp)
        products = [self.head] + [w for L in self.layers for w in (L.qkv, L.proj, L.fc, L.down)]
        self.quantized = all(isinstance(w, PackedWeight) for w in products)

    def prefills(self, tokens: int) -> bool:
        """Whether `prefill` takes a prompt of this many tokens: a quantized model's short ones.
        Callers choose by this alone, so that a prompt's cache and logits are the same bits
        whoever prefills it (generate, the serving batcher) and in whatever pieces."""
        return self.quantized and 0 < tokens <= PREFILL_TOKENS

    # -- pieces ------------------------------------------------------------------------------
    def _norm(self, x: np.ndarray, wb: tuple) -> np.ndarray:
        return norm(x, wb[0], wb[1], self.rms, self.eps)

    def _linear(self, x: np.ndarray, w: np.ndarray | PackedWeight, b: np.ndarray | None,
                prefill: bool = False) -> np.ndarray:
        # Prefill: the products of torch's quantized layers (fp32 activations, any rows).
        # Up to ROWS rows (a decode batch): the kernels that read each weight row once for all
        # rows; more rows run on them in blocks of ROWS. numpy's BLAS (W @ x.T) beyond ROWS rows
        # ran 30-65x slower inside a step on 2 cores, its threads contending with the kernels'
        # (tiny at batch 10: 138 ms a step against 2 ms in blocks; llama-tiny 207 against 6).
        if prefill:
            y = quant_matmul(x, w)
        elif isinstance(w, PackedWeight):
            y = quant_kernels.product(x, w, self.int8) if x.shape[0] <= ROWS else quant_matmul(x, w)
        else:
            y = few_row_linear(x, w)
        return y if b is None else y + b

    def _mlp_act(self, h: np.ndarray) -> np.ndarray:
        if self.gelu is None:  # swiglu: [gate | up]
            return silu_mul(h)
        return F.gelu(torch.from_numpy(np.ascontiguousarray(h)), approximate=self.gelu).numpy()

    # -- the step ----------------------------------------------------------------------------
    def step(self, idx: torch.Tensor, cache: KVCache, *, positions: torch.Tensor | None = None,
             attn_mask: torch.Tensor | None = None, lengths: np.ndarray | None = None,
             rows: np.ndarray | None = None) -> torch.Tensor:
        """`GPT.forward(idx, positions=, attn_mask=, cache=, logits_to_keep=1)` for one new token
        per row: idx [B, 1] -> logits [B, 1, vocab]. Writes the keys/values at cache.pos and
        advances it. positions [B, 1] (default cache.pos for every row); attn_mask [B, cache.pos + 1]
        bool, True = may attend (left-padded batches).
        lengths: int64 [B], each row's own count of cached positions, for a cache whose rows are
        independent sequences (continuous batching: each row's prompt from position 0, rows at
        different lengths). The new keys/values go to position lengths[b] of row b, which attends
        over [0, lengths[b]] at position lengths[b] (positions and attn_mask not taken); the
        caller advances lengths, cache.pos is not used. A row's logits are then the same bits as
        that sequence decoded alone. rows (with lengths): int64 [B], distinct, the cache row of
        each token (the busy slots of a serving cache; default 0..B-1): other rows are untouched.
        The kernels run on the decoder's threads; the caller's numba count comes back after."""
        start = time.perf_counter()
        with kernel_threads(self.governor.threads()):
            out = self._step(idx, cache, positions=positions, attn_mask=attn_mask, lengths=lengths, rows=rows)
        self.governor.record(idx.shape[0], time.perf_counter() - start)
        return out

    def _step(self, idx: torch.Tensor, cache: KVCache, *, positions: torch.Tensor | None,
              attn_mask: torch.Tensor | None, lengths: np.ndarray | None,
              rows: np.ndarray | None) -> torch.Tensor:
        B = idx.shape[0]
        if idx.shape != (B, 1):
            raise LmforgeError(f"NumpyDecoder decodes one token per row: idx of shape {tuple(idx.shape)}")
        if rows is not None:
            rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
            if lengths is None or rows.shape != (B,) or len(set(rows.tolist())) != B \
                    or not all(0 <= r < cache.batch_size for r in rows.tolist()):
                raise LmforgeError(f"NumpyDecoder.step: rows must be {B} distinct rows of the cache's "
                                   f"{cache.batch_size}, with lengths")
        elif B > cache.batch_size:
            raise LmforgeError(f"NumpyDecoder.step: {B} tokens for a cache of {cache.batch_size} rows")
        if lengths is not None:
            if positions is not None or attn_mask is not None:
                raise LmforgeError("NumpyDecoder.step: lengths gives each row's positions; pass no positions or attn_mask")
            start = np.ascontiguousarray(lengths, dtype=np.int64).reshape(B)
            pos = start
            top = int(start.max()) if B else 0
        else:
            top = cache.pos
            start = np.full(B, top, dtype=np.int64)  # every row writes at cache.pos (once per step, not per layer)
            if positions is None:
                pos = start
            else:
                pos = np.ascontiguousarray(positions.numpy().reshape(B), dtype=np.int64)
        if top + 1 > cache.max_len:
            raise LmforgeError(f"KV cache full: {top} cached + 1 new token exceed its max_len {cache.max_len}")
        x = self._embed(idx.numpy()[:, 0], pos)
        bias = None
        if attn_mask is not None:
            bias = np.where(attn_mask.numpy(), np.float32(0), np.float32(-np.inf))
        x = self._blocks(x, cache, pos, start, bias, rows)
        if lengths is None:
            cache.pos = top + 1
        logits = self._linear(self._norm(x, self.norm_f), self.head, self.head_b)
        return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))[:, None]

    def _embed(self, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
        x = quant_kernels.rows_of(self.emb, ids) if isinstance(self.emb, PackedWeight) else self.emb[ids]
        return x if self.pos_emb is None else x + self.pos_emb[pos]

    def _blocks(self, x: np.ndarray, cache: KVCache, pos: np.ndarray, start: np.ndarray, bias: np.ndarray | None,
                cache_rows: np.ndarray | None, prefill: bool = False) -> np.ndarray:
        """Every block on rows x at positions pos, their keys/values written at start of
        cache_rows (see decode_attention); prefill: x is one sequence's tokens, on prefill's
        products."""
        K, V = cache.k.numpy(), cache.v.numpy()
        B, H, Hkv, hd = x.shape[0], self.H, self.Hkv, self.hd
        for i, L in enumerate(self.layers):
            qkv = self._linear(self._norm(x, L.norm_1), L.qkv, L.qkv_b, prefill).reshape(B, H + 2 * Hkv, hd)
            y = decode_attention(qkv, pos, self.rope, K[i], V[i], start, bias, self.scale, cache_rows, prefill)
            x = x + self._linear(y, L.proj, L.proj_b, prefill)
            h = self._mlp_act(self._linear(self._norm(x, L.norm_2), L.fc, L.fc_b, prefill))
            x = x + self._linear(h, L.down, L.down_b, prefill)
        return x

    def prefill(self, ids: list[int], cache: KVCache) -> torch.Tensor:
        """Prefill `ids` into a one-row cache at positions cache.pos.. (a prompt, or its piece
        after the positions already there), advancing cache.pos: `GPT.forward(ids, cache=cache,
        logits_to_keep=1)` where `prefills(cache.pos + len(ids))`. Returns the last token's
        logits [vocab]."""
        n = len(ids)
        if not n or not self.prefills(cache.pos + n):
            raise LmforgeError(f"NumpyDecoder.prefill takes prompts of up to {PREFILL_TOKENS} tokens of a quantized "
                               f"model; got {n} tokens after {cache.pos}"
                               f"{'' if self.quantized else ' of a model with fp32 products'}")
        if cache.batch_size != 1:
            raise LmforgeError(f"NumpyDecoder.prefill fills a one-row cache, got {cache.batch_size} rows")
        if cache.pos + n > cache.max_len:
            raise LmforgeError(f"KV cache full: {cache.pos} cached + {n} new tokens exceed its max_len {cache.max_len}")
        # All threads, as torch's prefill; the governor times decode steps only.
        with kernel_threads(self.threads):
            pos = np.arange(cache.pos, cache.pos + n, dtype=np.int64)
            x = self._embed(np.asarray(ids, dtype=np.int64), pos)
            x = self._blocks(x, cache, pos, pos, None, np.zeros(n, np.int64), prefill=True)
            logits = self._linear(self._norm(x[-1:], self.norm_f), self.head, self.head_b, True)
        cache.pos += n
        return torch.from_numpy(np.ascontiguousarray(logits[0], dtype=np.float32))
