"""lm-evaluation-harness on lmforge models: the `lmforge` model type for the `lm-eval` package
(`pip install 'lmforge[eval]'`), so its own tasks (and your YAML tasks) run on any model lmforge
loads — a model dir, a run dir, a registry name, an HF folder or a .gguf file.

    import lm_eval
    import lmforge.eval.lm_eval_adapter  # registers the "lmforge" model type
    lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=runs/tiny,batch_tokens=4096",
                            tasks=["my_task"], task_manager=lm_eval.tasks.TaskManager(include_path="my_tasks/"))

or lm-eval's own command line, with the model type registered first:

    python -m lmforge.eval.lm_eval_adapter run --model lmforge --model_args pretrained=runs/tiny --tasks ...

All three request types run on the Engine: `loglikelihood` and `loglikelihood_rolling` through
`Engine.score` (the same code as `lmforge eval tasks` and `lmforge eval ppl`), `generate_until`
through its batched greedy generation. Tokenization of (context, continuation) pairs is lm-eval's
own (`TemplateLM`), which `lmforge.eval.tasks.encode_pair` reproduces, so a multiple-choice task
scores the same through either door.
"""

from __future__ import annotations

from typing import Any

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # an optional extra
    from lmforge.errors import LmforgeError

    raise LmforgeError("the lm-eval adapter needs lm-evaluation-harness: pip install 'lmforge[eval]'") from e

from lmforge.errors import LmforgeError


@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """An lmforge model as an lm-eval `LM`. model_args: pretrained (model spec, required),
    device (default cpu), batch_tokens (scored per forward, default 4096), batch_size (prompts
    generated together, default 8), max_gen_toks (default 256)."""

    def __init__(self, pretrained: str | None = None, device: str = "cpu", batch_tokens: int = 4096,
                 batch_size: int | str = 8, max_gen_toks: int = 256, engine=None, **_ignored: Any):
        super().__init__()
        if engine is None:
            if not pretrained:
                raise LmforgeError("lm-eval model 'lmforge' needs model_args pretrained=MODEL (a model dir, run dir or name)")
            from lmforge.eval.perplexity import load_engine

            engine, _loaded = load_engine(str(pretrained), _device(device))
        self.engine = engine
        self.lm_tokenizer = engine.tokenizer
        self.batch_tokens = int(batch_tokens)
        # lm-eval passes batch_size through from its own flag ("auto" or a number).
        self.gen_batch_size = 8 if str(batch_size).startswith("auto") else max(1, int(batch_size))
        self.max_gen_toks = int(max_gen_toks)
        self._device = engine.device

    # -- what TemplateLM needs ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.lm_tokenizer.eos_id
        if eos is None:
            raise LmforgeError("the model's tokenizer names no eos token")
        return eos

    @property
    def prefix_token_id(self) -> int:
        from lmforge.eval.tasks import prefix_token

        return prefix_token(self.lm_tokenizer)

    @property
    def max_length(self) -> int:
        return self.engine.config.block_size

    @property
    def tokenizer_name(self) -> str:
        return f"lmforge-{self.lm_tokenizer.sha256[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.lm_tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.lm_tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from lmforge.eval.tasks import loglikelihoods

        pairs = [(ctx, cont) for _key, ctx, cont in requests]
        scored = loglikelihoods(self.engine, pairs, batch_tokens=self.batch_tokens)
        out = []
        for (key, _ctx, _cont), (ll, greedy, _cut) in zip(requests, scored):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (ll, greedy))
            out.append((ll, greedy))
        return out

    # -- the other two request types ---------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of the model's context, the first
        token conditioned on the prefix token: lm-eval's definition, on Engine.score."""
        from lm_eval import utils

        out = []
        for req in requests:
            (string,) = req.args
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = 0.0
            if windows:
                seqs = [list(ctx) + list(pred) for ctx, pred in windows]
                scored = self.engine.score(seqs, [len(ctx) for ctx, _ in windows], batch_tokens=self.batch_tokens)
                total = sum(s.total for s in scored)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lmforge.generate.sampling import SamplingParams

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
            if kwargs.pop("do_sample", False) and float(kwargs.get("temperature", 1.0)) > 0:
                params = SamplingParams(max_new_tokens=max_new, temperature=float(kwargs.get("temperature", 1.0)),
                                        top_k=0, top_p=float(kwargs.get("top_p", 1.0)), stop=until, seed=0)
            else:
                params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop=until)
            if max_new >= self.max_length:
                raise LmforgeError(f"max_gen_toks {max_new} leaves no room for a prompt in the model's context of {self.max_length}")
            prompts = []
            for i in members:
                ids = self.tok_encode(requests[i].args[0]) or [self.prefix_token_id]
                prompts.append(ids[-(self.max_length - max_new):])  # keep the end, as lm-eval truncates
            texts = _generate_raw(self.engine, prompts, params, self.gen_batch_size)
            for i, text in zip(members, texts):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]


def _device(requested: str | None) -> str:
    """lm-eval's command line asks for cuda:0 unless told otherwise; on a machine without CUDA
    that default means "the machine's device", so say so and use the CPU."""
    import torch

    if requested and str(requested).startswith("cuda") and not torch.cuda.is_available():
        import sys

        print(f"lmforge: lm-eval asked for device {requested}, but CUDA is not available; using the CPU", file=sys.stderr)
        return "cpu"
    return str(requested or "auto")


def _generate_raw(engine, prompts: list[list[int]], params, batch_size: int) -> list[str]:
    """Completions cut at the first stop string, not stripped (lm-eval post-processes them)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    for k in range(0, len(order), batch_size):
        group = order[k : k + batch_size]
        for i, c in zip(group, engine.generate_ids([prompts[i] for i in group], params)):
            out[i] = c.text
    return out


def main() -> None:
    """lm-eval's command line (it reads sys.argv) with the `lmforge` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
