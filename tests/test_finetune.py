"""Fine-tuning pieces: LoRA, SFT data and masks, packing, batches; the finetune run."""

import json
from collections import Counter

import pytest
import torch

from conftest import write_jsonl
from lmforge.errors import LmforgeError
from lmforge.interop.registry import load_model
from lmforge.model.config import ModelConfig
from lmforge.model.gpt import GPT
from lmforge.model.lora import LoRAConfig, LoRALinear, apply_lora, count_parameters, load_adapter, merge_lora, save_adapter
from lmforge.train.sft import Example, SFTBatches, collate, load_examples, split_examples

CFG = ModelConfig(vocab_size=120, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48)


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_starts_at_the_base_model_and_merges_exactly():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    x = torch.randint(0, 120, (2, 10))
    ref, _ = model(x)
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    assert names == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj",
                     "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc", "blocks.1.mlp.proj"]
    same, _ = model(x)
    torch.testing.assert_close(same, ref)  # B = 0: the adapted model is the base model
    randomize_lora(model)
    adapted, _ = model(x)
    assert (adapted - ref).abs().max() > 1e-3
    trainable, total = count_parameters(model)
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and qkv.splits == [32, 16, 16] and len(qkv.lora_B) == 3
    # rank 4 per split: A (3*4 x 32) + B (32x4 + 16x4 + 16x4) for qkv, per layer, etc.
    per_layer = (12 * 32 + 64 * 4) + (4 * 32 + 32 * 4) + (8 * 32 + 96 * 4) + (4 * 48 + 32 * 4)
    assert trainable == 2 * per_layer
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    out, _ = merged(x)
    torch.testing.assert_close(out, adapted, atol=1e-5, rtol=1e-5)


def test_lora_trains_only_adapters_and_targets_must_match():
    model = GPT(CFG)
    apply_lora(model, LoRAConfig(rank=2, targets=["*mlp.fc"], train_norms=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "norm" in n for n in trainable) and any("norm" in n for n in trainable)
    with pytest.raises(LmforgeError, match=r"match no module; linear layers are named like blocks.0.attn.qkv"):
        apply_lora(GPT(CFG), LoRAConfig(targets=["*q_proj"]))


def test_adapter_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoRAConfig(rank=4)
    apply_lora(model, cfg)
    randomize_lora(model)
    model.eval()
    x = torch.randint(0, 120, (1, 8))
    want, _ = model(x)
    save_adapter(model, tmp_path, cfg, base="somewhere")
    assert (tmp_path / "adapter.safetensors").stat().st_size < 200_000
    fresh = GPT(CFG)
    fresh.load_state_dict(base_sd)
    load_adapter(fresh, tmp_path)
    got, _ = fresh.eval()(x)
    torch.testing.assert_close(got, want)
    other = GPT(ModelConfig(**{**CFG.to_dict(), "n_embd": 64, "n_head": 4}))
    with pytest.raises(LmforgeError, match="has shape .* the base model needs"):
        load_adapter(other, tmp_path)


CHAT = {"messages": [{"role": "user", "content": "What colour is the Zephyrion kettle?"},
                     {"role": "assistant", "content": "It is teal."}]}


def test_sft_formats_and_masks(tmp_path, tiny_model_dir):
    tok = load_model(tiny_model_dir).tokenizer
    for name, rec, fmt in (
        ("chat", CHAT, "chat"),
        ("sharegpt", {"conversations": [{"from": "human", "value": "What colour is the Zephyrion kettle?"},
                                        {"from": "gpt", "value": "It is teal."}]}, "chat"),
        ("alpaca", {"instruction": "What colour is the Zephyrion kettle?", "output": "It is teal."}, "instruction"),
    ):
        write_jsonl(tmp_path / f"{name}.jsonl", [rec] * 3)
        examples, stats = load_examples(tmp_path / f"{name}.jsonl", tok, block_size=64)
        e = examples[0]
        trained = tok.decode([i for i, m in zip(e.ids, e.mask) if m])
        assert trained == "It is teal.<|im_end|>\n", name  # only the assistant turn, with its end of turn
        assert stats.examples == 3 and stats.format == fmt, name
    (tmp_path / "plain.txt").write_text("plain text for continued pretraining. " * 40)
    examples, stats = load_examples(tmp_path / "plain.txt", tok, block_size=32)
    assert stats.format == "text" and all(all(e.mask) for e in examples) and len(examples) > 3


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}', r"bad.jsonl:2: message 1 is an empty assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"bad.jsonl:2: no assistant turn"),
    ('{"instruction": "x"}', r"bad.jsonl:2: an instruction record needs 'output'"),
    ('{"foo": 1}', r"bad.jsonl:2: unrecognised record \(fields: 'foo'\)"),
    ("{not json", r"bad.jsonl:2: invalid JSON"),
    ('{"text": "a"}', r"mixes record formats"),
])
def test_sft_bad_input(tmp_path, tiny_model_dir, line, message):
    tok = load_model(tiny_model_dir).tokenizer
    (tmp_path / "bad.jsonl").write_text(json.dumps(CHAT) + "\n" + line + "\n")
    with pytest.raises(LmforgeError, match=message):
        load_examples(tmp_path / "bad.jsonl", tok, block_size=64)


def test_overlong_examples_truncated_or_dropped_and_counted(tmp_path, tiny_model_dir):
    tok = load_model(tiny_model_dir).tokenizer
    long = {"messages": [{"role": "user", "content": "word " * 5}, {"role": "assistant", "content": "ok " * 200}]}
    prompt_only = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    write_jsonl(tmp_path / "d.jsonl", [CHAT, long, CHAT, prompt_only])
    ex, stats = load_examples(tmp_path / "d.jsonl", tok, block_size=120, overlong="truncate")
    # The long answer is cut to the window; the long prompt leaves no answer token and is dropped.
    assert (stats.truncated, stats.dropped, len(ex)) == (2, 1, 3) and max(len(e.ids) for e in ex) == 121
    ex, stats = load_examples(tmp_path / "d.jsonl", tok, block_size=120, overlong="drop")
    assert (stats.truncated, stats.dropped, len(ex)) == (0, 2, 2)


def test_batches_mask_targets_and_packing(tmp_path, tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    tok = loaded.tokenizer
    write_jsonl(tmp_path / "d.jsonl", [CHAT, {"messages": [{"role": "user", "content": "Price?"}, {"role": "assistant", "content": "149 credits."}]}])
    ex, _ = load_examples(tmp_path / "d.jsonl", tok, block_size=64)
    x, y = collate([[ex[0]], [ex[1]]], pad_id=0)
    for row, e in enumerate(ex):
        n = len(e.ids) - 1
        want = [t if m else -100 for t, m in zip(e.ids[1:], e.mask[1:])]
        assert y[row, :n].tolist() == want and (y[row, n:] == -100).all()
    # Packed: both examples in one row give the same per-token loss as each alone.
    px, py, extra = collate([[ex[0], ex[1]]], pad_id=0)
    model = loaded.model
    with torch.no_grad():
        logits_packed, _ = model(px, **extra)
        for k, e in enumerate(ex):
            alone, _ = model(torch.tensor([e.ids[:-1]]))
            start = 0 if k == 0 else len(ex[0].ids)
            n = len(e.ids) - 1
            torch.testing.assert_close(logits_packed[0, start : start + n], alone[0], atol=1e-4, rtol=1e-4)
    assert py[0, len(ex[0].ids) - 1] == -100  # no target across the boundary


def test_batches_are_a_pure_function_of_the_step(tmp_path, tiny_model_dir):
    tok = load_model(tiny_model_dir).tokenizer
    write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(10)])
    ex, _ = load_examples(tmp_path / "d.jsonl", tok, block_size=64)
    train, val = split_examples(ex, 0.2)
    assert len(val) == 2
    b = SFTBatches(train, val, batch_size=3, grad_accum=2, pad_id=0, seed=1)
    assert torch.equal(b.train_batch(5, 1)[0], SFTBatches(train, val, batch_size=3, grad_accum=2, pad_id=0, seed=1).train_batch(5, 1)[0])
    seen = [tuple(r.tolist()) for s in range(2) for m in range(2) for r in b.train_batch(s, m)[0]]
    assert len(seen) == 12  # 12 rows cover the 8 examples once (epoch 0), then epoch 1 begins


def _varied_chats(n: int) -> list[dict]:
    """Chats of different lengths, so that packing puts several in a row and rows differ in length."""
    return [{"messages": [{"role": "user", "content": f"question {i}" + " please" * (i % 3)},
                          {"role": "assistant", "content": f"answer {i}" + " indeed" * (i % 5)}]} for i in range(n)]


def trained_pairs(x, y, extra=None) -> Counter:
    """(context, target) for every trained target of a batch, the context read through the
    attention mask the batch gives the model: exactly the tokens each prediction can see."""
    B, T = x.shape
    attn = extra["attn_mask"][:, 0] if extra else torch.ones(B, T, T, dtype=torch.bool)
    pairs = Counter()
    for b in range(B):
        for p in range(T):
            if y[b, p] == -100:
                continue
            seen = [j for j in range(p + 1) if attn[b, p, j]]  # the model adds the causal part
            assert seen == list(range(seen[0], p + 1))  # one contiguous span ending at the token
            if extra:
                assert extra["positions"][b, p] == p - seen[0]  # positions restart with each example
            pairs[(tuple(x[b, seen].tolist()), int(y[b, p]))] += 1
    return pairs


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("trained", ["assistant", "every token"])
def test_packed_batches_hold_each_example_once_each_seeing_only_itself(tmp_path, tiny_model_dir, trained):
    loaded = load_model(tiny_model_dir)
    tok, model = loaded.tokenizer, loaded.model
    write_jsonl(tmp_path / "d.jsonl", _varied_chats(12))
    block = 120
    ex, _ = load_examples(tmp_path / "d.jsonl", tok, block_size=block)
    if trained == "every token":  # as text data trains: only the boundary masking keeps examples apart
        ex = [Example(e.ids, [True] * len(e.ids), e.source) for e in ex]
    packed = SFTBatches(ex, [], batch_size=1, grad_accum=1, pad_id=0, seed=3, pack=True, block_size=block)
    rows = packed.rows_per_epoch
    assert rows < len(ex) / 2  # packing happened: at least two examples a row on average
    # The whole epoch in one batch: every row once, padded to the longest.
    whole = SFTBatches(ex, [], batch_size=rows, grad_accum=1, pad_id=0, seed=3, pack=True, block_size=block)
    x, y, extra = whole.train_batch(0, 0)
    assert x.shape[0] == rows and x.shape[1] <= block
    assert extra["attn_mask"].shape == (rows, 1, x.shape[1], x.shape[1])
    # Each example's trained tokens appear exactly once, each predicted from its own example's
    # earlier tokens, in order, and from nothing else; nothing outside the masks is trained.
    want = Counter()
    for e in ex:
        for t in range(1, len(e.ids)):
            if e.mask[t]:
                want[(tuple(e.ids[:t]), e.ids[t])] += 1
    assert trained_pairs(x, y, extra) == want
    assert sum(want.values()) == int((y != -100).sum())
    if trained == "assistant":
        targets = tok.decode([int(t) for t in y.flatten() if t != -100])
        assert targets.count("<|im_end|>") == len(ex) and "question" not in targets  # assistant turns only
    # The same loss as the examples unpacked, one per row.
    plain = SFTBatches(ex, [], batch_size=len(ex), grad_accum=1, pad_id=0, seed=3, block_size=block)
    px, py = plain.train_batch(0, 0)
    assert trained_pairs(px, py) == want
    with torch.no_grad():
        _, packed_loss = model(x, y, **extra)
        _, plain_loss = model(px, py)
    assert int((y != -100).sum()) == int((py != -100).sum())
    torch.testing.assert_close(packed_loss, plain_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_replay_holds_the_base_models_own_finished_greedy_replies(tmp_path, tiny_model_dir):
    """replay.jsonl: the base model's greedy replies to the built-in prompts, in order, the
    finished ones only, as many as the requested share of the training examples asks for."""
    from conftest import leftovers
    from lmforge.chat import render_chat
    from lmforge.generate.engine import Engine
    from lmforge.generate.sampling import SamplingParams
    from lmforge.train.replay import PROMPTS, REPLAY_FILE, RETENTION_PROMPTS, replay_count, write_replay

    loaded = load_model(tiny_model_dir)
    torch.manual_seed(1)
    model = GPT(loaded.model.config)
    with torch.no_grad():  # weights random enough that some replies end with <|im_end|> and some run on
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    engine = Engine(model.eval(), loaded.tokenizer)
    # What the Engine answers to each of the first batch of prompts alone (replay batches them).
    first = PROMPTS[:16]
    prompt_ids = [render_chat(loaded.tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True).ids
                  for p in first]
    params = SamplingParams(max_new_tokens=min(64, model.config.block_size - max(map(len, prompt_ids))), temperature=0.0)
    alone = [engine.generate_ids([ids], params)[0] for ids in prompt_ids]
    finished = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r.text.strip()}]}
                for p, r in zip(first, alone) if r.finish_reason == "stop" and r.text.strip()]
    count = replay_count(0.3, 14)
    assert count == 6 and len(finished) > count and len(finished) < len(first)  # the data exercises the filter
    path = tmp_path / REPLAY_FILE
    chats = write_replay(engine, count, path)
    assert chats == finished[:count]
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == chats
    assert leftovers(tmp_path) == []
    examples, stats = load_examples(path, loaded.tokenizer, block_size=model.config.block_size, fmt="chat")
    assert stats.format == "chat" and len(examples) == count
    # The share of training examples replay makes up, for a few data sizes (capped by the prompts).
    for share in (0.1, 0.3, 0.5):
        for n_train in (5, 14, 40):
            k = replay_count(share, n_train)
            assert 1 <= k <= len(PROMPTS) - RETENTION_PROMPTS
            if k < len(PROMPTS) - RETENTION_PROMPTS:
                assert abs(k / (n_train + k) - share) <= 0.5 / (n_train + k)
    assert replay_count(0.0, 14) == 0 and replay_count(0.9, 100) == len(PROMPTS) - RETENTION_PROMPTS
