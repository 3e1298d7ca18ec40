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
        if not self.alpha > 0:
            raise LmforgeError(f"--lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"--lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise LmforgeError("--lora.targets: give at least one module-name pattern")


ADAPTER_KEYS = {"lora": dict, "base_model": (str, type(None)), "targets": list}


def check_adapter_config(meta: object, where: str) -> dict:
    """adapter_config.json as `save_adapter` writes it: {"lora": every LoRAConfig field, "base_model",
    "targets"}. A missing field would silently take its default (a rank the weights do not have),
    an unknown one is a typo or another tool's file (PEFT's adapter_config.json looks alike)."""
    if not isinstance(meta, dict):
        raise LmforgeError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(ADAPTER_KEYS))
    if unknown:
        raise LmforgeError(f"{where}: unknown keys {', '.join(map(repr, unknown))}; an lmforge adapter has "
                           f"{', '.join(ADAPTER_KEYS)} (a PEFT adapter? merge it with PEFT instead)")
    for key, kind in ADAPTER_KEYS.items():
        if key not in meta:
            raise LmforgeError(f"{where}: missing {key!r}")
        if not isinstance(meta[key], kind):
            raise LmforgeError(f"{where}: {key!r} has the wrong type ({type(meta[key]).__name__})")
    lora = meta["lora"]
    types = {"rank": int, "alpha": (int, float), "dropout": (int, float), "targets": list,
             "train_embeddings": bool, "train_norms": bool}
    for name in sorted(set(lora) | set(types)):
        if name not in types:
            raise LmforgeError(f"{where}: unknown LoRA setting {name!r} (known: {', '.join(types)})")
        if name not in lora:
            raise LmforgeError(f"{where}: LoRA setting {name!r} is missing")
        value = lora[name]
        wrong_bool = isinstance(value, bool) and types[name] is not bool
        if wrong_bool or not isinstance(value, types[name]):
            raise LmforgeError(f"{where}: LoRA setting {name!r} has the wrong type ({type(value).__name__})")
    if not all(isinstance(t, str) for t in lora["targets"]) or not all(isinstance(t, str) for t in meta["targets"]):
        raise LmforgeError(f"{where}: targets must be lists of strings")
    try:
        LoRAConfig(**lora)  # its own range checks
    except LmforgeError as e:
        raise LmforgeError(f"{where}: {e}") from None
    return meta
