"""Evaluation: perplexity (perplexity.py), BLEU/chrF/TER (bleu.py), task accuracy (tasks.py, with
built-in tasks in tasks_data/), the lm-evaluation-harness adapter (lm_eval_adapter.py), result
files, reports and comparisons (results.py), and the baselines a trained model must beat
(baselines.py). Scoring and generation all go through lmforge.generate.engine.Engine."""
