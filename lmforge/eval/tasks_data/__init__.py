"""Built-in evaluation tasks (JSONL), shipped as package data: see lmforge.eval.tasks."""
