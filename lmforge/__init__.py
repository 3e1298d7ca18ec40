"""lmforge: build language models end to end, on a laptop CPU first and on GPUs later."""

# Importing lmforge changes nothing in the process (no environment variable, no matplotlib
# backend). Huge pages for PyTorch's allocator are opt-in: lmforge.allocator.use_huge_pages(),
# which the `lmforge` command calls for its own process.

__version__ = "0.1.0"


def pipeline(task: str, model: str, device: str = "cpu"):
    """`lmforge.pipeline("text-generation" | "translation", model=DIR_OR_NAME)`: see lmforge.generate.pipeline."""
    from lmforge.generate.pipeline import pipeline as _pipeline

    return _pipeline(task, model=model, device=device)


__all__ = ["pipeline", "__version__"]
