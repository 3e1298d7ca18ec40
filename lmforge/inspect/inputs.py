"""The text an inspection reads, as token ids and as the text each token stands for."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Sequence

from lmforge.errors import LmforgeError


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, decoded from its bytes in order: a UTF-8 character split over
    byte-level BPE tokens is shown on the token that completes it (the others show nothing), so
    the pieces join to the decoded text instead of showing U+FFFD for each part."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = [decoder.decode(tokenizer.token_bytes(int(i))) for i in ids]
    if out:
        out[-1] += decoder.decode(b"", final=True)
    return out


def token_text(tokenizer, token_id: int) -> str:
    """One token's text on its own (a partial UTF-8 character shows as U+FFFD)."""
    return tokenizer.token_bytes(int(token_id)).decode("utf-8", errors="replace")


def token_label(text: str, width: int = 12) -> str:
    """A token's text for a plot axis or table cell: whitespace made visible, long pieces cut."""
    label = text.replace("\n", "↵").replace("\t", "→").replace("\r", "␍").replace(" ", "·")
    label = "".join(c if c.isprintable() else "�" for c in label)
    if not label:
        return "∅"
    return label if len(label) <= width else label[: width - 1] + "…"


@dataclass
class Inputs:
    """What one forward reads. ids: the (decoder's) tokens; src_ids: an encoder-decoder's source,
    else None. texts/src_texts: the text of each token (see `token_texts`)."""

    ids: list[int]
    texts: list[str]
    src_ids: list[int] | None = None
    src_texts: list[str] | None = None


def prepare_inputs(loaded, text: str, source: str | None = None) -> Inputs:
    """Tokenize `text` (and `source`) for the loaded model, checking what a forward would refuse
    later with a less helpful message. An encoder-decoder's decoder input starts with its decoder
    start token, as in training and generation."""
    model, tok = loaded.model, loaded.tokenizer
    config = model.config
    if not text:
        raise LmforgeError("the text is empty: give the text to look at")
    ids = tok.encode(text)
    if not ids:
        raise LmforgeError(f"the text {text!r} encodes to no tokens")
    src_ids = src_texts = None
    if config.is_encoder_decoder:
        if source is None:
            raise LmforgeError("an encoder-decoder reads a source: give it with --source TEXT "
                               "(the text is the decoder's input)")
        if not source:
            raise LmforgeError("--source is empty: give the encoder's input text")
        from lmforge.generate.seq2seq_decode import default_start_id

        src_ids = tok.encode(source)
        if not src_ids:
            raise LmforgeError(f"--source {source!r} encodes to no tokens")
        if len(src_ids) > config.block_size:
            raise LmforgeError(f"--source has {len(src_ids)} tokens, more than the model's context of {config.block_size}")
        src_texts = token_texts(tok, src_ids)
        ids = [default_start_id(tok, loaded.generation)] + ids
    elif source is not None:
        raise LmforgeError("--source is for encoder-decoder models; this one is decoder-only")
    if len(ids) > config.block_size:
        raise LmforgeError(f"the text has {len(ids)} tokens, more than the model's context of {config.block_size}; "
                           "shorten it")
    return Inputs(ids, token_texts(tok, ids), src_ids, src_texts)


def check_layer(layer: int | None, n_layer: int, what: str = "--layer") -> int | None:
    """A layer index in [0, n_layer) (negative: from the end, -1 the last), or None for all."""
    if layer is None:
        return None
    if not -n_layer <= layer < n_layer:
        raise LmforgeError(f"{what} {layer} is out of range: the model has {n_layer} layers (0..{n_layer - 1})")
    return layer % n_layer


def check_head(head: int | None, n_head: int) -> int | None:
    if head is None:
        return None
    if not -n_head <= head < n_head:
        raise LmforgeError(f"--head {head} is out of range: the model has {n_head} heads per layer (0..{n_head - 1})")
    return head % n_head
