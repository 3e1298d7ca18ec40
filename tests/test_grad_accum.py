"""Gradient accumulation over variable-length SFT examples gives the gradient of one large batch:
the step's loss is sum(token losses) / all tokens under the loss, not the mean of per-micro-batch
means (the accumulation bug HF transformers fixed in 4.46)."""

import random

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.gpt import GPT
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import read_metrics
from lmforge.train.sft import Example, SFTBatches
from lmforge.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64,
                  dropout=0.0)


def variable_examples(n=8, seed=0) -> list[Example]:
    """Prompts of 3-10 tokens, replies of 1-40: micro-batches of 2 hold very different token counts."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt, reply = rng.randint(3, 10), rng.choice([1, 2, 3, 25, 40])
        ids = [rng.randrange(1, CFG.vocab_size) for _ in range(prompt + reply)]
        out.append(Example(ids, [False] * prompt + [True] * reply, f"ex{i}"))
    return out


def one_step(tmp_path, batch_size, grad_accum):
    """(gradients before the optimizer step, parameters after it, the logged train loss)."""
    torch.manual_seed(0)
    model = GPT(CFG)
    examples = variable_examples()
    data = SFTBatches(examples, examples[:2], batch_size=batch_size, grad_accum=grad_accum, pad_id=0, seed=3)
    # SGD without momentum or decay, no clipping: the step is -lr * gradient, so parameters compare
    # gradients too (AdamW's first step is ~sign(gradient) and would hide a scale error).
    cfg = TrainConfig(max_steps=1, batch_size=batch_size, grad_accum=grad_accum, optimizer="sgd", momentum=0.0,
                      lr=1.0, min_lr=1.0, warmup_steps=0, weight_decay=0.0, grad_clip=0.0, eval_every=0,
                      checkpoint_every=0, log_every=1, device="cpu")
    trainer = Trainer(model, cfg, data, tmp_path / f"b{batch_size}x{grad_accum}", write_model=lambda folder: None,
                      param_groups=[{"params": list(model.parameters())}], flops_per_token=1.0, tokens_per_step=1,
                      progress=False)
    grads = {}
    step = trainer.optimizer.step

    def record_then_step(*a, **kw):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return step(*a, **kw)

    trainer.optimizer.step = record_then_step
    trainer.fit()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = float(read_metrics(trainer.run_dir / "metrics.csv")[0]["train_loss"])
    return grads, params, loss


def test_accum_4_x_batch_2_equals_batch_8_on_variable_lengths(tmp_path):
    big_grads, big_params, big_loss = one_step(tmp_path, batch_size=8, grad_accum=1)
    acc_grads, acc_params, acc_loss = one_step(tmp_path, batch_size=2, grad_accum=4)
    assert big_grads.keys() == acc_grads.keys() and len(big_grads) > 10
    for name in big_grads:
        torch.testing.assert_close(acc_grads[name], big_grads[name], atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(acc_params[name], big_params[name], atol=1e-5, rtol=0, msg=name)
    assert acc_loss == pytest.approx(big_loss, abs=1e-5)


def test_averaging_micro_batch_means_would_differ(tmp_path):
    """The premise of the test above: these micro-batches hold unequal token counts, so the old
    per-micro-batch mean gives another gradient (this is what that test catches)."""
    examples = variable_examples()
    data = SFTBatches(examples, [], batch_size=2, grad_accum=4, pad_id=0, seed=3)
    batches = [data.train_batch(0, m) for m in range(4)]
    counts = [int((y != -100).sum()) for _, y in batches]
    assert max(counts) > 2 * min(counts), counts
    torch.manual_seed(0)
    model = GPT(CFG)
    for x, y in batches:
        (model(x, y)[1] / 4).backward()
    old = {n: p.grad.clone() for n, p in model.named_parameters()}
    big_grads, _, _ = one_step(tmp_path, batch_size=8, grad_accum=1)
    worst = max(float((old[n] - big_grads[n]).abs().max()) for n in big_grads)
    assert worst > 1e-3, worst


@pytest.mark.parametrize("chunk", [4, 1000])  # several chunks (recomputed in backward), and one
def test_chunked_loss_on_the_reply_tokens_alone_equals_the_full_loss(chunk):
    """The chunked loss computes the head only on rows under the loss: same loss and gradients."""
    examples = variable_examples()
    x, y = SFTBatches(examples, [], batch_size=8, grad_accum=1, pad_id=0, seed=3).train_batch(0, 0)
    assert 0 < int((y != -100).sum()) < 0.6 * y.numel()  # the rest: prompts and padding
    results = []
    for loss_chunk in (0, chunk):
        torch.manual_seed(0)
        model = GPT(CFG)
        model.loss_chunk = loss_chunk
        loss = model(x, y)[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (full, full_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    for name, g in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], g, atol=1e-6, rtol=1e-5, msg=name)
