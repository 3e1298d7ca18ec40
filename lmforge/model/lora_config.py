"""LoRA settings, apart from the layers (lora.py) so the CLI can build its options without torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import LmforgeError

DEFAULT_TARGETS = ["*attn.qkv", "*attn.proj", "*mlp.fc", "*mlp.proj"]


@dataclass
class LoRAConfig:
    rank: int = 16  # r: the adapters' inner dimension
    alpha: float = 32.0  # scale = alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input (0 as in PEFT: on CPU the masks cost ~18% of a step)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # module-name patterns (fnmatch)
    train_embeddings: bool = False  # also train the token embedding (and a tied output head)
    train_norms: bool = False  # also train the norm weights

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise LmforgeError(f"--lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise LmforgeError(f"--lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"--lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise LmforgeError("--lora.targets: give at least one module-name pattern")
