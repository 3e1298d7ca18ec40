"""`lmforge recipe translation`: the recipe's core on a tiny synthetic Ding file (fast), the real
dictionary with a reduced budget (slow)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.recipes.translation import RecipeConfig, ensure_dictionary, run_recipe

DE = ["der Hund", "die Katze", "das Kind", "der Mann", "die Frau", "das Haus", "der Vogel", "die Stadt"]
EN = ["the dog", "the cat", "the child", "the man", "the woman", "the house", "the bird", "the city"]
VERB_DE = ["schläft", "läuft", "isst", "singt", "wartet"]
VERB_EN = ["sleeps", "runs", "eats", "sings", "waits"]
ADV_DE = ["heute", "gern", "oft", "nie", "hier", "dort", "jetzt", "bald", "immer", "leise"]
ADV_EN = ["today", "gladly", "often", "never", "here", "there", "now", "soon", "always", "quietly"]


def _ding(path: Path) -> Path:
    lines = ["# synthetic Ding-format dictionary for tests"]
    for i, (d, e) in enumerate(zip(DE, EN)):
        for j, (vd, ve) in enumerate(zip(VERB_DE, VERB_EN)):
            for k, (ad, ae) in enumerate(zip(ADV_DE, ADV_EN)):
                lines.append(f"{d.capitalize()} {vd} {ad}. :: {e.capitalize()} {ve} {ae}.")
    random.Random(0).shuffle(lines[1:])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _tiny(tmp_path: Path, **kw) -> RecipeConfig:
    return RecipeConfig(out=tmp_path / "out", ding_path=_ding(tmp_path / "de-en"), install=False, max_steps=4,
                        eval_every=2, batch_size=16, vocab_size=300, bleu_samples=4, test_limit=6, max_new_tokens=12, progress=False,
                        model_overrides={"n_embd": 32, "intermediate_size": 64, "n_encoder_layer": 1, "n_layer": 1,
                                         "n_head": 2, "n_kv_head": 2, "block_size": 32}, **kw)


def test_recipe_on_synthetic_ding(tmp_path):
    lines = []
    results = run_recipe(_tiny(tmp_path), echo=lines.append)
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(results))
    assert saved["direction"] == "de-en" and saved["data"]["pairs"] == 400
    assert set(saved["data"]["splits"]) == {"train", "val", "test"} and saved["data"]["filter"]["min_words"] == 3
    assert saved["training"]["steps"] == 4 and saved["model"]["params"] > 0
    for decoding in ("greedy", "beam4"):
        assert 0 <= saved["test"][decoding]["bleu"] <= 100 and saved["test"][decoding]["segments"] > 0
    assert [r["step"] for r in saved["bleu_curve"]] == [2, 4]
    assert all(isinstance(r["val_bleu"], float) for r in saved["bleu_curve"])
    # The decoder-only model of the same size, trained and scored the same way.
    twin = saved["decoder_only"]
    assert twin["status"] == "run" and twin["model"]["arch"] == "decoder" and twin["training"]["steps"] == 4
    assert abs(twin["model"]["params"] - saved["model"]["params"]) < 0.25 * saved["model"]["params"]
    assert twin["model"]["block_size"] == 2 * saved["model"]["block_size"]
    for decoding in ("greedy", "beam4"):
        assert 0 <= twin["test"][decoding]["bleu"] <= 100 and twin["test"][decoding]["segments"] > 0
    assert [r["step"] for r in twin["bleu_curve"]] == [2, 4]
    assert (out / "run-decoder-only" / "best" / "generation.json").is_file()
    assert (out / "bleu.png").read_bytes()[:4] == b"\x89PNG"
    assert any("kept 400 de-en sentence pairs" in line for line in lines)
    table = next(line for line in lines if "BLEU greedy" in line)  # the summary table: one row per model
    assert "| encoder-decoder |" in table and "| decoder-only |" in table


def test_phrase_pairs_join_training_but_never_touch_val_or_test(tmp_path):
    from lmforge.data.ding import DingConfig, extract_ding
    from lmforge.recipes.translation import add_phrase_pairs

    ding = _ding(tmp_path / "de-en")
    extract_ding(tmp_path / "data", ding, DingConfig())
    test_de = json.loads((tmp_path / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])["source"]
    phrases = ["der große rote Hund :: the big red dog", "die kleine alte Katze :: the small old cat",
               f"{test_de} :: a phrase sharing its German side with a test sentence"]
    with ding.open("a", encoding="utf-8") as f:
        f.write("\n".join(phrases) + "\n")
    extract_ding(tmp_path / "data", ding, DingConfig(), overwrite=True)  # the sentence splits: unchanged by phrases
    assert json.loads((tmp_path / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])["source"] == test_de
    path, mix = add_phrase_pairs(tmp_path / "data", ding, RecipeConfig(reverse=False))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    train = (tmp_path / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert mix == {"sentence_pairs": len(train), "phrase_pairs": 2, "dropped_sharing_a_side_with_val_or_test": 1}
    assert rows[-2:] == [{"source": "der große rote Hund", "target": "the big red dog"},
                         {"source": "die kleine alte Katze", "target": "the small old cat"}]
    held = {r[side] for name in ("val.jsonl", "test.jsonl")
            for r in map(json.loads, (tmp_path / "data" / name).read_text(encoding="utf-8").splitlines())
            for side in ("source", "target")}
    assert not any(r["source"] in held or r["target"] in held for r in rows)


def test_recipe_without_the_decoder_only_model(tmp_path):
    saved = run_recipe(_tiny(tmp_path, decoder_only=False), echo=lambda s: None)
    assert saved["decoder_only"] == {"status": "not run", "reason": "disabled with --no-decoder-only"}
    assert not (tmp_path / "out" / "run-decoder-only").exists()
    # run again on the same folder (as after an interruption): the finished stages are reused, not redone
    said = []
    again = run_recipe(_tiny(tmp_path, decoder_only=False), echo=said.append)
    assert any("encoder-decoder: done before" in line for line in said) and again["test"] == saved["test"]


def test_missing_dictionary_without_install(tmp_path):
    with pytest.raises(LmforgeError, match=r"missing; install it with: (sudo )?apt-get install -y trans-de-en") as e:
        ensure_dictionary(tmp_path / "nope", install=False)
    assert "\n" not in str(e.value)
    cfg = _tiny(tmp_path)
    cfg.ding_path = tmp_path / "nope"
    with pytest.raises(LmforgeError, match="apt-get install -y trans-de-en"):
        run_recipe(cfg, echo=lambda s: None)


def test_failed_install_is_one_line(tmp_path):
    said = []
    with pytest.raises(LmforgeError, match=r"could not install trans-de-en \(exit 100\); run: .*apt-get install") as e:
        ensure_dictionary(tmp_path / "nope", install=True, echo=said.append, runner=lambda cmd: 100)
    assert "\n" not in str(e.value) and "running" in said[0]


def test_cli_registers_recipe_group():
    from typer.testing import CliRunner

    from lmforge.cli import app

    r = CliRunner().invoke(app, ["recipe", "translation", "--help"])
    assert r.exit_code == 0 and "--minutes" in r.output and "--no-install" in r.output


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/trans/de-en").exists(), reason="trans-de-en is not installed")
def test_real_recipe_reduced(tmp_path):
    said = []
    results = run_recipe(RecipeConfig(out=tmp_path / "out", minutes=1.0, install=False, test_limit=100,
                                      bleu_samples=50, progress=False), echo=said.append)
    assert results["data"]["pairs"] > 10000 and results["data"]["train_mix"] is None  # phrase pairs are opt-in
    assert results["test"]["greedy"]["segments"] == results["decoder_only"]["test"]["greedy"]["segments"] == 100
    assert results["bleu_curve"] and results["decoder_only"]["bleu_curve"] and (tmp_path / "out" / "bleu.png").exists()
    assert sum("calibration:" in line for line in said) == 2  # the minutes became a step count per model


def test_a_whole_recipe_budget_is_shared_by_the_two_models(tmp_path):
    """`lmforge recipe run translation --budget M`: the first model gets half of what the data and
    both scorings (guessed) leave, the second what is left after its scoring (the first model's,
    measured); both plans are printed, and both fit in the budget."""
    lines = []
    cfg = _tiny(tmp_path)
    cfg.max_steps, cfg.budget = 0, 0.6
    results = run_recipe(cfg, echo=lines.append)
    plans = [line for line in lines if line.startswith("[recipe] budget 0.6 min:")]
    assert len(plans) == 2 and "scoring both models and training the second" in plans[0] and "its scoring" in plans[1]
    first, second = results["training"]["minutes"], results["decoder_only"]["training"]["minutes"]
    assert 0 < first < 0.3 and 0 < second <= first and first + second < 0.6  # never more time than the first
    assert results["test"]["seconds"] >= 0 and results["training"]["steps"] >= 40  # the scoring is timed; at least the timed run's steps
