"""lmforge: build language models end to end, on a laptop CPU first and on GPUs later."""

__version__ = "0.1.0"


def pipeline(task: str, model: str, device: str = "cpu"):
    """`lmforge.pipeline("text-generation", model=DIR_OR_NAME)`: see lmforge.generate.pipeline."""
    from lmforge.generate.pipeline import pipeline as _pipeline

    return _pipeline(task, model=model, device=device)


__all__ = ["pipeline", "__version__"]
