"""ModelConfig: one dataclass that describes every model lmforge builds.

Like litgpt's `Config`, the architecture is not a class hierarchy but a handful of switches
(norm, mlp, position, bias, tied embeddings): GPT-2 and Llama are two settings of the same
fields, so one model file serves both and a new family is a new preset, not new code.

`arch` picks the model file: "decoder" (lmforge.model.gpt.GPT, the default) or
"encoder-decoder" (lmforge.model.seq2seq.Seq2Seq), built from the same parts and switches;
its encoder has `n_encoder_layer` blocks, its decoder `n_layer`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.errors import LmforgeError

NormKind = Literal["layernorm", "rmsnorm"]
MlpKind = Literal["gelu", "gelu_exact", "swiglu"]
PositionKind = Literal["learned", "rope"]
ArchKind = Literal["decoder", "encoder-decoder"]
ARCHS = ("decoder", "encoder-decoder")
# Fields only an encoder-decoder uses: left out of a decoder's to_dict, so a decoder-only
# config.json is what it was before they existed (and older lmforge versions still read it).
ENCODER_DECODER_FIELDS = ("n_encoder_layer", "src_vocab_size")


@dataclass
class ModelConfig:
    name: str = "tiny"  # a label for the architecture, recorded in config.json and HF exports
    vocab_size: int = 4096  # token embedding rows; set from the tokenizer when training
    block_size: int = 256  # context length: the most positions the model attends over
    n_layer: int = 4  # number of transformer blocks
    n_head: int = 4  # query heads per attention layer
    n_kv_head: int = 4  # key/value heads (grouped-query attention); equal to n_head for MHA
    n_embd: int = 256  # width of the residual stream (hidden size)
    intermediate_size: int = 768  # MLP hidden width (for swiglu, the width of gate and up each)
    norm: NormKind = "rmsnorm"  # layernorm (GPT-2) or rmsnorm (Llama)
    norm_eps: float = 1e-5  # epsilon added inside the norm's square root
    mlp: MlpKind = "swiglu"  # gelu (GPT-2, tanh approximation), gelu_exact (erf, as nanoGPT/BERT) or swiglu (Llama)
    position: PositionKind = "rope"  # learned absolute position embeddings or rotary (RoPE)
    rope_theta: float = 10000.0  # RoPE base wavelength; larger suits longer contexts
    bias: bool = False  # biases in the linear layers and in LayerNorm
    tie_embeddings: bool = True  # share the token embedding matrix with the output head
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches
    init_std: float = 0.02  # std of the normal init; residual projections get /sqrt(2*n_layer)
    arch: ArchKind = "decoder"  # decoder (decoder-only GPT) or encoder-decoder (Seq2Seq: n_encoder_layer encoder + n_layer decoder blocks)
    n_encoder_layer: int = 0  # encoder-decoder only: number of encoder blocks (n_layer counts the decoder's)
    src_vocab_size: int = 0  # encoder-decoder only: source embedding rows for a separate source vocabulary; 0 = source and target share vocab_size's table

    def __post_init__(self) -> None:
        self._check_types()
        for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size"):
            if getattr(self, f) < 1:
                raise LmforgeError(f"model config: {f} must be positive, got {getattr(self, f)}")
        if self.n_embd % self.n_head:
            raise LmforgeError(
                f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_head % self.n_kv_head:
            raise LmforgeError(
                f"model config: n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})"
            )
        for f, allowed in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "gelu_exact", "swiglu")),
                           ("position", ("learned", "rope"))):
            if getattr(self, f) not in allowed:
                raise LmforgeError(f"model config: {f} must be one of {', '.join(allowed)}; got {getattr(self, f)!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise LmforgeError(f"model config: rope needs an even head_dim, got n_embd/n_head = {self.head_dim}")
        if not self.rope_theta > 0:
            raise LmforgeError(f"model config: rope_theta must be positive, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise LmforgeError(f"model config: norm_eps must be positive, got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if not self.init_std > 0:
            raise LmforgeError(f"model config: init_std must be positive, got {self.init_std}")
        if self.arch not in ARCHS:
            raise LmforgeError(f"model config: arch must be one of {', '.join(ARCHS)}; got {self.arch!r}")
        if self.arch == "decoder":
            for f in ENCODER_DECODER_FIELDS:
                if getattr(self, f):
                    raise LmforgeError(f"model config: {f} is for arch encoder-decoder; a decoder needs 0, got {getattr(self, f)}")
        else:
            if self.n_encoder_layer < 1:
                raise LmforgeError(f"model config: an encoder-decoder needs n_encoder_layer >= 1, got {self.n_encoder_layer}")
            if self.src_vocab_size < 0:
                raise LmforgeError(f"model config: src_vocab_size must be 0 (shared vocabulary) or positive, got {self.src_vocab_size}")

    def _check_types(self) -> None:
        # Configs arrive from JSON and YAML, where "4" and 4.0 are easy mistakes; catch them here
        # rather than as a confusing error deep inside torch.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok:
                    setattr(self, f.name, float(value))
            else:
                ok = isinstance(value, str)
            if not ok:
                raise LmforgeError(
                    f"model config: {f.name} must be {type(default).__name__}, got {value!r}"
                )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def fused_parts(self, name: str) -> list[int]:
        """Output sizes of the matrices fused into layer `name` (a module or parameter name):
        q|k|v in `attn.qkv`, gate|up in a SwiGLU `mlp.fc`; [] for a layer that fuses nothing.
        Export to separate tensors, and LoRA's per-part adapters, split along these."""
        dotted = f".{name}."
        if ".attn.qkv." in dotted:
            return [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        if ".cross_attn.kv." in dotted:  # an encoder-decoder's cross-attention: k|v over the encoder output
            return [self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        if ".mlp.fc." in dotted and self.mlp == "swiglu":
            return [self.intermediate_size, self.intermediate_size]
        return []

    @property
    def is_encoder_decoder(self) -> bool:
        return self.arch == "encoder-decoder"

    def to_dict(self) -> dict[str, Any]:
        """Every field; a decoder's leaves out arch and the encoder-decoder fields (all at their
        defaults), so its config.json is unchanged from before the encoder-decoder existed."""
        d = dataclasses.asdict(self)
        if self.arch == "decoder":
            for f in ("arch", *ENCODER_DECODER_FIELDS):
                del d[f]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model config") -> "ModelConfig":
        """Build from a dict (e.g. config.json's "lmforge_model"); unknown keys are an error.

        A key we don't know is most likely a typo or a field from a newer lmforge; silently
        dropping it would build a different model than the one that was described.
        """
        if not isinstance(d, dict):
            raise LmforgeError(f"{source}: expected a JSON object of model fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise LmforgeError(f"{source}: unknown model config key {key!r} (known: {', '.join(sorted(known))})")
        try:
            return cls(**d)
        except LmforgeError as e:
            raise LmforgeError(f"{source}: {str(e).removeprefix('model config: ')}") from None

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again), e.g. vocab_size from a tokenizer."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # A few million parameters: trains to readable output on a laptop CPU in minutes.
    "tiny": ModelConfig(),
    # GPT-2 small exactly as OpenAI released it (124,439,808 parameters).
    "gpt2-124m": ModelConfig(
        name="gpt2-124m", vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_kv_head=12,
        n_embd=768, intermediate_size=3072, norm="layernorm", norm_eps=1e-5, mlp="gelu",
        position="learned", bias=True, tie_embeddings=True,
    ),
    # A small Llama with grouped-query attention (3 query heads share each kv head), untied
    # embeddings as in Llama 2.
    "llama-tiny": ModelConfig(
        name="llama-tiny", vocab_size=32000, block_size=1024, n_layer=6, n_head=6, n_kv_head=2,
        n_embd=384, intermediate_size=1024, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
        position="rope", rope_theta=10000.0, bias=False, tie_embeddings=False,
    ),
    # HuggingFaceTB/SmolLM2-135M (134,515,008 parameters), the embedded default pretrained model.
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3,
        n_embd=576, intermediate_size=1536, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
        position="rope", rope_theta=100000.0, bias=False, tie_embeddings=True,
    ),
    # Encoder-decoders (lmforge.model.seq2seq), in the mBART layout that exports to Hugging Face
    # exactly (lmforge.interop.hf_seq2seq): pre-norm LayerNorm, exact GELU, learned positions,
    # biases, one vocabulary shared by source, target and the tied output head.
    # A small one for tests and quick experiments.
    "seq2seq-tiny": ModelConfig(
        name="seq2seq-tiny", arch="encoder-decoder", vocab_size=4096, block_size=256, n_encoder_layer=2, n_layer=2,
        n_head=4, n_kv_head=4, n_embd=128, intermediate_size=512, norm="layernorm", norm_eps=1e-5,
        mlp="gelu_exact", position="learned", bias=True, tie_embeddings=True,
    ),
    # Transformer "base" of Vaswani et al. 2017 (6+6 layers, 512 wide, 8 heads, 2048 MLP, a
    # shared ~37k BPE vocabulary), pre-norm and with learned positions; 64,135,168 parameters.
    "transformer-base": ModelConfig(
        name="transformer-base", arch="encoder-decoder", vocab_size=37000, block_size=1024, n_encoder_layer=6,
        n_layer=6, n_head=8, n_kv_head=8, n_embd=512, intermediate_size=2048, norm="layernorm", norm_eps=1e-5,
        mlp="gelu_exact", position="learned", bias=True, tie_embeddings=True, dropout=0.1,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (callers may change it without touching PRESETS)."""
    if not isinstance(name, str) or name not in PRESETS:  # a YAML `preset:` may hold any value
        raise LmforgeError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
