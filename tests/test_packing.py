"""The padding-free layout (lmforge.model.packing): token-wise layers on the real tokens alone.

The encoder-decoder's case is in test_seq2seq_model.py; here the layout itself and the
decoder-only GPT's training on padded (fine-tuning) batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model
from lmforge.model import ModelConfig
from lmforge.model.packing import Packing, target_keep
from lmforge.train.sft import Example, collate

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 57
GPT2_LIKE = ModelConfig(name="gpt2-like", vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
                        intermediate_size=64, norm="layernorm", mlp="gelu", position="learned", bias=True)
LLAMA_LIKE = dataclasses.replace(GPT2_LIKE, name="llama-like", norm="rmsnorm", mlp="swiglu", position="rope",
                                 bias=False, n_kv_head=2, tie_embeddings=False)
CONFIGS = {"gpt2-like": GPT2_LIKE, "llama-like": LLAMA_LIKE}


def test_packing_lays_tokens_out_and_back():
    keep = torch.tensor([[True, True, False], [True, False, False]])
    packing = Packing.of(keep)
    assert packing.tokens == 3 and Packing.of(torch.ones(2, 3, dtype=torch.bool)) is None
    x = torch.arange(12.0).view(2, 3, 2)
    packed = packing.pack(x)
    assert packed.tolist() == [[0, 1], [2, 3], [6, 7]]
    grid = packing.pad(packed)
    assert torch.equal(grid[keep], x[keep]) and grid[~keep].abs().sum() == 0
    targets = torch.tensor([[5, -100, 7, -100, -100], [-100, -100, -100, -100, -100], [1, 2, 3, 4, 5]])
    # a -100 before a row's last target is read by later positions: kept; trailing ones are not
    assert target_keep(targets).tolist() == [[True, True, True, False, False], [False] * 5, [True] * 5]



def _examples(seed: int) -> list[Example]:
    """Chat-like examples of 5-13 tokens, the loss on the second half of each (the reply)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (13, 5, 9, 7):
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append(Example(ids, [i >= n // 2 for i in range(n)], f"test:{n}"))
    return out


@pytest.mark.parametrize("several_per_row", [False, True], ids=["one-per-row", "packed-rows"])
@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("kind", CONFIGS)
def test_gpt_training_on_padded_rows_gives_the_padded_loss_and_gradients(kind, ckpt, several_per_row):
    ex = _examples(1)
    rows = [[ex[0]], [ex[1], ex[2]], [ex[3]]] if several_per_row else [[e] for e in ex]
    x, y, *extra = collate(rows, pad_id=0)
    extra = extra[0] if extra else {}
    model = random_model(CONFIGS[kind]).train()
    model.activation_checkpointing = ckpt
    seen = []
    model.blocks[0].mlp.fc.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[:-1]))
    logits, loss = model(x, y, **extra)
    assert seen[0] == torch.Size([int(target_keep(y).sum())]) and seen[0].numel() < x.numel()  # fewer rows ran
    assert logits.shape == (*x.shape, VOCAB) and logits[~target_keep(y)].abs().sum() == 0
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full, _ = model(x, **extra)  # no targets: every position, the padded layout
    ref = F.cross_entropy(full.view(-1, VOCAB), y.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits[target_keep(y)], full[target_keep(y)])
    ref.backward()
    for (name, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(g, p.grad, msg=lambda m: f"{name}: {m}")


def test_gpt_chunked_loss_and_eval_mode_keep_their_contracts():
    x, y = collate([[e] for e in _examples(2)], pad_id=0)
    model = random_model(GPT2_LIKE)
    logits, loss = model(x, y)  # eval mode: every position, as scoring code expects
    assert logits[~target_keep(y)].abs().sum() > 0
    model.train()
    model.loss_chunk = 8  # the chunked head on the packed row: logits None, the same loss
    none, chunked = model(x, y)
    assert none is None
    torch.testing.assert_close(chunked, loss)
