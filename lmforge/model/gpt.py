"""A decoder-only Transformer, GPT-2 and Llama in one file, readable top to bottom.

The order follows the data: token (+ learned position) embedding -> n_layer pre-norm blocks
(attention, then MLP, each added to the residual stream) -> final norm -> lm_head. The config
switches pick LayerNorm or RMSNorm, GELU or SwiGLU, learned positions or RoPE; weights are laid
out so that Hugging Face GPT-2 and Llama checkpoints map onto them by renaming, concatenating
and (for GPT-2's Conv1D) transposing, never by permuting (see lmforge.interop.hf).

State-dict names:
    tok_emb.weight, pos_emb.weight (learned positions only),
    blocks.{i}.norm_1.*, blocks.{i}.attn.qkv.*, blocks.{i}.attn.proj.*,
    blocks.{i}.norm_2.*, blocks.{i}.mlp.fc.*, blocks.{i}.mlp.proj.*,
    norm_f.*, lm_head.weight (the same tensor as tok_emb.weight when tied)
"""

from __future__ import annotations

import math
import mmap
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.errors import LmforgeError
from lmforge.model import cpu_matmul
from lmforge.model.attention import short_causal_attention, uses_short_kernel
from lmforge.model.config import ModelConfig
from lmforge.model.fused import linear_cross_entropy_applies, linear_cross_entropy_sum, rms_norm, swiglu
from lmforge.model.packing import Packing, target_keep


def _sdpa_supports_gqa() -> bool:
    # `enable_gqa` arrived in torch 2.5; it lets SDPA read the shared kv heads directly instead
    # of materialising n_head/n_kv_head copies of K and V every step.
    try:
        t = torch.zeros(1, 2, 1, 2)
        F.scaled_dot_product_attention(t, t[:, :1], t[:, :1], enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


SDPA_GQA = _sdpa_supports_gqa()


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back, exactly as HF Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            return rms_norm(x, self.weight, self.eps)  # one kernel; in training, keeps only x for backward
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_cache(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables [block_size, head_dim] in fp32, in HF's "rotate_half" layout.

    Frequency i rotates the pair (dimension i, dimension i + head_dim/2), not the interleaved
    pairs (2i, 2i+1) of the RoPE paper: that is how HF stores Llama's q/k weights, so they load
    without a permutation. HF computes x*cos + rotate_half(x)*sin with
    rotate_half(x) = cat(-x2, x1); we fold the minus sign into the table (sin_signed =
    cat(-sin, sin)) so that rotate_half becomes a plain roll, one op instead of three. The
    products are bit-identical: (-a)*b == a*(-b).
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    t = torch.arange(config.block_size, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    cos = torch.cat((freqs, freqs), dim=-1).cos()
    sin = freqs.sin()
    return cos, torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, head_dim]; the tables broadcastable to it ([T, 1, hd] or [B, T, 1, hd])."""
    if cos.dtype != x.dtype:  # under autocast x is bf16 while the tables are fp32
        cos, sin_signed = cos.to(x.dtype), sin_signed.to(x.dtype)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class Linear(nn.Linear):
    """nn.Linear whose inference matmuls can go through numpy's BLAS instead of torch's.

    On some CPUs (AMD with PyTorch's MKL) numpy's OpenBLAS streams the weights of a
    matrix-vector product up to ~1.8x faster, and decoding one token is little else. The
    generation Engine measures both on the machine at hand and switches `numpy_blas` on only
    where it wins; training (autograd) always takes the torch path.
    """

    numpy_blas = False
    # fp32 CPU products otherwise go to the library lmforge.model.cpu_matmul picks for this CPU.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        # Tall-skinny products (2..63 rows: batched decoding) are slow in OpenBLAS; torch keeps them.
        if self.numpy_blas and (rows == 1 or rows >= 64) and not torch.is_grad_enabled():
            w = self.weight.detach().numpy()  # a view: no copy, always the current weights
            flat = x.reshape(rows, x.shape[-1]).detach().numpy()
            out = torch.from_numpy(w @ flat[0] if rows == 1 else flat @ w.T)
            out = out.reshape(*x.shape[:-1], w.shape[0])
            return out if self.bias is None else out + self.bias
        if cpu_matmul.applies(x, self.weight):
            return cpu_matmul.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def zeros_on_demand(shape: tuple[int, ...], device, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose memory, on CPU, becomes resident only where it is written: a fresh
    anonymous mapping (the kernel's zero pages, 4 KB at a time), not torch.zeros' memset of the
    whole cache. A server sized for 32 slots of 2048 tokens holds 2.9 GB of cache for
    SmolLM2-135M, and its RSS then grows with the tokens actually held instead."""
    if torch.device(device or "cpu").type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < 1 << 20:
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, nbytes)  # the tensor keeps the mapping alive through the buffer
    return torch.frombuffer(memory, dtype=torch.uint8).view(dtype).view(shape)


class KVCache:
    """Keys and values of every layer for incremental decoding, allocated once.

    k, v: [n_layer, B, n_kv_head, max_len, head_dim]; positions [0, pos) hold valid entries.
    Attention writes a chunk's keys/values at [pos, pos + T) with `update`; the model advances
    `pos` once after all layers. Nothing is allocated per step: decoding writes into and reads
    views of these two tensors.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        max_len = config.block_size if max_len is None else max_len
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = zeros_on_demand(shape, device, dtype)
        self.v = zeros_on_demand(shape, device, dtype)
        self._k_layers = self.k.unbind(0)  # per-layer views, made once instead of per call
        self._v_layers = self.v.unbind(0)
        self.pos = 0

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows [start, stop) of this one, sharing its memory, with its own pos
        (from 0): a forward on it fills those rows only, e.g. one newcomer's prefill into its slot
        of a serving batch whose other rows are mid-decode."""
        if not 0 <= start < stop <= self.batch_size:
            raise LmforgeError(f"KVCache.rows({start}, {stop}): the cache has {self.batch_size} rows")
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view._k_layers, view._v_layers = view.k.unbind(0), view.v.unbind(0)
        view.pos = 0
        return view

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv_head, T, hd] at [pos, pos+T); return the keys/values [0, pos+T)."""
        end = self.pos + k.shape[2]
        kl, vl = self._k_layers[layer], self._v_layers[layer]
        kl.narrow(2, self.pos, end - self.pos).copy_(k)
        vl.narrow(2, self.pos, end - self.pos).copy_(v)
        return kl.narrow(2, 0, end), vl.narrow(2, 0, end)

    def reset(self) -> None:
        self.pos = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Row r takes what row index[r] held (beam search: each beam continues a parent). With
        as many indices as rows, in place: only the filled positions [0, pos) move, one layer at
        a time, and the tensors (and views of them) stay the same. With another count (a source
        expanded to its beams), new tensors of that many rows."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.k.device)
        if index.dim() != 1 or (index.numel() and not 0 <= int(index.min()) <= int(index.max()) < self.batch_size):
            raise LmforgeError(f"KVCache.reorder: expected a 1-D tensor of row indices below {self.batch_size}")
        if index.numel() != self.batch_size:
            self.k, self.v = self.k.index_select(1, index), self.v.index_select(1, index)
            self._k_layers, self._v_layers = self.k.unbind(0), self.v.unbind(0)
            return
        if self.pos == 0:
            return
        for layers in (self._k_layers, self._v_layers):
            for layer in layers:
                filled = layer.narrow(2, 0, self.pos)
                filled.copy_(filled.index_select(0, index))

    def follow(self, parents: torch.Tensor) -> None:
        """reorder(parents) for as many indices as rows, moving only the rows whose parent is
        another row (in beam search most beams continue themselves): the parents' filled
        positions are gathered, then written over the moved rows, for all layers at once."""
        rows = torch.arange(parents.numel(), device=parents.device)
        if parents.numel() != self.batch_size:
            raise LmforgeError(f"KVCache.follow: expected {self.batch_size} row indices, got {parents.numel()}")
        moved = (parents != rows).nonzero().squeeze(1)
        if moved.numel() == 0 or self.pos == 0:
            return
        source = parents.index_select(0, moved)
        if not 0 <= int(source.min()) <= int(source.max()) < self.batch_size:
            raise LmforgeError(f"KVCache.follow: expected row indices below {self.batch_size}")
        for t in (self.k, self.v):
            filled = t.narrow(3, 0, self.pos)
            filled.index_copy_(1, moved, filled.index_select(1, source))



class Attention(nn.Module):
    """What every attention layer shares: the head layout, the output projection `proj`, and
    `attend`, the attention math itself. A subclass adds the input projections (passed in, so
    they are registered, and saved, before `proj`) and says where q, k and v come from:
    CausalSelfAttention below, the encoder-decoder's CrossAttention (lmforge.model.seq2seq)."""

    def __init__(self, config: ModelConfig, **input_projections: nn.Module):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        for name, module in input_projections.items():
            setattr(self, name, module)
        self.proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        gqa = config.n_kv_head != config.n_head
        # Without SDPA's enable_gqa (torch < 2.5), repeat each kv head for its group of queries.
        self.kv_repeat = config.n_head // config.n_kv_head if gqa and not SDPA_GQA else 1
        self.sdpa_kwargs = {"enable_gqa": True} if gqa and SDPA_GQA else {}

    # A callable given each call's attention probabilities [B, n_head, T, S] (lmforge.inspect
    # sets it): the call then computes them explicitly and takes its output from them, so what
    # is recorded is exactly what the layer used. None: the fused kernels below.
    record_probs = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, packing: Packing | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim), masked) v with the heads merged, through `proj`.

        q [B, n_head, T, hd]; k, v [B, n_kv_head, S, hd]. mask None: causal attention, T == S
        (the fast path); mask False: every key is visible (decoding one token against a cache,
        an encoder without padding, cross-attention); else a bool mask broadcastable to
        [B, n_head, T, S], True = may attend. packing: the queries' kept positions; the output
        is then [N, C], packed before `proj` (lmforge.model.packing).
        """
        B, _, T, _ = q.shape
        dropout = self.dropout if self.training else 0.0
        is_causal = mask is None
        if mask is False:
            mask = None
        if self.record_probs is not None:
            y = self._attend_recorded(q, k, v, mask, is_causal, dropout)
        elif is_causal and uses_short_kernel(q, dropout):
            y = short_causal_attention(q, k, v)
        else:
            if self.kv_repeat > 1:
                k, v = k.repeat_interleave(self.kv_repeat, dim=1), v.repeat_interleave(self.kv_repeat, dim=1)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, **self.sdpa_kwargs
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        if packing is not None:
            y = packing.pack(y)
        y = self.proj(y)
        return F.dropout(y, dropout, True) if dropout else y

    def _attend_recorded(self, q, k, v, mask, is_causal: bool, dropout: float) -> torch.Tensor:
        """`attend`'s math written out, handing the probabilities to `record_probs`: query head h
        reads kv head h // (n_head / n_kv_head), as SDPA's enable_gqa and the short kernel do."""
        group = q.shape[1] // k.shape[1]
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.shape[-1]))
        if is_causal:
            T, S = q.shape[2], k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        self.record_probs(probs)
        if dropout:
            probs = F.dropout(probs, dropout, True)
        return torch.matmul(probs, v)


class CausalSelfAttention(Attention):
    """Self-attention with one fused q|k|v projection; causal unless `mask` says otherwise (an
    encoder passes its source padding mask, or False: bidirectional attention)."""

    def __init__(self, config: ModelConfig):
        # One fused projection for q, k and v: [q (n_head*hd) | k (n_kv*hd) | v (n_kv*hd)].
        qkv = Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.bias)
        super().__init__(config, qkv=qkv)

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int, packing: Packing | None = None) -> torch.Tensor:
        """x [B, T, C], or [N, C] packed by `packing` (then the output is packed too)."""
        H, Hkv = self.n_head, self.n_kv_head
        qkv = self.qkv(x)
        if packing is not None:  # the projection ran on the real tokens alone; attention needs the grid
            qkv = packing.pad(qkv)
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, H + 2 * Hkv, self.head_dim)
        qk, v = qkv.split((H + Hkv, Hkv), dim=2)
        if rope is not None:  # rotate q and k together: one set of ops instead of two
            qk = apply_rope(qk, *rope)
        q, k = qk.split((H, Hkv), dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return self.attend(q, k, v, mask, packing)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        # GPT-2's "gelu_new" is the tanh approximation; the exact erf form is also ~1.5x cheaper on CPUs.
        self.gelu_approximate = "tanh" if config.mlp == "gelu" else "none"
        # SwiGLU fuses gate and up into one matmul: fc = [gate (I) | up (I)].
        width = 2 * config.intermediate_size if self.swiglu else config.intermediate_size
        self.fc = Linear(config.n_embd, width, bias=config.bias)
        self.proj = Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.swiglu:
            h = swiglu(h)  # silu(gate) * up; in training, keeps only h for backward
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        h = self.proj(h)
        dropout = self.dropout if self.training else 0.0
        return F.dropout(h, dropout, True) if dropout else h


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, mask=None, cache: KVCache | None = None, layer: int = 0,
                packing: Packing | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), rope, mask, cache, layer, packing)
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.is_encoder_decoder:
            raise LmforgeError(f"model {config.name!r} is an encoder-decoder: it builds a Seq2Seq "
                               "(lmforge.model.seq2seq), not the decoder-only GPT")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        # Recompute activations in backward instead of storing them (set by the trainer).
        self.activation_checkpointing = False
        # > 0: compute the loss over this many tokens at a time, recomputing each chunk's logits
        # in backward, so the [tokens, vocab] logits never exist whole (forward returns logits None).
        self.loss_chunk = 0
        if config.position == "rope":
            # Non-persistent: derived from the config, so never saved and never stale.
            cos, sin = rope_cache(config, device=self.tok_emb.weight.device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin_signed", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual output projections by 1/sqrt(2*n_layer) so the residual
        # stream's variance does not grow with depth (two residual additions per block).
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """Make lm_head share tok_emb's matrix (again: moving a model off `meta` unties it)."""
        if not self.config.tie_embeddings:
            return
        packed = getattr(self.tok_emb, "packed", None)
        if packed is not None:  # a quantized table (lmforge.quant.modules): the head reads the same blocks
            from lmforge.quant.modules import QuantLinear

            if getattr(self.lm_head, "packed", None) is not packed:
                self.lm_head = QuantLinear(packed)
        else:
            self.lm_head.weight = self.tok_emb.weight

    @property
    def device(self) -> torch.device:
        return self.norm_f.weight.device  # every model has a final norm; quantized tables are not tensors

    def reset_rope(self) -> None:
        """Recompute the RoPE tables, e.g. after `to_empty` left them uninitialised."""
        if self.config.position == "rope":
            cos, sin = rope_cache(self.config, device=self.rope_cos.device)
            self.rope_cos = cos.to(self.rope_cos.dtype)
            self.rope_sin_signed = sin.to(self.rope_sin_signed.dtype)

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx [B, T] token ids -> (logits [B, T, vocab], loss or None).

        targets: [B, T] int64, -100 = ignore; loss is the mean cross-entropy (in fp32) over the
            other positions. In training mode the positions after a row's last target (right
            padding) are skipped by every layer, and their logits come back as zeros.
        positions: [B, T] int64 position of each token (left-padded batches); default
            start..start+T-1, where start is cache.pos (0 without a cache). Not range-checked:
            they must be < block_size.
        attn_mask: bool, True = may attend, [B, S] (key padding) or broadcastable to
            [B, 1, T, S], where S = cache.pos + T with a cache, else T. It is combined with the
            causal mask; without it the fused is_causal path runs.
        cache: a KVCache; the chunk's keys/values are appended and cache.pos advances by T.
            Prefill any number of tokens, then decode one (or more) at a time.
        logits_to_keep: if > 0 and no targets, compute logits only for the last N positions
            (generation needs just the last one; the full [B, T, vocab] head is the costliest
            matmul of a long prefill).
        """
        T = idx.shape[1]
        start = cache.pos if cache is not None else 0
        S = start + T
        if cache is not None and S > cache.max_len:
            raise LmforgeError(f"KV cache full: {start} cached + {T} new tokens exceed its max_len {cache.max_len}")
        if positions is None and S > self.config.block_size:
            raise LmforgeError(f"sequence of {S} positions exceeds the model's block_size {self.config.block_size}")

        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + (self.pos_emb.weight[start:S] if positions is None else self.pos_emb(positions))
        else:
            if positions is None:  # a slice of the tables: no gather, no allocation
                rope = (self.rope_cos[start:S].unsqueeze(1), self.rope_sin_signed[start:S].unsqueeze(1))
            else:
                rope = (self.rope_cos[positions].unsqueeze(2), self.rope_sin_signed[positions].unsqueeze(2))
        if self.config.dropout and self.training:
            x = F.dropout(x, self.config.dropout, True)

        mask = self._attention_mask(attn_mask, T, start, idx.device)
        # Training on padded rows (fine-tuning batches): the token-wise layers run on the
        # positions up to each row's last target alone (lmforge.model.packing; the same loss).
        packing = None
        if self.training and targets is not None and cache is None:
            packing = Packing.of(target_keep(targets))
        if packing is not None:
            x = packing.pack(x)
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, mask, None, i, packing, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, i, packing)
        if cache is not None:
            cache.pos = S

        if targets is None and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        h = self.norm_f(x)
        if packing is not None:  # one row of the kept tokens
            h, targets = h.unsqueeze(0), packing.pack(targets).unsqueeze(0)
        if targets is not None and self.loss_chunk and h.shape[0] * h.shape[1] > self.loss_chunk:
            return None, self._chunked_loss(h, targets)
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        if packing is not None:  # [B, T, vocab] as always; zeros at the skipped positions, which have no target
            logits = packing.pad(logits[0])
        return logits, loss

    def _chunk_loss_sum(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")

    def _chunked_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        keep = flat_t != -100
        count = keep.sum()
        if int(count) < flat_t.shape[0]:
            # Fine-tuning takes the loss on the replies only (often a quarter of a chat's tokens;
            # none of the padding): the head's [tokens, vocab] matmuls, forward and backward, run
            # on those rows alone. The same loss and gradients; pretraining keeps every row.
            flat_h, flat_t = flat_h[keep], flat_t[keep]
        if flat_h.shape[0] <= self.loss_chunk:  # one chunk: nothing to gain from recomputing it
            return self._chunk_loss_sum(flat_h, flat_t) / count.clamp(min=1)
        weight = self.lm_head.weight
        if linear_cross_entropy_applies(flat_h, weight):
            # Each chunk's gradient in the same pass: no recomputation (lmforge.model.fused).
            return linear_cross_entropy_sum(flat_h, weight, flat_t, self.loss_chunk) / count.clamp(min=1)
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, flat_h.shape[0], self.loss_chunk):
            total = total + checkpoint(self._chunk_loss_sum, flat_h[i : i + self.loss_chunk],
                                       flat_t[i : i + self.loss_chunk], use_reentrant=False)
        return total / count.clamp(min=1)

    @staticmethod
    def _attention_mask(attn_mask, T: int, start: int, device) -> torch.Tensor | bool | None:
        """None -> SDPA's is_causal; False -> no mask at all; else a bool [B|1, 1, T, S] mask."""
        S = start + T
        if attn_mask is None:
            if start == 0:
                return None  # square causal: the fused path
            if T == 1:
                return False  # one new token sees the whole cache
            # A chunk after a cached prefix: query i sits at position start+i. (SDPA's
            # is_causal aligns a non-square mask top-left, which would be wrong here.)
            return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start)
        if attn_mask.dtype != torch.bool:
            raise LmforgeError(f"attn_mask must be a bool tensor (True = attend), got {attn_mask.dtype}")
        if attn_mask.dim() == 2:
            attn_mask = attn_mask[:, None, None, :]
        if attn_mask.shape[-1] != S:
            raise LmforgeError(f"attn_mask covers {attn_mask.shape[-1]} keys, expected {S} (cached + new tokens)")
        q_pos = torch.arange(start, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        # Each query always sees its own key: a padding row would otherwise have no key at all,
        # SDPA would return NaN for it, and 0 * NaN in the next layer would spread the NaN to
        # real tokens. The padding rows' outputs are garbage either way and never attended to.
        return (attn_mask & (k_pos <= q_pos)) | (k_pos == q_pos)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A KVCache on this model's device and dtype (max_len defaults to block_size)."""
        w = self.norm_f.weight
        return KVCache(self.config, batch_size, max_len, device=w.device, dtype=w.dtype)

    # -- accounting --------------------------------------------------------------------------
    def param_count(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor once. non_embedding=True leaves out the vocabulary and
        position tables (token embedding, position embedding, lm_head), Kaplan et al.'s N."""
        n = sum(p.numel() for p in self.parameters())
        seen: set[int] = set()
        for m in self.modules():  # quantized weights are not parameters: count each table once
            packed = getattr(m, "packed", None)
            if packed is not None and id(packed) not in seen:
                seen.add(id(packed))
                n += packed.shape[0] * packed.shape[1]
        if non_embedding:
            c = self.config
            n -= c.vocab_size * c.n_embd
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not c.tie_embeddings:
                n -= c.vocab_size * c.n_embd
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at context seq_len: 6N + 12*L*H*Q*T.

        N counts the parameters that take part in matmuls: everything but the embedding lookups,
        plus the lm_head matrix once (tied or not). 12*L*H*Q*T is attention's QK^T and AV
        (the nanoGPT / PaLM appendix B estimate; no discount for the causal half).
        """
        c = self.config
        n = self.param_count(non_embedding=True) + c.vocab_size * c.n_embd
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Two param groups: weight decay on the 2-D weights of linear layers; none on norms,
        biases and embeddings (a tied lm_head is the embedding, so it gets none either)."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay_ids = {
            id(m.weight) for m in self.modules() if isinstance(m, nn.Linear) and id(m.weight) not in embeddings
        }
        decay, no_decay = [], []
        for p in self.parameters():  # deduplicated: a tied matrix appears once
            if p.requires_grad:
                (decay if id(p) in decay_ids else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Turns nn.init's in-place initialisers (and the Tensor methods they call without a
    torch-function check: fill_, zero_, uniform_, normal_) into no-ops. A torch-function mode is
    per thread, so a model built in another thread meanwhile is initialised as usual; patching
    torch.nn.init's functions, as transformers' `no_init_weights` does, would skip its init too."""

    SKIPPED = frozenset({*(getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")),
                         torch.Tensor.fill_, torch.Tensor.zero_, torch.Tensor.uniform_, torch.Tensor.normal_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@contextmanager
def skip_init() -> Iterator[None]:
    """Build modules without their random init, for weights about to be overwritten.

    Not the `meta` device: the first op on a meta tensor in a process imports torch._dynamo
    (~2 s), longer than loading a 135M-parameter model; uninitialised memory costs nothing until
    it is written. Scoped to this thread (see `_SkipInit`); nothing global changes.
    """
    with _SkipInit():
        yield


def build_empty(config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                cls: type[nn.Module] = GPT) -> GPT:
    """A `cls` (GPT, or the Seq2Seq an encoder-decoder config builds) with uninitialised weights
    (about to be overwritten by a checkpoint): no time goes into a random init that would be
    thrown away (see `skip_init`)."""
    with skip_init(), torch.device(device):
        model = cls(config)
    if dtype != torch.float32:
        model = model.to(dtype)  # the RoPE tables too, as a checkpoint of this dtype expects
    model.tie_weights()
    return model
