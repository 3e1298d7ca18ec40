"""End-to-end recipes: data, training, evaluation and a report in one command."""
