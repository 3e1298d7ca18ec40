"""Evaluation: perplexity, baselines, BLEU, task accuracy, reports."""
