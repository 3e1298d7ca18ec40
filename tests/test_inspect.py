"""`lmforge inspect`: the attention maps are the weights the model computes (recomputed here from
each layer's own q and k: RoPE, grouped-query heads, causal and padding masks; decoder-only and
encoder-decoder, cross-attention included), the logit lens ends in the model's own output, the
per-token loss is `eval ppl`'s, the pages are self-contained, and bad input is one line."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess

import pytest
import torch

from conftest import random_model, random_seq2seq

from lmforge.model.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA = ModelConfig(name="inspect-llama", vocab_size=71, block_size=40, n_layer=3, n_head=6, n_kv_head=2, n_embd=48,
                    intermediate_size=64)  # rope, rmsnorm, swiglu, grouped-query attention (3 queries per kv head)
GPT2 = ModelConfig(name="inspect-gpt2", vocab_size=71, block_size=40, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
                   intermediate_size=64, norm="layernorm", mlp="gelu", position="learned", bias=True)
S2S = ModelConfig(name="inspect-s2s", arch="encoder-decoder", vocab_size=71, block_size=40, n_encoder_layer=2,
                  n_layer=3, n_head=6, n_kv_head=2, n_embd=48, intermediate_size=64, position="rope")
S2S_LEARNED = dataclasses.replace(S2S, name="inspect-s2s-mbart", n_head=4, n_kv_head=4, norm="layernorm",
                                  mlp="gelu_exact", position="learned", bias=True)


# -- an independent recomputation ------------------------------------------------------------------
def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """HF Llama's rotary embedding written out: x [B, T, heads, hd], positions 0..T-1."""
    T, hd = x.shape[1], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _manual(q: torch.Tensor, k: torch.Tensor, causal: bool, kv_of=lambda h, g: h // g) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per query head; q [T, H, d], k [S, Hkv, d] -> [H, T, S]."""
    T, H, d = q.shape
    S, Hkv, _ = k.shape
    out = []
    for h in range(H):
        kh = k[:, kv_of(h, H // Hkv)]
        scores = q[:, h] @ kh.T / math.sqrt(d)
        if causal:
            scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.softmax(scores, dim=-1))
    return torch.stack(out)


class _Outputs:
    """The outputs of the given modules in one forward (forward hooks), by name."""

    def __init__(self, modules: dict):
        self.seen: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._keep(name)) for name, m in modules.items()]

    def _keep(self, name):
        def hook(mod, args, out):
            self.seen[name] = out[0].detach().float()
        return hook

    def __enter__(self):
        return self.seen

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _self_qk(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused projection's output [T, (H + 2 Hkv) hd] -> q [T, H, hd], k [T, Hkv, hd], RoPE applied."""
    T, H, Hkv, hd = qkv.shape[0], cfg.n_head, cfg.n_kv_head, cfg.head_dim
    parts = qkv.view(T, H + 2 * Hkv, hd)
    q, k = parts[:, :H], parts[:, H : H + Hkv]
    if cfg.position == "rope":
        q, k = _rope(q[None], cfg.rope_theta)[0], _rope(k[None], cfg.rope_theta)[0]
    return q, k


def _inputs(ids, src=None):
    from lmforge.inspect.inputs import Inputs

    return Inputs(list(ids), [str(i) for i in ids], None if src is None else list(src),
                  None if src is None else [str(i) for i in src])


# -- attention ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama-gqa-rope", "gpt2-learned"])
def test_decoder_attention_maps_are_the_weights_the_model_computes(cfg):
    from lmforge.inspect.capture import capture_attention

    model = random_model(cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (17,), generator=torch.Generator().manual_seed(1)).tolist()
    with _Outputs({f"{i}": b.attn.qkv for i, b in enumerate(model.blocks)}) as qkv:
        maps, logits = capture_attention(model, _inputs(ids))
    assert set(maps) == {"self"} and list(maps["self"]) == list(range(cfg.n_layer))
    for i, probs in maps["self"].items():
        assert probs.shape == (cfg.n_head, 17, 17)
        torch.testing.assert_close(probs.sum(-1), torch.ones(cfg.n_head, 17), atol=1e-5, rtol=0)
        lower = torch.ones(17, 17, dtype=torch.bool).tril()
        assert bool((probs[:, ~lower] == 0).all()) and bool((probs[:, lower] > 0).all())  # causal, nothing else masked
        q, k = _self_qk(qkv[f"{i}"], cfg)
        torch.testing.assert_close(probs, _manual(q, k, causal=True), atol=1e-5, rtol=1e-4)
        if cfg.n_kv_head != cfg.n_head:  # the check tells grouped-query layouts apart
            assert not torch.allclose(probs, _manual(q, k, True, kv_of=lambda h, g: h % cfg.n_kv_head), atol=1e-3)
    # Only the layers asked for record; the others keep their kernels.
    only, _ = capture_attention(model, _inputs(ids), {"self": [1]})
    # Layer 0 then runs its fused kernel, not the explicit softmax: layer 1's input agrees to rounding.
    assert list(only["self"]) == [1]
    torch.testing.assert_close(only["self"][1], maps["self"][1], atol=1e-6, rtol=1e-5)
    # The recorded forward is the model's forward: the same logits as without recording.
    with torch.inference_mode():
        plain, _ = model(torch.tensor([ids]))
    torch.testing.assert_close(logits, plain[0], atol=1e-5, rtol=1e-5)
    assert all(getattr(b.attn, "record_probs") is None for b in model.blocks)  # switched off again


@pytest.mark.parametrize("cfg", [S2S, S2S_LEARNED], ids=["gqa-rope", "mbart-learned"])
def test_encoder_decoder_maps_self_and_cross_attention(cfg):
    from lmforge.inspect.capture import capture_attention

    model = random_seq2seq(cfg, seed=4)
    g = torch.Generator().manual_seed(2)
    src = torch.randint(0, cfg.vocab_size, (13,), generator=g).tolist()
    tgt = torch.randint(0, cfg.vocab_size, (9,), generator=g).tolist()
    hooks = {f"enc{i}": b.attn.qkv for i, b in enumerate(model.encoder.blocks)}
    hooks |= {f"dec{i}": b.attn.qkv for i, b in enumerate(model.decoder.blocks)}
    hooks |= {f"xq{i}": b.cross_attn.q for i, b in enumerate(model.decoder.blocks)}
    hooks |= {f"xkv{i}": b.cross_attn.kv for i, b in enumerate(model.decoder.blocks)}
    with _Outputs(hooks) as out:
        maps, logits = capture_attention(model, _inputs(tgt, src))
    assert [len(maps[k]) for k in ("encoder", "decoder", "cross")] == [2, 3, 3]
    H, Hkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    for i, probs in maps["encoder"].items():  # both ways: no zeros
        assert probs.shape == (H, 13, 13) and bool((probs > 0).all())
        q, k = _self_qk(out[f"enc{i}"], cfg)
        torch.testing.assert_close(probs, _manual(q, k, causal=False), atol=1e-5, rtol=1e-4)
    for i, probs in maps["decoder"].items():
        assert probs.shape == (H, 9, 9) and bool((probs.triu(1) == 0).all())
        q, k = _self_qk(out[f"dec{i}"], cfg)
        torch.testing.assert_close(probs, _manual(q, k, causal=True), atol=1e-5, rtol=1e-4)
    for i, probs in maps["cross"].items():  # decoder queries over the source: no positions, no mask
        assert probs.shape == (H, 9, 13)
        torch.testing.assert_close(probs.sum(-1), torch.ones(H, 9), atol=1e-5, rtol=0)
        q = out[f"xq{i}"].view(9, H, hd)
        k = out[f"xkv{i}"].view(13, 2 * Hkv, hd)[:, :Hkv]
        torch.testing.assert_close(probs, _manual(q, k, causal=False), atol=1e-5, rtol=1e-4)
    with torch.inference_mode():
        plain, _ = model(torch.tensor([src]), torch.tensor([tgt]))
    torch.testing.assert_close(logits, plain[0], atol=1e-5, rtol=1e-5)


def test_recorded_padding_mask_matches_sdpa():
    """A padded encoder batch through the recording path gives the fused path's memory, and the
    padding keys get zero weight."""
    from lmforge.inspect.capture import record_attention

    model = random_seq2seq(S2S, seed=5)
    src = torch.randint(0, S2S.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.inference_mode():
        plain = model.encode(src, mask)
        with record_attention(model) as maps:
            recorded = model.encode(src, mask)
    torch.testing.assert_close(recorded[mask], plain[mask], atol=1e-5, rtol=1e-5)
    probs = maps["encoder"][0][0]  # [B, H, T, S]
    assert bool((probs[1, :, :, 5:] == 0).all()) and bool((probs[0] > 0).all())


# -- the logit lens -------------------------------------------------------------------------------
def test_logit_lens_ends_in_the_models_output(tiny_model_dir):
    from lmforge.inspect.lens import logit_lens
    from lmforge.interop.registry import load_model

    loaded = load_model(tiny_model_dir)
    model = loaded.model
    text = "def main(argv):\n    return 0"
    lens = logit_lens(loaded, text, top=5)
    ids = loaded.tokenizer.encode(text)
    T, L = len(ids), model.config.n_layer
    assert lens.top_ids.shape == lens.top_probs.shape == (L + 1, T, 5) and lens.row_names[-1] == f"block {L - 1}"
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids]))
        probs = torch.softmax(logits[0].float(), -1)
        want_p, want_ids = probs.topk(5, -1)
        assert torch.equal(lens.top_ids[-1], want_ids)
        torch.testing.assert_close(lens.top_probs[-1], want_p, atol=1e-5, rtol=0)
        # The first row: the embeddings through the final norm and head; a middle row: block by block.
        x = model.tok_emb(torch.tensor([ids]))
        first = torch.softmax(model.lm_head(model.norm_f(x))[0].float(), -1).topk(5, -1)
        assert torch.equal(lens.top_ids[0], first.indices)
        rope = (model.rope_cos[:T].unsqueeze(1), model.rope_sin_signed[:T].unsqueeze(1))
        x = model.blocks[0](x, rope, None, None, 0)
        second = torch.softmax(model.lm_head(model.norm_f(x))[0].float(), -1).topk(5, -1)
        assert torch.equal(lens.top_ids[1], second.indices)
        torch.testing.assert_close(lens.top_probs[1], second.values, atol=1e-5, rtol=0)
    assert not torch.equal(lens.top_ids[0], lens.top_ids[-1])  # the rows differ: the check can fail
    assert lens.top_texts[-1][0][0] == loaded.tokenizer.token_bytes(int(want_ids[0, 0])).decode("utf-8", "replace")


def test_logit_lens_of_an_encoder_decoder_reads_the_decoder_stream(tmp_path):
    from lmforge.inspect.lens import logit_lens

    model = random_seq2seq(S2S, seed=6)
    loaded = _FakeLoaded(model)
    lens = logit_lens(loaded, "abc", source="hello", top=3)
    src, tgt = lens.inputs.src_ids, lens.inputs.ids
    assert tgt[0] == loaded.tokenizer.bos_id and lens.top_ids.shape == (S2S.n_layer + 1, len(tgt), 3)
    with torch.inference_mode():
        logits, _ = model(torch.tensor([src]), torch.tensor([tgt]))
    want = torch.softmax(logits[0], -1).topk(3, -1)
    assert torch.equal(lens.top_ids[-1], want.indices)
    torch.testing.assert_close(lens.top_probs[-1], want.values, atol=1e-5, rtol=0)


class _CharTokenizer:
    """Enough of lmforge.tokenizer.Tokenizer for in-memory tests: one token per character."""

    bos_id, eos_id, pad_id = 1, 2, None

    def encode(self, text):
        return [3 + (ord(c) % 60) for c in text]

    def token_bytes(self, i):
        return chr(i - 3 + 64).encode() if i >= 3 else b"<s>"


class _FakeLoaded:
    def __init__(self, model):
        self.model, self.tokenizer, self.generation = model, _CharTokenizer(), {}


# -- per-token loss -------------------------------------------------------------------------------
def test_inspect_loss_is_eval_ppl_token_by_token(cli, tmp_path, tiny_model_dir, stdlib_texts):
    from lmforge.eval.perplexity import PerplexityConfig, evaluate_perplexity
    from lmforge.inspect.loss import inspect_loss

    text = stdlib_texts[5][:1500]
    f = tmp_path / "doc.py"
    f.write_text(text, encoding="utf-8")
    config = PerplexityConfig(context=48, stride=20)
    tl = inspect_loss(str(tiny_model_dir), f, tmp_path / "loss.html", config)
    ref = evaluate_perplexity(str(tiny_model_dir), f, config)
    assert tl.result.windows > 3  # a long file, many windows
    assert tl.result.perplexity == ref["perplexity"] and tl.result.tokens == ref["tokens"]
    assert tl.loss[0] is None and all(v is not None for v in tl.loss[1:])  # stride < context: all but the first
    assert math.fsum(tl.loss[1:]) == pytest.approx(ref["total_nll"], rel=1e-9)
    assert "".join(tl.texts) == text  # the pieces join to the text

    # Inside the first window, each token's loss and top prediction from one plain forward.
    from lmforge.interop.registry import load_model

    loaded = load_model(tiny_model_dir)
    with torch.inference_mode():
        logits, _ = loaded.model(torch.tensor([tl.ids[:48]]))
    logp = torch.log_softmax(logits[0].float(), -1)
    for pos in range(1, 48):
        assert tl.loss[pos] == pytest.approx(-float(logp[pos - 1, tl.ids[pos]]), abs=1e-4)
        assert tl.top_ids[pos] == int(logp[pos - 1].argmax())
        assert tl.top_probs[pos] == pytest.approx(float(logp[pos - 1].max().exp()), abs=1e-5)

    # The CLI: the same perplexity, printed and on the page.
    r = cli("inspect", "loss", tiny_model_dir, f, "--context", 48, "--stride", 20, "-o", tmp_path / "cli.html",
            "--no-progress")
    assert r.code == 0, r.err
    assert f"perplexity {ref['perplexity']:.4f}" in r.out
    page = (tmp_path / "cli.html").read_text(encoding="utf-8")
    assert f"{ref['perplexity']:.4f}" in page and page.count('class="tok"') == len(tl.ids) - 1
    _self_contained(page)


# -- the CLI ---------------------------------------------------------------------------------------
def _self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=", page)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def _png(path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_cli_writes_pngs_and_one_page(cli, tmp_path, tiny_model_dir):
    out = tmp_path / "att"
    r = cli("inspect", "attention", tiny_model_dir, "def f(x):\n    return x", "-o", out)
    assert r.code == 0, r.err
    assert sorted(p.name for p in out.iterdir()) == ["attention-layer0.png", "attention-layer1.png", "attention.html"]
    for p in out.glob("*.png"):
        _png(p)
    page = (out / "attention.html").read_text(encoding="utf-8")
    _self_contained(page)
    data = json.loads(re.search(r'id="attention-data">(.*?)</script>', page, re.S).group(1))
    (kind,) = data["kinds"]
    assert kind["kind"] == "self" and kind["layers"] == [0, 1] and data["heads"] == [0, 1, 2, 3]
    w = torch.tensor(kind["w"], dtype=torch.float32) / data["scale"]  # [layers, heads, T, T]
    T = len(data["tokens"]["tgt"])
    assert w.shape == (2, 4, T, T) and bool((w.triu(1) == 0).all())
    assert (w.sum(-1) - 1).abs().max() < 0.01 * T  # thousandths, rounded per weight
    _run_page_script(page)

    one = tmp_path / "one"
    text = "hello </script><b>world</b>"  # markup in the text stays text
    r = cli("inspect", "attention", tiny_model_dir, text, "--layer", -1, "--head", 2, "-o", one)
    assert r.code == 0, r.err
    assert sorted(p.name for p in one.iterdir()) == ["attention-layer1.png", "attention.html"]
    page = (one / "attention.html").read_text(encoding="utf-8")
    assert page.count("</script>") == 2 and "<b>" not in page
    data = json.loads(re.search(r'id="attention-data">(.*?)</script>', page, re.S).group(1))
    assert data["heads"] == [2] and data["kinds"][0]["layers"] == [1] and "".join(data["tokens"]["tgt"]) == text


def test_inspect_help_through_typer():
    from typer.testing import CliRunner

    from lmforge.cli import app

    r = CliRunner().invoke(app, ["inspect", "--help"])
    assert r.exit_code == 0 and all(c in r.output for c in ("attention", "logit-lens", "loss"))
    r = CliRunner().invoke(app, ["inspect", "attention", "--help"])
    assert r.exit_code == 0 and "--layer" in r.output and "--source" in r.output


def test_attention_and_lens_cli_on_an_encoder_decoder(cli, tmp_path, stdlib_texts):
    from lmforge.model.io import save_model_dir
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    tok = train_tokenizer(stdlib_texts[:5], TokenizerTrainConfig(vocab_size=300), show_progress=False)
    model = random_seq2seq(dataclasses.replace(S2S, vocab_size=tok.vocab_size), seed=7)
    model_dir = save_model_dir(model, tmp_path / "s2s", tokenizer=tok)
    out = tmp_path / "att"
    r = cli("inspect", "attention", model_dir, "la maison", "--source", "the house", "--layer", 1, "-o", out)
    assert r.code == 0, r.err
    assert sorted(p.name for p in out.iterdir()) == ["attention-cross-layer1.png", "attention-decoder-layer1.png",
                                                     "attention-encoder-layer1.png", "attention.html"]
    page = (out / "attention.html").read_text(encoding="utf-8")
    _self_contained(page)
    data = json.loads(re.search(r'id="attention-data">(.*?)</script>', page, re.S).group(1))
    assert [k["kind"] for k in data["kinds"]] == ["encoder", "decoder", "cross"]
    cross = torch.tensor(data["kinds"][2]["w"])
    assert cross.shape == (1, S2S.n_head, len(data["tokens"]["tgt"]), len(data["tokens"]["src"]))
    _run_page_script(page)

    r = cli("inspect", "logit-lens", model_dir, "la maison", "--source", "the house", "-o", tmp_path / "lens")
    assert r.code == 0, r.err
    _png(tmp_path / "lens" / "logit-lens.png")

    r = cli("inspect", "attention", model_dir, "la maison", "-o", tmp_path / "x")  # no source
    assert r.code == 1 and "--source" in r.err
    r = cli("inspect", "attention", model_dir, "la maison", "--source", "the house", "--layer", 2, "-o", tmp_path / "y")
    assert r.code == 0, r.err  # the decoder has a layer 2, the encoder not: only the decoder's maps
    assert sorted(p.name for p in (tmp_path / "y").glob("*.png")) == ["attention-cross-layer2.png",
                                                                       "attention-decoder-layer2.png"]


def test_logit_lens_cli_writes_table_csv_and_heat_map(cli, tmp_path, tiny_model_dir):
    out = tmp_path / "lens"
    r = cli("inspect", "logit-lens", tiny_model_dir, "import os\nimport sys", "--top", 3, "-o", out)
    assert r.code == 0, r.err
    _png(out / "logit-lens.png")
    import csv

    from lmforge.tokenizer import Tokenizer

    n_tokens = len(Tokenizer.load(tiny_model_dir).encode("import os\nimport sys"))
    with open(out / "logit-lens.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * n_tokens * 3  # (embeddings + 2 blocks) x tokens x top 3
    assert {r["input_token"] for r in rows} >= {"\n"} and {r["rank"] for r in rows} == {"1", "2", "3"}
    md = (out / "logit-lens.md").read_text(encoding="utf-8")
    assert md.count("\n| block ") == 2 and "| embeddings |" in md
    assert md.splitlines()[4].count(" | ") == n_tokens  # the header: layer + a column per token


def _run_page_script(page: str) -> None:
    """Run the page's script under node with a small DOM stand-in: it must build the controls,
    render, and answer a hover without throwing (skipped without node)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's script is not run")
    script = re.search(r"<script>\n(.*?)\n</script>", page, re.S).group(1)
    data = re.search(r'id="attention-data">(.*?)</script>', page, re.S).group(1)
    dom = """
class El { constructor(id) { this.id = id; this.children = []; this.style = {}; this.dataset = {}; this.value = "0";
  this._html = ""; this.textContent = ""; const cl = new Set(); this.classList = {add: (c) => cl.add(c), remove: (c) => cl.delete(c)}; }
  set innerHTML(v) { this.children = []; } get innerHTML() { return ""; }
  appendChild(c) { this.children.push(c); if (this.id === "select" && this.children.length === 1) this.value = c.value; return c; }
  getContext() { const f = () => {}; return {fillRect: f, strokeRect: f, fillText: f, save: f, restore: f, translate: f, rotate: f}; }
  getBoundingClientRect() { return {top: 0, left: 0}; } }
const els = {};
globalThis.document = {
  getElementById: (id) => els[id] || (els[id] = Object.assign(new El(id), id === "attention-data" ? {textContent: DATA} : {})),
  createElement: (tag) => new El(tag), createTextNode: (t) => new El("#text") };
"""
    check = """
const keys = els["keys"].children.filter((c) => c.onmouseenter || c.dataset.i !== undefined);
const q = (els["queries"].children.length ? els["queries"] : els["keys"]).children.filter((c) => c.onmouseenter);
if (!q.length) throw new Error("no hoverable tokens");
q[q.length - 1].onmouseenter();
if (!els["info"].textContent.includes("attends to")) throw new Error("hover shows nothing: " + els["info"].textContent);
els["head"].value = "mean"; els["head"].onchange();
els["kind"].value = String(JSON.parse(DATA).kinds.length - 1); els["kind"].onchange();
els["matrix"].onmousemove({target: els["matrix"], clientX: 100, clientY: 100});  // past the labels: cell (0, 0)
if (!els["info"].textContent.startsWith("weight of key 0")) throw new Error("matrix hover: " + els["info"].textContent);
console.log("ok", keys.length);
"""
    program = f"const DATA = {json.dumps(data)};\n{dom}\n{script}\n{check}"
    res = subprocess.run([node, "-e", program], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-2000:]


# -- bad input ------------------------------------------------------------------------------------
def _one_line_error(r, *needles):
    assert r.code == 1, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), r.err
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input_is_one_line(cli, tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "o"
    from lmforge.inspect import attention

    monkeypatch.setattr(attention, "MAX_WEIGHTS", 1000)
    _one_line_error(cli("inspect", "attention", tiny_model_dir, "one two three four five six", "-o", out),
                    "too many", "--layer")
    monkeypatch.undo()
    _one_line_error(cli("inspect", "attention", tiny_model_dir, "", "-o", out), "empty")
    _one_line_error(cli("inspect", "logit-lens", tiny_model_dir, "", "-o", out), "empty")
    _one_line_error(cli("inspect", "attention", tiny_model_dir, "hi", "--layer", 2, "-o", out), "--layer 2", "0..1")
    _one_line_error(cli("inspect", "attention", tiny_model_dir, "hi", "--layer", -3, "-o", out), "out of range")
    _one_line_error(cli("inspect", "attention", tiny_model_dir, "hi", "--head", 4, "-o", out), "--head 4", "0..3")
    _one_line_error(cli("inspect", "attention", tiny_model_dir, "hi", "--source", "x", "-o", out), "decoder-only")
    _one_line_error(cli("inspect", "logit-lens", tiny_model_dir, "hi", "--top", 0, "-o", out), "--top")
    _one_line_error(cli("inspect", "attention", tiny_model_dir, "word " * 200, "-o", out), "context of 128")
    assert not out.exists()  # nothing written for refused input
    _one_line_error(cli("inspect", "attention", tmp_path / "nowhere", "hi", "-o", out))
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    _one_line_error(cli("inspect", "loss", tiny_model_dir, empty, "-o", tmp_path / "l.html", "--no-progress"))
    one = tmp_path / "one.txt"
    one.write_text("a", encoding="utf-8")
    _one_line_error(cli("inspect", "loss", tiny_model_dir, one, "-o", tmp_path / "l.html", "--no-progress"), "2 tokens")
    _one_line_error(cli("inspect", "loss", tiny_model_dir, one, "-o", tmp_path, "--no-progress"), "folder")
    assert not (tmp_path / "l.html").exists()
