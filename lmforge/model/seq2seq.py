"""An encoder-decoder Transformer (Vaswani et al. 2017, pre-norm), on the decoder-only GPT's parts.

Read lmforge.model.gpt first: everything here is built from its pieces. The encoder is a stack
of its `Block`s that attend both ways over the source (the source padding mask is their only
mask). The decoder's blocks are `Block`s with one addition, cross-attention over the encoder
output between causal self-attention and the MLP. The norms, MLP, Linear, the attention math
(`Attention.attend`) and the KV cache are GPT's own; what is new is in this file:

    source ids -> embedding + positions -> norm_emb -> n_encoder_layer Blocks -> norm_f = memory
    target ids -> embedding + positions -> norm_emb -> n_layer DecoderBlocks -> norm_f -> lm_head
    DecoderBlock: x + attn(norm_1(x)) (causal), x + cross_attn(norm_cross(x), memory), x + mlp(norm_2(x))

The norm on the embeddings (`norm_emb`) and the final norms of both stacks make the layout
mBART's, so the mBART-style settings (the presets) export exactly to transformers'
MBartForConditionalGeneration (lmforge.interop.hf_seq2seq).

Batches: src_ids [B, S] with src_mask [B, S] bool (True = a real token, False = padding;
sources are right-padded: positions count from the first token, as in mBART); tgt_in [B, T]
(teacher forcing: the start token, then the target shifted right) and tgt_out [B, T], the
tokens to predict, with -100 where nothing is (padding): the loss skips them. The decoder is
causal, so right padding of the target never reaches a real position and needs no mask.
Padding costs attention only: the Linears, norms and MLPs of both stacks run on the real tokens
alone (`encode`, and `forward` with targets; lmforge.model.packing).

Generation: `memory = encode(src, mask)`, `cache = new_cache(memory, mask, max_len)`, then
`decode(next_ids, cache=cache)` per step: self-attention keys/values are appended to the cache,
cross-attention keys/values were computed once by `new_cache`; `cache.reorder(rows)` moves rows
for beam search (and, with more indices than rows, expands each source to its beams).

State-dict names:
    tok_emb.weight (target vocabulary; the source's too unless src_vocab_size), src_tok_emb.weight (a separate source vocabulary),
    encoder.pos_emb.weight (learned positions), encoder.norm_emb.*, encoder.blocks.{i}.{norm_1, attn.qkv, attn.proj,
        norm_2, mlp.fc, mlp.proj}.*, encoder.norm_f.*,
    decoder.pos_emb.weight, decoder.norm_emb.*, decoder.blocks.{i}.{norm_1, attn.qkv, attn.proj, norm_cross,
        cross_attn.q, cross_attn.kv, cross_attn.proj, norm_2, mlp.fc, mlp.proj}.*, decoder.norm_f.*,
    lm_head.weight (the same tensor as tok_emb.weight when tied)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.gpt import GPT, Attention, Block, KVCache, Linear, make_norm, rope_cache
from lmforge.model.packing import Packing, target_keep


class CrossAttention(Attention):
    """Decoder queries over the encoder output ("memory"): q from x through `q`, k and v from the
    memory through `kv` (fused [k | v]), projected once per source (`keys_values`) and kept in a
    Seq2SeqCache while decoding. The attention math and `proj` are Attention's; never causal."""

    def __init__(self, config: ModelConfig):
        q = Linear(config.n_embd, config.n_head * config.head_dim, bias=config.bias)
        kv = Linear(config.n_embd, 2 * config.n_kv_head * config.head_dim, bias=config.bias)
        super().__init__(config, q=q, kv=kv)

    def keys_values(self, memory: torch.Tensor, packing: Packing | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """memory [B, S, n_embd] (or [N, n_embd] packed by `packing`) -> k, v [B, n_kv_head, S, head_dim]."""
        kv = self.kv(memory)
        if packing is not None:
            kv = packing.pad(kv)
        B, S, _ = kv.shape
        kv = kv.view(B, S, 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        return kv[:, : self.n_kv_head], kv[:, self.n_kv_head :]

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, beams: int = 1,
                packing: Packing | None = None) -> torch.Tensor:
        """beams > 1: x holds B * beams rows (beam j of source b at row b * beams + j) and k, v,
        mask hold B, one per source: the beams of a source become its query positions, one
        attention call (never causal) serving them all, the same math row by row.
        packing: x is [N, C], the target's kept positions (training), and so is the output."""
        q = self.q(x)
        if packing is not None:
            q = packing.pad(q)
        R, T, _ = q.shape
        if beams == 1:
            return self.attend(q.view(R, T, self.n_head, self.head_dim).transpose(1, 2), k, v, mask, packing)
        B = R // beams
        q = q.view(B, beams * T, self.n_head, self.head_dim).transpose(1, 2)  # [B, heads, beams * T, hd]
        return self.attend(q, k, v, mask).view(R, T, -1)  # mask: the source padding mask, or False


class DecoderBlock(Block):
    """Block's pre-norm causal self-attention and MLP, with cross-attention between them."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.norm_cross = make_norm(config)
        self.cross_attn = CrossAttention(config)

    def forward(self, x, cross_k, cross_v, cross_mask, rope=None, mask=None, cache: KVCache | None = None,
                layer: int = 0, beams: int = 1, packing: Packing | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), rope, mask, cache, layer, packing)
        x = x + self.cross_attn(self.norm_cross(x), cross_k, cross_v, cross_mask, beams, packing)
        return x + self.mlp(self.norm_2(x))


class Seq2SeqCache:
    """The decoder's state while generating: its self-attention keys/values (a KVCache: each
    step's are appended), every layer's cross-attention keys/values over the source (computed
    once, by Seq2Seq.new_cache) and the source key mask.

    After `share_beams(k)` the self-attention rows are B * k (beam j of source b at row
    b * k + j) while the cross-attention keys/values and the mask stay one per source: the
    decoder's cross-attention then serves a source's beams as its query positions."""

    def __init__(self, self_attn: KVCache, cross: list[tuple[torch.Tensor, torch.Tensor]], src_mask):
        self.self_attn = self_attn
        self.cross = cross  # per decoder layer: (k, v), each [B, n_kv_head, S, head_dim]
        self.src_mask = src_mask  # [B, 1, 1, S] bool, or False (no padding)
        self.beams = 1  # self-attention rows per cross-attention row

    @property
    def pos(self) -> int:
        """How many target positions are cached (the next token's position)."""
        return self.self_attn.pos

    @property
    def batch_size(self) -> int:
        return self.self_attn.batch_size

    @property
    def max_len(self) -> int:
        return self.self_attn.max_len

    def reorder(self, beam_indices: torch.Tensor) -> None:
        """Make row i hold what row beam_indices[i] held, in every part of the cache: what beam
        search does after each step. More indices than rows make new rows (e.g. each source
        repeated for its beams: torch.arange(B).repeat_interleave(num_beams))."""
        idx = torch.as_tensor(beam_indices, dtype=torch.long, device=self.self_attn.k.device)
        if self.beams > 1:  # back to one cross-attention row per row, then as below
            per_row = torch.arange(self.self_attn.batch_size, device=idx.device) // self.beams
            self._take_cross(per_row)
            self.beams = 1
        self.self_attn.reorder(idx)  # checks the indices
        self._take_cross(idx)

    def share_beams(self, beams: int) -> None:
        """Expand each of the B rows to `beams` self-attention rows (row b -> rows b * beams ..
        b * beams + beams - 1) and keep one copy of the cross-attention keys/values per source.
        Beam search then moves only self-attention rows, within a source (`self_attn.reorder`)."""
        if beams == 1 or self.beams != 1:
            if self.beams != 1:
                raise LmforgeError("Seq2SeqCache.share_beams: the cache already shares its cross-attention rows")
            return
        rows = torch.arange(self.self_attn.batch_size, device=self.self_attn.k.device).repeat_interleave(beams)
        self.self_attn.reorder(rows)
        self.beams = beams

    def _take_cross(self, idx: torch.Tensor) -> None:
        self.cross = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.cross]
        if self.src_mask is not False:
            self.src_mask = self.src_mask.index_select(0, idx)


class Seq2Seq(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.is_encoder_decoder:
            raise LmforgeError(f"Seq2Seq needs arch 'encoder-decoder', got {config.arch!r} (a decoder is a GPT)")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.src_tok_emb = nn.Embedding(config.src_vocab_size, config.n_embd) if config.src_vocab_size else None
        self.encoder = self._stack(config, [Block(config) for _ in range(config.n_encoder_layer)])
        self.decoder = self._stack(config, [DecoderBlock(config) for _ in range(config.n_layer)])
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.activation_checkpointing = False  # recompute each block's activations in backward (set by a trainer)
        if config.position == "rope":
            cos, sin = rope_cache(config, device=self.tok_emb.weight.device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin_signed", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init per stack: encoder blocks add two residual branches, decoder blocks three.
        residual_projections = [(p, 2 * config.n_encoder_layer) for b in self.encoder.blocks for p in (b.attn.proj, b.mlp.proj)]
        residual_projections += [(p, 3 * config.n_layer) for b in self.decoder.blocks
                                 for p in (b.attn.proj, b.cross_attn.proj, b.mlp.proj)]
        for proj, branches in residual_projections:
            nn.init.normal_(proj.weight, mean=0.0, std=config.init_std / math.sqrt(branches))

    @staticmethod
    def _stack(config: ModelConfig, blocks: list[nn.Module]) -> nn.ModuleDict:
        parts = {"pos_emb": nn.Embedding(config.block_size, config.n_embd)} if config.position == "learned" else {}
        return nn.ModuleDict({**parts, "norm_emb": make_norm(config), "blocks": nn.ModuleList(blocks),
                              "norm_f": make_norm(config)})

    _init_weights = GPT._init_weights  # normal(init_std) for Linear and Embedding weights, zero biases
    configure_optimizer_groups = GPT.configure_optimizer_groups  # decay on linear weights only, as GPT
    reset_rope = GPT.reset_rope  # recompute the RoPE tables, e.g. after `to_empty`

    def tie_weights(self) -> None:
        """Make lm_head share tok_emb's matrix (again after `to_empty` or loading with assign)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    # -- embeddings and masks ---------------------------------------------------------------
    def _embed(self, stack: nn.ModuleDict, table: nn.Embedding, ids: torch.Tensor, start: int):
        """Token embeddings + positions [start, start + T), normalised: (x, rope tables or None)."""
        T = ids.shape[1]
        if start + T > self.config.block_size:
            raise LmforgeError(f"sequence of {start + T} positions exceeds the model's block_size {self.config.block_size}")
        x = table(ids)
        rope = None
        if self.config.position == "learned":
            x = x + stack.pos_emb.weight[start : start + T]
        else:
            rope = (self.rope_cos[start : start + T].unsqueeze(1), self.rope_sin_signed[start : start + T].unsqueeze(1))
        x = stack.norm_emb(x)
        if self.config.dropout and self.training:
            x = F.dropout(x, self.config.dropout, True)
        return x, rope

    @staticmethod
    def source_mask(src_mask: torch.Tensor | None, src_ids: torch.Tensor):
        """src_mask [B, S] bool (True = real token) -> the key mask attention takes: [B, 1, 1, S],
        or False for no mask (None: no padding)."""
        if src_mask is None:
            return False
        if src_mask.dtype != torch.bool:
            raise LmforgeError(f"src_mask must be a bool tensor (True = real token), got {src_mask.dtype}")
        if src_mask.shape != src_ids.shape[:2]:
            raise LmforgeError(f"src_mask has shape {list(src_mask.shape)}, the source {list(src_ids.shape[:2])}")
        # A source of nothing but padding would leave its queries no key (NaN from softmax); its
        # row sees every key instead: finite garbage, as any output for padding is.
        src_mask = src_mask | ~src_mask.any(1, keepdim=True)
        return src_mask[:, None, None, :]

    # -- encoder, decoder, forward ----------------------------------------------------------
    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids [B, S] -> the encoder output ("memory") [B, S, n_embd]; src_mask [B, S]
        bool, True = real token (None: no padding). The stack runs on the real tokens alone
        (`encode_tokens`); the rows at padding positions come back as zeros."""
        packing = self.source_packing(src_mask)
        memory = self.encode_tokens(src_ids, src_mask, packing)
        return memory if packing is None else packing.pad(memory)

    def encode_tokens(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None,
                      packing: Packing | None) -> torch.Tensor:
        """The encoder stack in a chosen layout: packing None runs every position and returns
        [B, S, n_embd] (padding's rows are garbage); a Packing (`source_packing`) runs its kept
        tokens and returns them, [N, n_embd]."""
        x, rope = self._embed(self.encoder, self.tok_emb if self.src_tok_emb is None else self.src_tok_emb, src_ids, 0)
        mask = self.source_mask(src_mask, src_ids)
        if packing is not None:
            x = packing.pack(x)
        for block in self.encoder.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, mask, None, 0, packing, use_reentrant=False)
            else:
                x = block(x, rope, mask, packing=packing)  # a Block given a padding mask attends both ways
        return self.encoder.norm_f(x)

    def source_packing(self, src_mask: torch.Tensor | None) -> Packing | None:
        """The packing that leaves out a batch's source padding (None: none to leave out). A
        source of nothing but padding keeps its positions, as `source_mask` lets it see them."""
        if src_mask is None or src_mask.dtype != torch.bool:
            return None  # no padding, or a mask `source_mask` will refuse
        return Packing.of(src_mask | ~src_mask.any(1, keepdim=True))

    def decode(self, tgt_ids: torch.Tensor, memory: torch.Tensor | None = None, src_mask: torch.Tensor | None = None,
               *, cache: Seq2SeqCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Target ids [B, T] -> logits [B, T, vocab].

        Without a cache: teacher forcing over positions 0..T-1, attending over `memory` (from
        `encode`) with its `src_mask`. With a cache (`new_cache`): the ids continue the cached
        ones (positions cache.pos..), memory and mask are the cache's; their keys/values are
        appended. logits_to_keep > 0: logits for the last N positions only.
        """
        return self.lm_head(self.decode_states(tgt_ids, memory, src_mask, cache=cache, logits_to_keep=logits_to_keep))

    def decode_states(self, tgt_ids: torch.Tensor, memory: torch.Tensor | None = None,
                      src_mask: torch.Tensor | None = None, *, cache: Seq2SeqCache | None = None,
                      logits_to_keep: int = 0, memory_packing: Packing | None = None,
                      packing: Packing | None = None) -> torch.Tensor:
        """`decode` before the head: the decoder's final-norm states [B, T, n_embd].
        Teacher forcing only: memory_packing says `memory` is packed (`encode_tokens`);
        packing runs the target's kept positions alone and returns their states, [N, n_embd]."""
        T = tgt_ids.shape[1]
        start = 0 if cache is None else cache.pos
        if cache is not None and start + T > cache.max_len:
            raise LmforgeError(f"KV cache full: {start} cached + {T} new tokens exceed its max_len {cache.max_len}")
        if cache is None:
            if memory is None:
                raise LmforgeError("decode: give the encoder output (memory) or a cache made from it")
            cross = [block.cross_attn.keys_values(memory, memory_packing) for block in self.decoder.blocks]
            cross_mask = self.source_mask(src_mask, memory if memory_packing is None else src_mask)
        else:
            if memory_packing is not None or packing is not None:
                raise LmforgeError("decode: packed layouts are for teacher forcing, not for decoding with a cache")
            cross, cross_mask = cache.cross, cache.src_mask
        beams = 1 if cache is None else cache.beams
        x, rope = self._embed(self.decoder, self.tok_emb, tgt_ids, start)
        if packing is not None:
            x = packing.pack(x)
        mask = GPT._attention_mask(None, T, start, tgt_ids.device)  # causal (over the cache, too)
        self_cache = None if cache is None else cache.self_attn
        for i, block in enumerate(self.decoder.blocks):
            k, v = cross[i]
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, k, v, cross_mask, rope, mask, None, 0, 1, packing, use_reentrant=False)
            else:
                x = block(x, k, v, cross_mask, rope, mask, self_cache, i, beams, packing)
        if cache is not None:
            cache.self_attn.pos = start + T
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return self.decoder.norm_f(x)

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor, src_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: (logits [B, T, vocab], loss or None) for sources src_ids [B, S]
        (src_mask [B, S] bool, True = real token) and decoder inputs tgt_ids [B, T].

        targets [B, T] int64, -100 = ignore (padding): loss is the mean cross-entropy in fp32
        over the other positions, with `label_smoothing` as torch's cross_entropy takes it. When
        some are -100 the head runs on the other positions alone and logits is None (as GPT's
        chunked loss): padding's logits are never needed, and the vocabulary-wide matmuls,
        forward and backward, are the costliest of a step (the same loss and gradients).
        Padding is skipped before the head too: with targets, every token-wise layer of both
        stacks runs on the real tokens alone (lmforge.model.packing; the same loss to rounding).
        """
        src_packing = self.source_packing(src_mask)
        memory = self.encode_tokens(src_ids, src_mask, src_packing)
        if targets is None:
            h = self.decode_states(tgt_ids, memory, src_mask, memory_packing=src_packing)
            return self.lm_head(h), None
        if targets.shape != tgt_ids.shape:
            raise LmforgeError(f"targets have shape {list(targets.shape)}, the decoder inputs {list(tgt_ids.shape)}")
        tgt_packing = Packing.of(target_keep(targets))
        h = self.decode_states(tgt_ids, memory, src_mask, memory_packing=src_packing, packing=tgt_packing)
        if tgt_packing is not None:
            targets = tgt_packing.pack(targets)  # [N], as h is [N, C]; a -100 inside a row stays
        keep = targets != -100
        every = bool(keep.all())
        if every and tgt_packing is None:  # nothing skipped: the full logits are the caller's
            logits = self.lm_head(h)
            return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                           label_smoothing=label_smoothing)
        kept = self.lm_head(h if every else h[keep])
        return None, F.cross_entropy(kept.float(), targets if every else targets[keep], label_smoothing=label_smoothing)

    # -- generation ---------------------------------------------------------------------------
    def new_cache(self, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
                  max_len: int | None = None) -> Seq2SeqCache:
        """A cache for decoding against `memory` (from `encode`): every decoder layer's
        cross-attention keys/values computed now, room for max_len target positions (default
        block_size) of self-attention keys/values."""
        self_attn = KVCache(self.config, memory.shape[0], max_len, device=memory.device, dtype=memory.dtype)
        cross = [block.cross_attn.keys_values(memory) for block in self.decoder.blocks]
        return Seq2SeqCache(self_attn, cross, self.source_mask(src_mask, memory))

    @torch.no_grad()
    def greedy_decode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None, *, start_id: int,
                      max_new_tokens: int, eos_id: int | None = None) -> torch.Tensor:
        """Greedy decoding with the cache: [B, 1 + n] target ids, start_id first, n <= max_new_tokens
        (it stops once every row has produced eos_id; a row that has is continued with eos_id)."""
        B = src_ids.shape[0]
        cache = self.new_cache(self.encode(src_ids, src_mask), src_mask, max_len=max(1, max_new_tokens))
        out = torch.full((B, 1), start_id, dtype=torch.long, device=src_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=src_ids.device)
        for _ in range(max_new_tokens):
            nxt = self.decode(out[:, -1:], cache=cache)[:, -1].argmax(-1)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done |= nxt == eos_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        return out

    # -- accounting ---------------------------------------------------------------------------
    def param_count(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor once. non_embedding=True leaves out the vocabulary and
        position tables (token embeddings, position embeddings, an untied lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            tables = [self.tok_emb, self.src_tok_emb, self.encoder["pos_emb"] if "pos_emb" in self.encoder else None,
                      self.decoder["pos_emb"] if "pos_emb" in self.decoder else None]
            n -= sum(t.weight.numel() for t in tables if t is not None)
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per target token, for sources as long as the
        targets (seq_len each): 6N + 12*H*Q*T*(encoder self + decoder self + cross layers), N the
        parameters in matmuls (the lm_head once, no embedding lookups), as GPT.flops_per_token."""
        c = self.config
        n = self.param_count(non_embedding=True) + c.vocab_size * c.n_embd
        attention_layers = c.n_encoder_layer + 2 * c.n_layer
        return 6 * n + 12 * attention_layers * c.n_head * c.head_dim * seq_len
