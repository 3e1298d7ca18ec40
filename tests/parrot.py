"""Scripted model dirs: Llama-family lmforge models whose greedy reply to any chat is known in advance.

Built by hand, not trained, so a test knows exactly what the model says (a reply holding HTML, to
check that a page shows it as text; an endless reply, to have something to stop):

- the tokenizer is lmforge's smallest ChatML byte-level BPE (the 256 bytes and the special
  tokens) plus each piece of the script as ONE added (non-special) token, so a piece decodes back
  to itself byte for byte;
- every block's output projections (attention and MLP) are zero, so the residual stream at a
  position is just the embedding of the token there (RoPE, RMSNorm and attention change nothing);
- piece i embeds to e_(i+1), every other token to e_0;
- the untied head scores piece 0 along e_0, piece i+1 along e_(i+1), and after the last piece
  <|im_end|> (or piece 0 again, for an endless reply); every other token scores 0.

So after any prompt the model says the pieces in order, then ends its turn (or starts over).
"""

from __future__ import annotations

import math
from pathlib import Path

# The winning logit is sqrt(n_embd) * LOGIT_SCALE (the final RMSNorm scales a one-hot residual
# to sqrt(n_embd)), every other one 0: even sampling at temperature 2 follows the script.
LOGIT_SCALE = 40.0


def scripted_tokenizer(pieces: list[str]):
    """lmforge's ChatML byte-level BPE with every piece added as one (non-special) token."""
    from tokenizers import AddedToken

    from lmforge.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer

    if not pieces or any(not p for p in pieces) or len(set(pieces)) != len(pieces):
        raise ValueError("a script needs distinct, non-empty pieces")
    # vocab_size below the floor: the tokenizer has just the bytes and the special tokens.
    base = train_tokenizer(["parrot"], TokenizerTrainConfig(vocab_size=256), show_progress=False)
    hf = base.hf
    # normalized=False: matched and decoded as written; not special: decoding keeps them.
    hf.add_tokens([AddedToken(p, special=False, normalized=False, single_word=False, lstrip=False, rstrip=False)
                   for p in pieces])
    tok = Tokenizer(hf, base.config)
    for p in pieces:
        if tok.encode(p) != [tok.hf.token_to_id(p)]:
            raise ValueError(f"piece {p!r} does not encode as one token (does it contain another piece?)")
    return tok


def scripted_model_dir(path: str | Path, pieces: list[str], *, loop: bool = False, n_layer: int = 1,
                       block_size: int = 512) -> Path:
    """A model dir at `path` (which must not exist) whose reply to any chat is "".join(pieces),
    then <|im_end|>; with loop=True the pieces again and again, never ending on its own.
    n_layer: the depth (the extra blocks add nothing to the output, only time per token)."""
    import torch

    from lmforge.model.config import ModelConfig
    from lmforge.model.gpt import GPT
    from lmforge.model.io import save_model_dir

    tok = scripted_tokenizer(pieces)
    ids = [tok.hf.token_to_id(p) for p in pieces]
    end_of_turn = tok.hf.token_to_id("<|im_end|>")
    assert end_of_turn is not None
    n_embd = 4 * math.ceil((len(pieces) + 1) / 4)  # 2 heads of an even head_dim (RoPE)
    config = ModelConfig(name="parrot", vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer,
                         n_head=2, n_kv_head=1, n_embd=n_embd, intermediate_size=8, norm="rmsnorm",
                         mlp="swiglu", position="rope", bias=False, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.mlp.proj.weight.zero_()
        emb, head = model.tok_emb.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0
        head.zero_()
        head[ids[0], 0] = LOGIT_SCALE
        for i, tid in enumerate(ids):
            emb[tid, 0] = 0.0
            emb[tid, i + 1] = 1.0
            after = ids[i + 1] if i + 1 < len(ids) else (ids[0] if loop else end_of_turn)
            head[after, i + 1] = LOGIT_SCALE
    return save_model_dir(model.eval(), path, tokenizer=tok)


def parrot_model_dir(path: str | Path, reply: str) -> Path:
    """A model dir whose greedy reply to any chat prompt is exactly `reply` (one token), then <|im_end|>."""
    return scripted_model_dir(path, [reply])
