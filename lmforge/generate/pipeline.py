"""`lmforge.pipeline("text-generation", model=...)`: the transformers pipeline experience on
lmforge models, generating through the Engine.

    gen = lmforge.pipeline("text-generation", model="runs/quickstart/run")
    gen("def fibonacci(n):", max_new_tokens=50)            # [{"generated_text": "def fibonacci(n): ..."}]
    gen(["a", "b"], do_sample=True, seed=0)                 # [[{...}], [{...}]]
    gen("x", max_new_tokens=64, min_new_tokens=64)          # exactly 64 tokens (or ignore_eos=True)
    gen([{"role": "user", "content": "Hi"}])                # [{"generated_text": [..., {"role": "assistant", ...}]}]
    gen("x", num_beams=4, num_return_sequences=2)           # beam search: the best 2 of 4 beams, best first

`lmforge.pipeline("translation", model=...)` runs an encoder-decoder model in transformers'
translation-pipeline call shape (sources batched through the Engine, lmforge.generate.translate):

    tr = lmforge.pipeline("translation", model="runs/en-de/run")
    tr("the cat sat")                                       # [{"translation_text": "..."}]
    tr(["a", "b"], num_beams=4, max_new_tokens=64)          # [{"translation_text": ...}, {...}]
    tr(["a", "b"], num_beams=4, num_return_sequences=2)     # [[{...}, {...}], [{...}, {...}]]
"""

from __future__ import annotations

from typing import Any

from lmforge.chat import render_chat
from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams
from lmforge.interop.registry import LoadedModel, load_model

TASKS = ("text-generation", "translation")
_SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "stop",
                  "stop_token_ids", "seed", "do_sample", "min_new_tokens", "ignore_eos",
                  "num_beams", "length_penalty", "early_stopping", "no_repeat_ngram_size"}


class TextGenerationPipeline:
    def __init__(self, loaded: LoadedModel, *, int8_activations: bool = False):
        if loaded.model.config.is_encoder_decoder:
            raise LmforgeError(f"{loaded.path}: an encoder-decoder model; use pipeline('translation', model=...)")
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.engine = Engine.for_loaded(loaded, int8_activations=int8_activations)

    def sampling_params(self, **kwargs) -> SamplingParams:
        """transformers' conventions: greedy unless do_sample; sampling defaults to top_k=50;
        num_beams > 1 is beam search (do_sample=True with it is refused: no beam sampling).
        The model dir's generation.json supplies defaults; call arguments override them."""
        unknown = set(kwargs) - _SAMPLING_KEYS - {"num_return_sequences", "return_full_text", "truncate"}
        if unknown:
            raise LmforgeError(f"unknown generation arguments: {', '.join(sorted(unknown))}")
        merged = {**{k: v for k, v in self.loaded.generation.items() if k in _SAMPLING_KEYS - {"stop_token_ids"}},
                  **{k: v for k, v in kwargs.items() if k in _SAMPLING_KEYS and v is not None}}
        do_sample = merged.pop("do_sample", None)
        if do_sample is None:
            do_sample = "temperature" in kwargs and kwargs["temperature"] not in (None, 0)
        if not do_sample:
            merged["temperature"] = 0.0
        else:
            merged.setdefault("temperature", 1.0)
            merged.setdefault("top_k", 50)
            if merged["temperature"] == 0:
                raise LmforgeError("do_sample=True needs a temperature > 0")
        merged.setdefault("max_new_tokens", 128)
        n = merged["num_return_sequences"] = kwargs.get("num_return_sequences", 1)
        if isinstance(n, int) and n > 1 and merged["temperature"] == 0 and merged.get("num_beams", 1) == 1:
            raise LmforgeError("greedy decoding returns one sequence: pass do_sample=True (or num_beams >= "
                               f"{n}) for num_return_sequences > 1")
        if isinstance(merged.get("stop"), str):
            merged["stop"] = [merged["stop"]]
        return SamplingParams(**merged)

    def __call__(self, inputs: Any, *, num_return_sequences: int = 1, return_full_text: bool = True,
                 truncate: str | None = None, **kwargs) -> list:
        cap = kwargs.get("max_new_tokens") is None and "max_new_tokens" not in self.loaded.generation
        if cap:  # the text-generation default (128), within the decoder's positions
            kwargs["max_new_tokens"] = min(128, self.model.config.block_size)
        params = self.sampling_params(num_return_sequences=num_return_sequences, **kwargs)
        single = isinstance(inputs, str) or _is_chat(inputs)
        batch = [inputs] if single else list(inputs)
        if not batch:
            raise LmforgeError("no prompts given")
        prompt_ids = []
        for item in batch:
            if isinstance(item, str):
                ids = self.engine.encode(item)
            elif _is_chat(item):
                ids = render_chat(self.tokenizer, item, add_generation_prompt=True).ids
            else:
                raise LmforgeError(f"a prompt must be a string or a list of {{role, content}} messages, got {type(item).__name__}")
            prompt_ids.append(self.engine.check_length(ids, params, truncate))
        completions = self.engine.generate_ids(prompt_ids, params)  # num_return_sequences per prompt, in order
        results = []
        for i, item in enumerate(batch):
            outs = []
            for c in completions[i * num_return_sequences : (i + 1) * num_return_sequences]:
                if _is_chat(item):
                    reply = c.text.strip()
                    outs.append({"generated_text": [*item, {"role": "assistant", "content": reply}] if return_full_text else reply})
                else:
                    outs.append({"generated_text": item + c.text if return_full_text else c.text})
            results.append(outs)
        return results[0] if single else results


class TranslationPipeline(TextGenerationPipeline):
    """transformers' translation pipeline's call shape on a translator (an encoder-decoder, or a
    decoder-only model trained on `source <sep> target`): greedy unless
    do_sample, num_beams > 1 for beam search, generation.json's defaults under the arguments."""

    def __init__(self, loaded: LoadedModel):
        self.engine = Engine.for_loaded(loaded)
        try:
            self.engine.require_translator()
        except LmforgeError as e:
            raise LmforgeError(f"{loaded.path}: {e}") from None
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer

    def __call__(self, inputs: Any, *, num_return_sequences: int = 1, batch_size: int = 16, **kwargs) -> list:
        from lmforge.generate.translate import translate_texts

        if "truncate" in kwargs or "return_full_text" in kwargs:
            bad = "truncate" if "truncate" in kwargs else "return_full_text"
            raise LmforgeError(f"{bad} is a text-generation argument; translation takes none")
        cap = kwargs.get("max_new_tokens") is None and "max_new_tokens" not in self.loaded.generation
        if cap:  # the text-generation default (128), within the decoder's positions
            kwargs["max_new_tokens"] = min(128, self.model.config.block_size)
        params = self.sampling_params(num_return_sequences=num_return_sequences, **kwargs)
        single = isinstance(inputs, str)
        batch = [inputs] if single else list(inputs)
        if not batch:
            raise LmforgeError("no sources given")
        done = translate_texts(self.engine, batch, params, batch_size=batch_size, cap_to_context=cap)
        results = [[{"translation_text": t} for t in group] for group in done]
        if single:
            return results[0]
        # transformers' shape: one dict per source when each has one translation, else a list each.
        return [r[0] for r in results] if num_return_sequences == 1 else results


def _is_chat(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) for m in x)


def pipeline(task: str, model: str, device: str = "cpu", *, int8_activations: bool = False) -> TextGenerationPipeline:
    """Build a pipeline; `model` is a model dir, a run dir (its best model) or a known name.
    int8_activations: see Engine (quantized decoder-only models only)."""
    if task not in TASKS:
        raise LmforgeError(f"unsupported task {task!r}; lmforge pipelines: {', '.join(TASKS)}")
    if task == "translation":
        if int8_activations:
            raise LmforgeError("int8_activations is for quantized decoder-only models, not translation")
        return TranslationPipeline(load_model(model, device=device))
    return TextGenerationPipeline(load_model(model, device=device), int8_activations=int8_activations)
