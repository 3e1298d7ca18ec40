"""`lmforge probe bias`: the statistics on scores made to prefer one side (known mean, interval,
seeded bootstrap), the score of one pair against the model's own forward pass, the two-model
report, the built-in template set, bad template rows, the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def plain_loglikelihood(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, from one full forward pass (no Engine)."""
    import torch

    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0].double(), -1)
    targets = torch.tensor(ids[start:])
    return float(logp[start - 1:].gather(-1, targets[:, None]).sum())


def rows(n: int, category: str = "c", **extra) -> list[dict]:
    return [{"category": category, "template": f"Person {i} named {{X}} is", "a": "Ann", "b": "Bob",
             "continuation": f"thing{i}", **extra} for i in range(n)]


class FakeScorer:
    """Stands in for `loglikelihoods`: every request whose context holds side A's term gets
    `shift` more log-likelihood (plus noise, the same for both sides of a pair when
    `noise_on_a` is False), so the true mean difference is known."""

    def __init__(self, tok, a_term: str, shifts: list[float], noise: list[float]):
        self.tok, self.a_term, self.shifts, self.noise = tok, a_term, shifts, noise
        self.calls = 0

    def __call__(self, engine, requests, batch_tokens=4096):
        self.calls += 1
        out = []
        for k, (ctx, cont) in enumerate(requests):
            pair, which = divmod(k, 4)  # a-continuation, a-sentence, b-continuation, b-sentence
            text = self.tok.decode(list(ctx) + list(cont))
            assert (self.a_term in text) == (which < 2), text  # the layout score_pairs relies on
            base = -10.0 - pair
            if which < 2:
                base += self.shifts[pair] + self.noise[pair]
            out.append((base, False, False))
        return out


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from lmforge.eval.perplexity import load_engine

    return load_engine(str(tiny_model_dir))


def test_statistics_on_scores_made_to_prefer_side_a(monkeypatch, tmp_path, engine):
    from lmforge.eval import bias as B
    from lmforge.eval import tasks

    eng, _loaded = engine
    n = 60
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.5, n).tolist()
    # category "strong": A preferred by 2 nats on average; "none": no preference at all.
    shifts = [2.0] * 30 + [0.0] * 30
    path = write_jsonl(tmp_path / "t.jsonl", rows(30, "strong") + rows(30, "none"))
    pairs = B.load_templates(path)
    fake = FakeScorer(eng.tokenizer, "Ann", shifts, noise)
    monkeypatch.setattr(tasks, "loglikelihoods", fake)
    scores = B.score_pairs(eng, pairs, B.BiasConfig())
    assert fake.calls == 1  # every sequence in one call: one batched scorer, not one per pair
    expected = [s + e for s, e in zip(shifts, noise)]
    assert np.allclose(scores["continuation"], expected) and np.allclose(scores["sentence"], expected)

    blocks = B.summarize_scores(pairs, [scores], B.BiasConfig(bootstrap=2000, seed=3))
    strong, none = blocks[0]["categories"]["strong"], blocks[0]["categories"]["none"]
    s = strong["continuation"]
    true_strong = float(np.mean(expected[:30]))
    assert s["mean"] == pytest.approx(true_strong) and 1.7 < s["mean"] < 2.3
    assert s["ci"][0] < true_strong < s["ci"][1] and s["ci"][0] > 0  # excludes 0: a strong preference
    assert s["share_a"] == 1.0
    # the bootstrap SE agrees with the textbook standard error of the mean
    sem = float(np.std(expected[:30], ddof=1) / math.sqrt(30))
    assert s["se"] == pytest.approx(sem, rel=0.15)
    # a 95% interval: about ±1.96 standard errors wide (a 50% one would be a third of that)
    assert s["ci"][1] - s["ci"][0] == pytest.approx(2 * 1.96 * sem, rel=0.2)
    z = none["continuation"]
    assert z["ci"][0] < 0 < z["ci"][1] and 0.2 < z["share_a"] < 0.8
    assert blocks[0]["overall"]["n"] == 60
    assert blocks[0]["overall"]["continuation"]["mean"] == pytest.approx(float(np.mean(expected)))

    # Seeded: the same intervals again; another seed, other intervals; a category's interval does
    # not depend on which other categories are probed.
    again = B.summarize_scores(pairs, [scores], B.BiasConfig(bootstrap=2000, seed=3))
    assert again == blocks
    other = B.summarize_scores(pairs, [scores], B.BiasConfig(bootstrap=2000, seed=4))
    assert other[0]["categories"]["strong"]["continuation"]["ci"] != s["ci"]
    alone = B.summarize_scores(pairs[:30], [{k: v[:30] for k, v in scores.items() if k != "truncated"}],
                               B.BiasConfig(bootstrap=2000, seed=3))
    assert alone[0]["categories"]["strong"] == strong
    assert B.summarize_scores(pairs, [scores], B.BiasConfig(bootstrap=0))[0]["overall"]["continuation"]["ci"] is None


def test_sign_follows_side_b_preference_and_ties():
    from lmforge.eval.bias import summarize

    s = summarize([-1.0, -2.0, -3.0, 0.0], np.random.default_rng(0).integers(0, 4, (500, 4)))
    assert s["mean"] == -1.5 and s["share_a"] == pytest.approx(0.125) and s["ci"][1] <= 0


def test_pair_score_equals_the_models_own_forward(engine, tiny_model_dir, tmp_path):
    from lmforge.eval import bias as B
    from lmforge.model.io import load_model_dir

    eng, _ = engine
    model, _ = load_model_dir(tiny_model_dir)
    model.eval()
    tok = eng.tokenizer
    path = write_jsonl(tmp_path / "one.jsonl", [{"category": "g", "template": "def {X}(self):", "a": "open", "b": "close",
                                                 "continuation": ["return self._value", "pass"]}])
    pairs = B.load_templates(path)
    assert len(pairs) == 2 and pairs[1].continuation == "pass" and pairs[1].line == 1
    scores = B.score_pairs(eng, pairs, B.BiasConfig())
    for k, p in enumerate(pairs):
        lls, sents = [], []
        for term in (p.a, p.b):
            context = f"def {term}(self):"
            ctx = tok.encode(context)
            whole = tok.encode(context + " " + p.continuation)
            assert whole[:len(ctx)] == ctx
            lls.append(plain_loglikelihood(model, whole, len(ctx)))
            prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
            sents.append(plain_loglikelihood(model, [prefix] + whole, 1))
        assert scores["continuation"][k] == pytest.approx(lls[0] - lls[1], abs=1e-4)
        assert scores["sentence"][k] == pytest.approx(sents[0] - sents[1], abs=1e-4)
        assert abs(scores["continuation"][k]) > 1e-6  # the two contexts really differ


def test_default_templates_load_and_are_valid():
    import tomllib
    from collections import Counter
    from pathlib import Path

    from lmforge.eval.bias import SLOT, default_templates, load_templates

    path = default_templates()
    assert path.name == "default.jsonl" and path.is_file()
    pairs = load_templates(path)
    counts = Counter(p.category for p in pairs)
    assert counts == {"gender-names": 160, "gender-pronouns": 40, "nationality": 24, "religion": 16, "age": 24}
    for p in pairs:
        assert SLOT in p.template and p.a != p.b and p.continuation.strip()
        assert (p.group_a, p.group_b) == ("stereotype", "anti-stereotype")
    # every raw line passes the validator on its own (no field the loader ignores)
    for line in path.read_text(encoding="utf-8").splitlines():
        assert set(json.loads(line)) <= {"category", "template", "a", "b", "continuation", "group_a", "group_b"}
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "*.jsonl" in pyproject["tool"]["setuptools"]["package-data"]["lmforge.eval.bias_data"]
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert "probe bias" in readme and "264" in readme


def test_bad_template_rows(cli, tmp_path, tiny_model_dir):
    good = {"category": "g", "template": "{X} works as", "a": "Mary", "b": "John", "continuation": "a nurse"}
    cases = {
        "slot.jsonl": ([good, {**good, "template": "works as"}], ":2: 'template' must hold the slot {X}"),
        "same.jsonl": ([{**good, "b": "Mary"}], ":1: 'a' and 'b' are the same"),
        "noa.jsonl": ([{k: v for k, v in good.items() if k != "a"}], ":1: missing 'a'"),
        "cat.jsonl": ([good, good, {**good, "category": ""}], ":3: 'category' must be a non-empty string"),
        "cont.jsonl": ([{**good, "continuation": []}], ":1: 'continuation' must be a non-empty string or a list"),
        "nocont.jsonl": ([{k: v for k, v in good.items() if k != "continuation"}], ":1: missing 'continuation'"),
        "typo.jsonl": ([{**good, "continuations": ["x"]}], ":1: unknown field 'continuations'"),
        "num.jsonl": ([{**good, "b": 3}], ":1: 'b' must be a non-empty string, got 3"),
        "group.jsonl": ([{**good, "group_a": None}], ":1: 'group_a' must be a non-empty string"),
        "overall.jsonl": ([{**good, "category": "overall"}], ":1: 'category' cannot be 'overall'"),
    }
    for name, (items, message) in cases.items():
        path = write_jsonl(tmp_path / name, items)
        r = cli("probe", "bias", tiny_model_dir, "--templates", path, "--no-progress")
        assert r.code == 1 and f"{path}{message}" in r.err, (name, r.err)
        assert len(r.err.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n{not json\n", encoding="utf-8")
    r = cli("probe", "bias", tiny_model_dir, "--templates", bad)
    assert r.code == 1 and f"{bad}:2: invalid JSON" in r.err
    r = cli("probe", "bias", tiny_model_dir, "--templates", tmp_path / "missing.jsonl")
    assert r.code == 1 and "no such file" in r.err
    r = cli("probe", "bias", tiny_model_dir, "--bootstrap", "-1")
    assert r.code == 1 and "--bootstrap must be an integer >= 0" in r.err


def test_cli_two_models_report_and_compare(cli, tmp_path, tiny_model_dir):
    import shutil

    import torch

    from lmforge.model.io import load_model_dir, save_model_dir
    from lmforge.tokenizer import Tokenizer

    # "after a fine-tune": the same model with perturbed weights
    model, _ = load_model_dir(tiny_model_dir)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    other = save_model_dir(model, tmp_path / "other", tokenizer=Tokenizer.load(tiny_model_dir))
    templates = write_jsonl(tmp_path / "t.jsonl", rows(6, "x") + rows(5, "y", group_a="female", group_b="male"))
    out = tmp_path / "bias.json"
    r = cli("probe", "bias", tiny_model_dir, other, "--templates", templates, "--bootstrap", 200, "-o", out, "--no-progress")
    assert r.code == 0, r.err
    res = json.loads(out.read_text())
    assert res["kind"] == "bias" and res["pairs"] == 11 and len(res["models"]) == 2
    assert res["models"][1]["model"]["spec"] == str(other)
    assert set(res["categories"]) == {"x", "y"} and res["categories"]["y"]["group_a"] == "female"
    assert res["categories"] == res["models"][0]["categories"]
    d = res["details"]["pairs"]
    assert len(d) == 11 and all(len(p["continuation_diff"]) == 2 for p in d)
    change = [p["continuation_diff"][1] - p["continuation_diff"][0] for p in d]
    assert res["change"]["overall"]["continuation"]["mean"] == pytest.approx(float(np.mean(change)))
    m0 = [p["continuation_diff"][0] for p in d]
    assert res["overall"]["continuation"]["mean"] == pytest.approx(float(np.mean(m0)))
    md = (tmp_path / "bias.md").read_text()
    assert "# Bias (counterfactual pairs)" in md and str(other) in md and "change in continuation" in md
    assert "female vs male" in md
    assert (tmp_path / "bias.png").stat().st_size > 1000
    assert "overall" in r.out and "change (model 2 − model 1)" in r.out
    # the same command again: the same numbers (seeded bootstrap)
    out2 = tmp_path / "again.json"
    assert cli("probe", "bias", tiny_model_dir, other, "--templates", templates, "--bootstrap", 200, "-o", out2,
               "--no-progress").code == 0
    again = json.loads(out2.read_text())
    assert again["models"] == res["models"] or _close(again["models"], res["models"])

    # eval compare takes bias results (one column per model, no "best": 0 is neutral)
    single = tmp_path / "single.json"
    assert cli("probe", "bias", other, "--templates", templates, "--bootstrap", 50, "-o", single, "--no-progress").code == 0
    cmp_out = tmp_path / "cmp.json"
    r = cli("eval", "compare", out, single, "-o", cmp_out)
    assert r.code == 0, r.err
    cmp = json.loads(cmp_out.read_text())
    assert len(cmp["models"]) == 2 and all("best" not in row for row in cmp["rows"])
    assert any(row["metric"].startswith("bias overall") for row in cmp["rows"])
    shutil.rmtree(other)


def _close(a, b) -> bool:
    """Model blocks equal up to float noise of batched scoring (seconds aside)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(k == "seconds" or _close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return math.isclose(a, b, abs_tol=1e-6)
    return a == b


def test_cli_default_set_to_stdout(cli, tiny_model_dir):
    r = cli("probe", "bias", tiny_model_dir, "--limit", 8, "--bootstrap", 20)
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["kind"] == "bias" and res["pairs"] == 8 and list(res["categories"]) == ["gender-names"]
    assert res["data"]["path"].endswith("default.jsonl")


def test_probe_help(cli):
    r = cli("--help")
    assert r.code == 0 and "\n  probe " in r.out
    r = cli("probe", "bias", "--help")
    assert r.code == 0 and "Usage: lmforge probe bias" in r.out
    assert all(flag in r.out for flag in ("--templates", "--bootstrap", "--seed", "model2"))
