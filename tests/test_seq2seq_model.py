"""The encoder-decoder Seq2Seq: masks, causality, the cache, the loss, model dirs, estimates and
Hugging Face interop (MBartForConditionalGeneration, transformers as the reference)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import random_seq2seq

from lmforge.errors import LmforgeError
from lmforge.interop import hf_seq2seq
from lmforge.model import GPT, ModelConfig, get_preset, load_model_dir, save_model_dir
from lmforge.model.estimate import estimate_memory
from lmforge.model.packing import target_keep
from lmforge.model.seq2seq import Seq2Seq

try:
    import transformers
except ImportError:  # the Hugging Face tests are skipped; the model's own run without it
    transformers = None

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 61
# The mBART layout (exportable), an untied one with exact-vs-tanh GELU, and a Llama-style one with
# rope, rmsnorm, swiglu, grouped-query attention and a separate source vocabulary (not exportable).
MBART_LIKE = ModelConfig(
    name="s2s-test", arch="encoder-decoder", vocab_size=VOCAB, block_size=40, n_encoder_layer=2, n_layer=3, n_head=4,
    n_kv_head=4, n_embd=32, intermediate_size=80, norm="layernorm", mlp="gelu_exact", position="learned", bias=True,
)
UNTIED = dataclasses.replace(MBART_LIKE, name="s2s-untied", tie_embeddings=False, mlp="gelu", n_encoder_layer=1)
LLAMA_LIKE = dataclasses.replace(
    MBART_LIKE, name="s2s-llama", norm="rmsnorm", mlp="swiglu", position="rope", bias=False, n_head=6, n_kv_head=2,
    n_embd=48, intermediate_size=72, src_vocab_size=53, tie_embeddings=False,
)
CONFIGS = {"mbart-like": MBART_LIKE, "untied": UNTIED, "llama-like": LLAMA_LIKE}


def batch(cfg: ModelConfig, src_len: int = 11, tgt_len: int = 9, seed: int = 3):
    """(src [3, S], src_mask with rows 1 and 2 right-padded, tgt [3, T])."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, cfg.src_vocab_size or cfg.vocab_size, (3, src_len), generator=g)
    tgt = torch.randint(0, cfg.vocab_size, (3, tgt_len), generator=g)
    mask = torch.ones(3, src_len, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, src_len - 2:] = False
    return src, mask, tgt


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- config -------------------------------------------------------------------------------------
def test_config_fields_and_validation():
    assert ModelConfig.from_dict(json.loads(json.dumps(LLAMA_LIKE.to_dict()))) == LLAMA_LIKE
    # A decoder's to_dict is what it was before the encoder-decoder fields existed.
    assert not {"arch", "n_encoder_layer", "src_vocab_size"} & set(get_preset("tiny").to_dict())
    assert ModelConfig.from_dict({"n_layer": 2}) == ModelConfig(n_layer=2)
    with pytest.raises(LmforgeError, match="n_encoder_layer is for arch encoder-decoder"):
        ModelConfig(n_encoder_layer=2)
    with pytest.raises(LmforgeError, match="needs n_encoder_layer >= 1"):
        ModelConfig(arch="encoder-decoder")
    with pytest.raises(LmforgeError, match="arch must be one of decoder, encoder-decoder"):
        ModelConfig(arch="encoder")
    with pytest.raises(LmforgeError, match="Seq2Seq needs arch 'encoder-decoder'"):
        Seq2Seq(ModelConfig())
    assert MBART_LIKE.fused_parts("decoder.blocks.0.cross_attn.kv.weight") == [32, 32]
    assert LLAMA_LIKE.fused_parts("encoder.blocks.1.attn.qkv.weight") == [48, 16, 16]


# -- forward, masks, loss -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CONFIGS)
def test_source_padding_changes_nothing_at_real_positions(kind):
    cfg = CONFIGS[kind]
    model = random_seq2seq(cfg)
    src, mask, tgt = batch(cfg)
    with torch.no_grad():
        memory = model.encode(src, mask)
        logits, _ = model(src, tgt, mask)
        for row in range(3):
            n = int(mask[row].sum())
            alone = src[row:row + 1, :n]  # the same source without its padding
            assert max_diff(model.encode(alone)[0], memory[row, :n]) <= 1e-5
            assert max_diff(model(alone, tgt[row:row + 1])[0][0], logits[row]) <= 1e-5
        # The mask is what does it: without it, the padding's tokens change the output.
        assert max_diff(model(src, tgt)[0][1], logits[1]) > 1e-3


def test_a_source_of_only_padding_stays_finite():
    model = random_seq2seq(MBART_LIKE)
    src, mask, tgt = batch(MBART_LIKE)
    mask[0] = False
    with torch.no_grad():
        assert torch.isfinite(model(src, tgt, mask)[0]).all()
    with pytest.raises(LmforgeError, match="src_mask must be a bool tensor"):
        model(src, tgt, mask.long())


@pytest.mark.parametrize("kind", CONFIGS)
def test_decoder_is_causal(kind):
    cfg = CONFIGS[kind]
    model = random_seq2seq(cfg)
    src, mask, tgt = batch(cfg)
    changed = tgt.clone()
    changed[:, 5] = (changed[:, 5] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(src, tgt, mask)[0], model(src, changed, mask)[0]
    assert torch.equal(a[:, :5], b[:, :5])
    assert max_diff(a[:, 5:], b[:, 5:]) > 1e-3


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_is_torch_cross_entropy_skipping_minus_100(smoothing):
    cfg = MBART_LIKE
    model = random_seq2seq(cfg).train()
    src, mask, tgt = batch(cfg)
    targets = tgt.roll(-1, 1)
    targets[0, 6:] = -100  # a shorter target, right-padded: no loss there
    torch.manual_seed(3)  # the same dropout masks in both passes
    skipped, loss = model(src, tgt, mask, targets=targets, label_smoothing=smoothing)
    assert skipped is None  # the head ran on the kept positions only
    torch.manual_seed(3)
    logits, _ = model(src, tgt, mask)
    ref = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-100, label_smoothing=smoothing)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert all(g.abs().sum() > 0 for g in grads)
    model.zero_grad()
    ref.backward()  # the full head's loss gives the same gradients
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_activation_checkpointing_gives_the_same_loss_and_grads():
    cfg = dataclasses.replace(MBART_LIKE, dropout=0.0)
    src, mask, tgt = batch(cfg)
    grads = []
    for ckpt in (False, True):
        model = random_seq2seq(cfg).train()
        model.activation_checkpointing = ckpt
        loss = model(src, tgt, mask, targets=tgt)[1]
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# -- the padding-free layout (lmforge.model.packing) --------------------------------------------
def _padded_reference(model, src, mask, tgt, targets, smoothing):
    """The loss on the padded grid: every layer over every position (the layout before packing)."""
    h = model.decode_states(tgt, model.encode_tokens(src, mask, None), mask)
    keep = targets != -100
    return F.cross_entropy(model.lm_head(h[keep]).float(), targets[keep], label_smoothing=smoothing)


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("kind", CONFIGS)
def test_packed_training_gives_the_padded_loss_and_gradients(kind, ckpt):
    cfg = CONFIGS[kind]
    model = random_seq2seq(cfg).train()
    model.activation_checkpointing = ckpt
    src, mask, tgt = batch(cfg, src_len=12, tgt_len=10)
    src, mask, tgt = torch.cat([src, src[:1]]), torch.cat([mask, torch.zeros_like(mask[:1])]), torch.cat([tgt, tgt[:1]])
    targets = tgt.roll(-1, 1)
    targets[0, 7:] = -100  # right padding: skipped
    targets[1, 2] = -100  # inside a row: no loss there, but later positions read that token
    targets[2, 4:] = -100
    rows = []
    model.encoder.blocks[0].mlp.fc.register_forward_hook(lambda m, a, out: rows.append(a[0].shape))
    model.decoder.blocks[0].mlp.fc.register_forward_hook(lambda m, a, out: rows.append(a[0].shape))
    logits, loss = model(src, tgt, mask, targets=targets, label_smoothing=0.1)
    assert logits is None
    # the MLPs ran on the real tokens alone (row 3's source is all padding: it keeps its 12 positions)
    real_src = int(mask[:3].sum()) + 12
    assert rows[:2] == [torch.Size([real_src, cfg.n_embd]), torch.Size([int(target_keep(targets).sum()), cfg.n_embd])]
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = _padded_reference(model, src, mask, tgt, targets, 0.1)
    torch.testing.assert_close(loss, ref)
    ref.backward()
    for (name, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(g, p.grad, msg=lambda m: f"{name}: {m}")


# -- the cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CONFIGS)
def test_cached_decoding_equals_teacher_forcing(kind):
    cfg = CONFIGS[kind]
    model = random_seq2seq(cfg)
    src, mask, tgt = batch(cfg)
    with torch.no_grad():
        full, _ = model(src, tgt, mask)
        cache = model.new_cache(model.encode(src, mask), mask, max_len=12)
        steps = [model.decode(tgt[:, :3], cache=cache)]  # a prefill of 3, then one token at a time
        steps += [model.decode(tgt[:, t:t + 1], cache=cache) for t in range(3, tgt.shape[1])]
    assert cache.pos == tgt.shape[1]
    assert max_diff(torch.cat(steps, 1), full) <= 1e-5
    with pytest.raises(LmforgeError, match="KV cache full"):
        model.decode(tgt[:, :4], cache=cache)


def test_cache_reorder_moves_and_expands_rows_as_beam_search_needs():
    cfg = LLAMA_LIKE
    model = random_seq2seq(cfg)
    src, mask, tgt = batch(cfg)
    with torch.no_grad():
        # Each source expanded to 2 beams, then beams swapped and duplicated mid-decode.
        cache = model.new_cache(model.encode(src, mask), mask, max_len=10)
        cache.reorder(torch.arange(3).repeat_interleave(2))
        beams = tgt.repeat_interleave(2, 0)
        model.decode(beams[:, :4], cache=cache)
        order = torch.tensor([1, 1, 3, 2, 4, 5])
        cache.reorder(order)
        last = model.decode(beams[order, 4:6], cache=cache)
        rows = order // 2  # the source each beam now belongs to
        ref, _ = model(src[rows], beams[order, :6], mask[rows])
    assert max_diff(last, ref[:, 4:6]) <= 1e-5
    with pytest.raises(LmforgeError, match="row indices below 6"):
        cache.reorder(torch.tensor([0, 6]))


@pytest.mark.parametrize("kind", ["mbart-like", "llama-like"])
def test_shared_beams_cache_reads_one_cross_copy_per_source(kind):
    """share_beams: the beams of a source are its cross-attention's query positions (one copy of
    its keys/values): the same logits as per-row copies, through reorders within a source and a
    general reorder (which goes back to a copy per row)."""
    cfg = CONFIGS[kind]
    model = random_seq2seq(cfg)
    src, mask, tgt = batch(cfg)
    beams = tgt.repeat_interleave(2, 0)
    with torch.no_grad():
        memory = model.encode(src, mask)
        shared, copied = model.new_cache(memory, mask, max_len=10), model.new_cache(memory, mask, max_len=10)
        shared.share_beams(2)
        copied.reorder(torch.arange(3).repeat_interleave(2))
        assert shared.beams == 2 and shared.cross[0][0].shape[0] == 3 and shared.batch_size == 6
        outs = []
        for cache in (shared, copied):
            a = model.decode(beams[:, :3], cache=cache)
            if cache is shared:
                cache.self_attn.follow(torch.tensor([1, 1, 3, 2, 4, 5]))  # within each source
            else:
                cache.self_attn.reorder(torch.tensor([1, 1, 3, 2, 4, 5]))
            b = model.decode(beams[:, 3:4], cache=cache)
            cache.reorder(torch.tensor([5, 4, 0, 0, 2, 3]))  # across sources
            c = model.decode(beams[:, 4:5], cache=cache)
            outs.append(torch.cat([a, b, c], 1))
    assert shared.beams == 1
    assert max_diff(outs[0], outs[1]) <= 1e-5


def test_greedy_decode_uses_the_cache_and_stops_at_eos():
    model = random_seq2seq(UNTIED)
    src, mask, _ = batch(UNTIED)
    out = model.greedy_decode(src, mask, start_id=0, max_new_tokens=8)
    assert out.shape == (3, 9) and torch.equal(out[:, 0], torch.zeros(3, dtype=torch.long))
    with torch.no_grad():  # each token is the argmax of a teacher-forced pass over the ones before it
        logits, _ = model(src, out[:, :-1], mask)
    assert torch.equal(logits.argmax(-1), out[:, 1:])
    eos = int(out[0, 3])
    stopped = model.greedy_decode(src[:1], mask[:1], start_id=0, max_new_tokens=8, eos_id=eos)
    assert stopped.shape[1] <= 4 and int(stopped[0, -1]) == eos


# -- model dirs, parameters, estimates --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mbart-like", "llama-like"])
def test_model_dir_round_trip(tmp_path, kind):
    cfg = CONFIGS[kind]
    model = random_seq2seq(cfg)
    out = save_model_dir(model, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["lmforge_model"]["arch"] == "encoder-decoder"
    loaded, loaded_cfg = load_model_dir(out)
    assert type(loaded) is Seq2Seq and loaded_cfg == cfg
    if cfg.tie_embeddings:
        assert loaded.lm_head.weight is loaded.tok_emb.weight
    src, mask, tgt = batch(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(src, tgt, mask)[0], model(src, tgt, mask)[0])
    # A decoder's model dir still loads as a GPT.
    gpt_dir = save_model_dir(GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=2, vocab_size=50)), tmp_path / "g")
    assert "arch" not in json.loads((gpt_dir / "config.json").read_text())["lmforge_model"]
    assert type(load_model_dir(gpt_dir)[0]) is GPT


@pytest.mark.parametrize("kind", CONFIGS)
def test_param_count_and_estimate_match_the_model(kind):
    cfg = CONFIGS[kind]
    model = Seq2Seq(cfg)
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert model.param_count() == sum(unique.values()) == estimate_memory(cfg, 2, 16)["params"]
    tables = cfg.vocab_size * cfg.n_embd * (1 if cfg.tie_embeddings else 2) + cfg.src_vocab_size * cfg.n_embd
    tables += 2 * cfg.block_size * cfg.n_embd if cfg.position == "learned" else 0
    assert model.param_count(non_embedding=True) == model.param_count() - tables
    est = estimate_memory(cfg, 2, 16)
    assert est["flops_per_token"] == model.flops_per_token(16)


def test_preset_parameter_counts():
    for name, expected in (("seq2seq-tiny", 1_516_544), ("transformer-base", 64_135_168)):
        cfg = get_preset(name)
        with torch.device("meta"):
            model = Seq2Seq(cfg)
        assert model.param_count() == estimate_memory(cfg, 1, 128)["params"] == expected
    base = get_preset("transformer-base")
    assert (base.n_encoder_layer, base.n_layer, base.n_embd, base.n_head, base.intermediate_size) == (6, 6, 512, 8, 2048)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["mbart-like", "llama-like"])
def test_estimated_activations_match_saved_tensors(kind, dropout):
    """The encoder-decoder activation formula against what autograd keeps for backward."""
    cfg = dataclasses.replace(CONFIGS[kind], dropout=dropout)
    model = random_seq2seq(cfg).train()
    keep = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in keep:
            saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    B, T = 4, 32
    src, _, tgt = batch(cfg, T, T)
    src, tgt = src.repeat(2, 1)[:B], tgt.repeat(2, 1)[:B]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(src, tgt, targets=tgt)
    measured = sum(saved.values()) + logits.numel() * logits.element_size()
    est = estimate_memory(cfg, B, T, fused_attention=not dropout, dropout_mask_bytes=4)
    assert est["activations"] + est["logits"] == pytest.approx(measured, rel=0.03)
    assert estimate_memory(cfg, B, T, activation_checkpointing=True)["activations"] < est["activations"]


def test_cli_presets_and_estimate(cli):
    r = cli("models", "--presets")
    line = next(x for x in r.out.splitlines() if x.startswith("transformer-base"))
    assert "enc-dec" in line and "64.1M" in line and "6+6" in line
    r = cli("estimate", "--model", "transformer-base", "--batch-size", "2", "--seq-len", "64")
    assert r.code == 0 and "64,135,168 parameters" in r.out


# -- Hugging Face: MBartForConditionalGeneration ---------------------------------------------------
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")


def hf_mbart(tie: bool, activation: str = "gelu"):
    torch.manual_seed(0)
    cfg = transformers.MBartConfig(
        vocab_size=VOCAB, max_position_embeddings=40, d_model=32, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=80, decoder_ffn_dim=80,
        activation_function=activation, tie_word_embeddings=tie, dropout=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2,
    )
    model = transformers.MBartForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def hf_logits(hf, src, mask, tgt) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits


@needs_transformers
@pytest.mark.parametrize("tie, activation", [(True, "gelu"), (False, "gelu_new")])
def test_hf_to_lmforge_logits_match(tmp_path, tie, activation):
    hf = hf_mbart(tie, activation)
    hf.save_pretrained(tmp_path / "hf")
    model, cfg = hf_seq2seq.load_hf_dir(tmp_path / "hf")
    assert cfg.tie_embeddings == tie and cfg.mlp == {"gelu": "gelu_exact", "gelu_new": "gelu"}[activation]
    # transformers >= 5 keeps an untied model's encoder and decoder tables apart: a separate source table.
    assert cfg.src_vocab_size == (0 if tie else VOCAB)
    src, mask, tgt = batch(cfg)
    ref = hf_logits(hf, src, mask, tgt)
    with torch.no_grad():
        ours, _ = model(src, tgt, mask)
        cache = model.new_cache(model.encode(src, mask), mask, max_len=tgt.shape[1])
        steps = torch.cat([model.decode(tgt[:, t:t + 1], cache=cache) for t in range(tgt.shape[1])], 1)
    assert max_diff(ours, ref) <= 1e-5
    assert max_diff(steps, ref) <= 1e-5


EXPORTABLE = {
    "tied": MBART_LIKE,
    "untied-tanh-gelu": UNTIED,
    "no-bias": dataclasses.replace(MBART_LIKE, name="s2s-nobias", bias=False),  # exported as zero biases
}


@needs_transformers
@pytest.mark.parametrize("kind", EXPORTABLE)
def test_export_reloads_in_transformers_with_identical_logits(tmp_path, kind):
    cfg = EXPORTABLE[kind]
    model = random_seq2seq(cfg)
    out = hf_seq2seq.save_hf_dir(model, cfg, tmp_path / "hf")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "MBartForConditionalGeneration"
    src, mask, tgt = batch(cfg)
    with torch.no_grad():
        ours = model(src, tgt, mask)[0]
    assert max_diff(hf_logits(hf, src, mask, tgt), ours) <= 1e-5
    # Every tensor transformers' model holds is in the file, and nothing else.
    written = set(load_file(str(out / "model.safetensors")))
    assert written <= set(hf.state_dict()) and {"model.shared.weight", "final_logits_bias"} <= written
    # And back through our own reader.
    again, again_cfg = hf_seq2seq.load_hf_dir(out)
    assert dataclasses.replace(again_cfg, name=cfg.name, bias=cfg.bias) == cfg
    with torch.no_grad():
        assert max_diff(again(src, tgt, mask)[0], ours) <= 1e-6


@needs_transformers
def test_state_dict_round_trip_is_exact():
    hf = hf_mbart(True)
    cfg = hf_seq2seq.config_from_hf(hf.config.to_dict())
    ours = hf_seq2seq.state_dict_from_hf(hf.state_dict(), cfg)
    back = hf_seq2seq.state_dict_to_hf(ours, cfg)
    for k, v in back.items():
        if k.endswith("embed_positions.weight"):  # mBART never reads its first two rows; ours are zeros
            v, k_rows = v[2:], hf.state_dict()[k][2:]
            assert torch.equal(v, k_rows), k
        else:
            assert torch.equal(v, hf.state_dict()[k]), k
    fresh = transformers.MBartForConditionalGeneration(hf.config)
    result = fresh.load_state_dict(back, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight", "model.encoder.embed_tokens.weight",
                                        "model.decoder.embed_tokens.weight"}  # tied to model.shared


def test_unexportable_settings_are_refused_in_one_line():
    with pytest.raises(LmforgeError) as e:
        hf_seq2seq.check_exportable(LLAMA_LIKE)
    msg = str(e.value)
    assert "\n" not in msg and "cannot be exported as MBartForConditionalGeneration" in msg
    for part in ("norm=rmsnorm", "mlp=swiglu", "position=rope", "n_kv_head=2 != n_head=6", "src_vocab_size=53"):
        assert part in msg
    with pytest.raises(LmforgeError, match="norm_eps=1e-06"):
        hf_seq2seq.check_exportable(dataclasses.replace(MBART_LIKE, norm_eps=1e-6))
    d = hf_seq2seq.config_to_hf(MBART_LIKE)
    with pytest.raises(LmforgeError, match="scale_embedding=True"):
        hf_seq2seq.config_from_hf({**d, "scale_embedding": True})
    with pytest.raises(LmforgeError, match="encoder_ffn_dim != decoder_ffn_dim"):
        hf_seq2seq.config_from_hf({**d, "decoder_ffn_dim": 64})
    sd = hf_seq2seq.state_dict_to_hf(random_seq2seq(MBART_LIKE).state_dict(), MBART_LIKE)
    sd["final_logits_bias"] = torch.ones(1, VOCAB)
    with pytest.raises(LmforgeError, match="final_logits_bias is not zero"):
        hf_seq2seq.state_dict_from_hf(sd, MBART_LIKE)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, tokenizer, HF folder): an untied model (a tied random one repeats its start token,
    which is eos here) with a trained BPE tokenizer, exported."""
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    text = ["an exported model translates in transformers", "hello world, hello lmforge"] * 30
    tok = train_tokenizer(text, TokenizerTrainConfig(vocab_size=280, min_frequency=1), show_progress=False)
    cfg = dataclasses.replace(UNTIED, vocab_size=tok.vocab_size, block_size=64)
    model = random_seq2seq(cfg, seed=5)
    out = save_model_dir(model, tmp_path_factory.mktemp("s2s") / "model", tokenizer=tok)
    return model, tok, out


@needs_transformers
def test_translation_pipeline_matches_our_greedy_decode(exported, tmp_path):
    from lmforge.interop.convert import convert

    model, tok, model_dir = exported
    convert(model_dir, tmp_path / "hf", "hf")  # `lmforge convert --to hf` dispatches on the family
    hf_dir = tmp_path / "hf"
    start = json.loads((hf_dir / "generation_config.json").read_text())["decoder_start_token_id"]
    assert start == json.loads((hf_dir / "config.json").read_text())["decoder_start_token_id"] == tok.bos_id
    texts, n = ["hello world", "an exported model translates"], 10
    try:
        pipe = transformers.pipeline("translation", model=str(hf_dir))
    except KeyError as e:  # transformers >= 5 removed it; what it ran, step by step:
        assert "removed" in str(e)
        hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval()
        enc = hf_tok(texts, return_tensors="pt", padding=True)
        generated = [row.tolist() for row in hf.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=n)]
    else:
        results = pipe(texts, do_sample=False, num_beams=1, max_new_tokens=n, return_tensors=True)
        generated = [r["translation_token_ids"].tolist() for r in results]
    for text, hf_ids in zip(texts, generated):
        ours = model.greedy_decode(torch.tensor([tok.encode(text)]), start_id=start, max_new_tokens=n,
                                   eos_id=tok.eos_id)[0].tolist()
        assert len(ours) == n + 1 and len(set(ours)) > 3  # a real sequence, not eos at once
        assert hf_ids[: len(ours)] == ours
    # The padded batch through our model gives the same tokens as one at a time.
    src = [tok.encode(t) for t in texts]
    S = max(map(len, src))
    ids = torch.tensor([s + [tok.pad_id] * (S - len(s)) for s in src])
    mask = torch.tensor([[True] * len(s) + [False] * (S - len(s)) for s in src])
    assert model.greedy_decode(ids, mask, start_id=start, max_new_tokens=n).tolist() == [g[: n + 1] for g in generated]


def test_convert_round_trip_and_refusals(exported, tmp_path, cli):
    model, tok, model_dir = exported
    assert cli("convert", model_dir, tmp_path / "hf", "--to", "hf").code == 0
    r = cli("convert", tmp_path / "hf", tmp_path / "back", "--to", "lmforge")
    assert r.code == 0, r.err
    back, cfg = load_model_dir(tmp_path / "back")
    assert type(back) is Seq2Seq and cfg.tie_embeddings is False
    assert json.loads((tmp_path / "back" / "generation.json").read_text())["decoder_start_token_id"] == tok.bos_id
    src = torch.tensor([tok.encode("hello world")])
    tgt = torch.tensor([[tok.bos_id, 5, 6]])
    with torch.no_grad():
        assert max_diff(back(src, tgt)[0], model(src, tgt)[0]) <= 1e-6
    r = cli("convert", model_dir, tmp_path / "m.gguf", "--to", "gguf")
    assert r.code != 0 and "cannot be written as GGUF" in r.err


def test_gpt_refuses_an_encoder_decoder_config():
    with pytest.raises(LmforgeError, match="is an encoder-decoder: it builds a Seq2Seq"):
        GPT(MBART_LIKE)
