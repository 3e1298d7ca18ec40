"""One real forward of the model, with what happens inside it kept: the attention probabilities
of every attention layer and the residual stream between blocks.

Attention: each layer's `record_probs` (lmforge.model.gpt.Attention) is set for the forward, so
the layer computes softmax(q k^T / sqrt(head_dim), masked) from its own q and k (RoPE applied,
grouped-query heads reading their shared kv head) and takes its output from those probabilities:
the maps are the weights the model used, not a re-derivation beside it.

Residual stream: forward hooks on the blocks: the input of the first block (the embeddings, with
positions; an encoder-decoder's normalised ones) and the output of each block.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from lmforge.inspect.inputs import Inputs

# The attention stacks of a model, as the maps name them.
DECODER_ONLY_KINDS = ("self",)
ENCODER_DECODER_KINDS = ("encoder", "decoder", "cross")
KIND_TITLES = {"self": "self-attention", "encoder": "encoder self-attention",
               "decoder": "decoder self-attention", "cross": "cross-attention (decoder → source)"}


def attention_layers(model) -> dict[str, list]:
    """{kind: [attention module of layer 0, 1, ...]}: `self` for a decoder-only GPT; `encoder`,
    `decoder` and `cross` for an encoder-decoder."""
    if model.config.is_encoder_decoder:
        return {"encoder": [b.attn for b in model.encoder.blocks], "decoder": [b.attn for b in model.decoder.blocks],
                "cross": [b.cross_attn for b in model.decoder.blocks]}
    return {"self": [b.attn for b in model.blocks]}


@contextmanager
def record_attention(model, keep: dict[str, list[int]] | None = None) -> Iterator[dict[str, list[list[torch.Tensor]]]]:
    """While active, every attention call appends its probabilities (fp32, on the CPU, [B,
    n_head, T, S]) to maps[kind][layer]; the layers are reset afterwards, whatever happens.
    keep: only these layers of each kind record (the others run their usual kernels and their
    lists stay empty); None: all."""
    layers = attention_layers(model)
    maps: dict[str, list[list[torch.Tensor]]] = {kind: [[] for _ in mods] for kind, mods in layers.items()}
    for kind, mods in layers.items():
        for i, module in enumerate(mods):
            if keep is None or i in keep.get(kind, ()):
                module.record_probs = _appender(maps[kind][i])
    try:
        yield maps
    finally:
        for mods in layers.values():
            for module in mods:
                module.__dict__.pop("record_probs", None)


def _appender(store: list):
    def record(probs: torch.Tensor) -> None:
        store.append(probs.detach().float().cpu())

    return record


def forward(model, inputs: Inputs) -> torch.Tensor:
    """The model's logits [T, vocab] for the inputs (teacher forcing for an encoder-decoder)."""
    device = model.device
    ids = torch.tensor([inputs.ids], dtype=torch.long, device=device)
    with torch.inference_mode():
        if model.config.is_encoder_decoder:
            src = torch.tensor([inputs.src_ids], dtype=torch.long, device=device)
            logits, _ = model(src, ids)
        else:
            logits, _ = model(ids)
    return logits[0]


def capture_attention(model, inputs: Inputs, keep: dict[str, list[int]] | None = None
                      ) -> tuple[dict[str, dict[int, torch.Tensor]], torch.Tensor]:
    """({kind: {layer: probabilities [n_head, T, S]}} for the layers in `keep` (None: all),
    logits [T, vocab]) of one forward."""
    if keep is None:
        keep = {kind: list(range(len(mods))) for kind, mods in attention_layers(model).items()}
    with record_attention(model, keep) as maps:
        logits = forward(model, inputs)
    out: dict[str, dict[int, torch.Tensor]] = {}
    for kind, layers in keep.items():
        out[kind] = {}
        for i in layers:
            calls = maps[kind][i]
            if len(calls) != 1:
                raise RuntimeError(f"{kind} attention layer {i} ran {len(calls)} times in one forward")
            out[kind][i] = calls[0][0]
    return out, logits


def stream_parts(model):
    """(blocks, final norm, head) of the residual stream that ends in the logits: the decoder's."""
    if model.config.is_encoder_decoder:
        return model.decoder.blocks, model.decoder.norm_f, model.lm_head
    return model.blocks, model.norm_f, model.lm_head


def capture_residuals(model, inputs: Inputs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([residual stream [T, n_embd] before block 0, after block 0, ..., after the last block],
    logits [T, vocab]) of one forward."""
    blocks, _, _ = stream_parts(model)
    states: list[torch.Tensor] = []
    handles = [blocks[0].register_forward_pre_hook(lambda mod, args: states.append(args[0][0].detach()))]
    handles += [b.register_forward_hook(lambda mod, args, out: states.append(out[0].detach())) for b in blocks]
    try:
        logits = forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    if len(states) != len(blocks) + 1:
        raise RuntimeError(f"expected {len(blocks) + 1} residual states from one forward, got {len(states)}")
    return states, logits
