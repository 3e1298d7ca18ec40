"""Beam search, model-agnostic: the algorithm drives a `step` callback and never sees a model.

The caller runs its prompts once and hands over the logits of each prompt's next token; from then
on the search keeps `num_beams` running hypotheses per prompt, B x num_beams rows in all, and at
every step calls

    step(tokens, parents) -> logits

tokens [R] and parents [R] (R = B * num_beams, row b * num_beams + j is beam j of prompt b): row
r of the new step continues row parents[r] of the previous one with token tokens[r]. The caller
reorders its per-row state by `parents` (a decoder-only model: its KV cache rows; an
encoder-decoder: its decoder self-attention cache, the cross-attention keys being the same for
every beam of a prompt), feeds the tokens and returns the logits [R, vocab] of the next position.
Before the first call the caller's state holds R rows, row b * num_beams + j a copy of prompt b
(the first call's parents all point at beam 0 of their prompt: beams start identical).

The search is transformers' (`generate(num_beams=N, do_sample=False)`, its vectorized beam search
of v4.50+), step for step, so that the same model gives the same sequences:

* each step turns the logits into log-probabilities (log_softmax), then applies the repetition
  penalty, the min_new_tokens mask of the end tokens and the no-repeat-n-gram mask to those
  log-probabilities (as transformers' logits processors do in beam search), and adds each beam's
  running score;
* the best K = max(2, 1 + number of end tokens) x num_beams continuations of each prompt, over all
  its beams, are kept (so that num_beams of them remain that do not end);
* a continuation ends when its token is an end token or it reaches max_new_tokens; the ending ones
  among the best num_beams continuations become finished hypotheses, scored
  sum of log-probs / generated_length ** length_penalty (the end token counted); the best
  num_beams finished hypotheses per prompt are kept;
* the best num_beams continuations that do not end are the next running beams (at the first step
  only beam 0's continuations compete: the other beams start at -inf);
* early_stopping: True -- a prompt is done once it has num_beams finished hypotheses; False -- it
  is done once it has num_beams and the best running beam, scored at its current length, cannot
  beat the worst of them (transformers' heuristic: a longer beam can still score better when
  length_penalty > 0); "never" -- the same test, but with a positive length_penalty the running
  beam is scored at max_new_tokens, the best it could do. A done prompt takes no more hypotheses;
  the search stops when every prompt is done, or at max_new_tokens.

Differences, kept on purpose: transformers marks excluded candidates with -1e9 where this module
uses -inf and boolean masks (the same choices whenever a prompt has the candidates it needs), and
its penalties and n-gram bans read the left padding of a batched prompt as tokens; here only each
prompt's own tokens (`prefixes`) count, so a prompt searched in a batch gives what it gives alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lmforge.errors import LmforgeError

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EARLY_STOPPING = {"true": True, "false": False, "never": "never"}


@dataclass(frozen=True)
class BeamSettings:
    num_beams: int
    max_new_tokens: int
    length_penalty: float = 1.0  # score = sum of log-probs / length ** length_penalty
    early_stopping: bool | str = False  # True, False or "never" (transformers' meanings; see the module doc)
    num_return_sequences: int = 1  # the best this many finished hypotheses per prompt
    end_ids: tuple[int, ...] = ()  # tokens that end a hypothesis (eos, end of turn, stop tokens)
    min_new_tokens: int = 0  # no token of `min_banned` before this many generated tokens
    min_banned: tuple[int, ...] | None = None  # default: end_ids
    no_repeat_ngram_size: int = 0  # no n-gram of this size twice in prefix + generated (0 = off)
    repetition_penalty: float = 1.0  # CTRL's, on the log-probabilities of tokens in prefix + generated

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise LmforgeError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise LmforgeError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], "
                               f"got {self.num_return_sequences}")
        if self.early_stopping not in (True, False, "never"):
            raise LmforgeError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.max_new_tokens < 1:
            raise LmforgeError(f"max_new_tokens must be positive, got {self.max_new_tokens}")

    @property
    def candidates(self) -> int:
        """Continuations kept per prompt and step: enough that num_beams of them do not end."""
        return max(2, 1 + len(set(self.end_ids))) * self.num_beams


@dataclass
class Hypothesis:
    ids: list[int]  # the generated tokens, the end token included when it ended on one
    score: float  # sum of the tokens' (processed) log-probs / len(ids) ** length_penalty
    ended: bool  # it ended on an end token (else it reached max_new_tokens)


def ngram_ban_mask(history: torch.Tensor, n: int, vocab: int, start: torch.Tensor | None = None) -> torch.Tensor | None:
    """No-repeat-n-gram: a bool [R, vocab] mask of the tokens that would complete, after each row's
    last n - 1 tokens, an n-gram already in the row; None when no row has one. history [R, L]
    holds each row's tokens, left-padded: row r's own tokens start at start[r] (default 0), and
    only n-grams within them count."""
    R, L = history.shape
    if n < 1 or L < n:
        return None
    windows = history.unfold(1, n, 1)  # [R, L - n + 1, n]: every n-gram, the last one ends the row
    prefix = history[:, L - n + 1:]  # [R, n - 1]: what the next token would complete
    match = (windows[:, :, : n - 1] == prefix[:, None, :]).all(-1)
    if start is not None:  # only n-grams of the row's own tokens, and a prefix of its own tokens
        first = torch.arange(L - n + 1, device=history.device)[None, :]
        match &= (first >= start[:, None]) & (start[:, None] <= L - n + 1)
    rows, at = match.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return None
    mask = torch.zeros((R, vocab), dtype=torch.bool, device=history.device)
    mask[rows, windows[rows, at, n - 1]] = True
    return mask


def beam_search(first_logits: torch.Tensor, step: Step, settings: BeamSettings,
                prefixes: Sequence[Sequence[int]] | None = None) -> list[list[Hypothesis]]:
    """Search from first_logits [B, vocab] (each prompt's next-token logits); the best
    settings.num_return_sequences hypotheses per prompt, best first. `prefixes`: each prompt's
    tokens, which the repetition penalty and the n-gram ban count (needed only with those)."""
    s = settings
    B, V = first_logits.shape
    k, K, T = s.num_beams, s.candidates, s.max_new_tokens
    R = B * k
    device = first_logits.device
    if K > V:
        raise LmforgeError(f"beam search keeps {K} candidates a step (num_beams {k}, {len(set(s.end_ids))} end "
                           f"tokens), more than the vocabulary of {V}: use fewer beams")
    needs_prefix = s.no_repeat_ngram_size > 0 or s.repetition_penalty != 1.0
    if needs_prefix and (prefixes is None or len(prefixes) != B):
        raise LmforgeError("beam_search: the repetition penalty and no_repeat_ngram_size need each prompt's tokens")
    end_ids = torch.tensor(sorted(set(s.end_ids)), dtype=torch.long, device=device)
    min_banned = torch.tensor(sorted(set(s.end_ids if s.min_banned is None else s.min_banned)), dtype=torch.long,
                              device=device)
    group = torch.arange(B, device=device)[:, None] * k  # [B, 1]: each prompt's first row
    first_k = torch.arange(K, device=device)[None, :] < k  # [1, K]: the best num_beams candidates

    # Running beams: their tokens and scores. Only beam 0 of each prompt competes at first.
    run_ids = torch.zeros((B, k, T), dtype=torch.long, device=device)
    run_scores = torch.full((B, k), float("-inf"), device=device)
    run_scores[:, 0] = 0.0
    # Finished hypotheses, best first: tokens, lengths, scores, and which slots hold one.
    fin_ids = torch.zeros((B, k, T), dtype=torch.long, device=device)
    fin_len = torch.zeros((B, k), dtype=torch.long, device=device)
    fin_scores = torch.full((B, k), float("-inf"), device=device)
    fin_full = torch.zeros((B, k), dtype=torch.bool, device=device)
    open_ = torch.ones(B, dtype=torch.bool, device=device)  # a prompt that can still gain a better hypothesis

    # What the penalties read: each row's prefix + generated tokens (left-padded), and seen tokens.
    history = start = seen = None
    if needs_prefix:
        P = max(len(p) for p in prefixes)
        history = torch.zeros((R, P + T), dtype=torch.long, device=device)
        start = torch.empty(R, dtype=torch.long, device=device)
        for b, p in enumerate(prefixes):
            rows = slice(b * k, (b + 1) * k)
            if len(p):
                history[rows, P - len(p): P] = torch.as_tensor(list(p), dtype=torch.long, device=device)
            start[rows] = P - len(p)
        if s.repetition_penalty != 1.0:
            seen = torch.zeros((R, V), dtype=torch.bool, device=device)
            for b, p in enumerate(prefixes):
                if len(p):
                    seen[b * k : (b + 1) * k, torch.as_tensor(list(p), dtype=torch.long, device=device)] = True

    logits = first_logits.repeat_interleave(k, dim=0)
    for gen in range(T):
        logp = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
        if seen is not None:
            logp = torch.where(seen, torch.where(logp > 0, logp / s.repetition_penalty,
                                                 logp * s.repetition_penalty), logp)
        if gen < s.min_new_tokens and min_banned.numel():
            logp[:, min_banned] = float("-inf")
        if s.no_repeat_ngram_size:
            ban = ngram_ban_mask(history[:, : history.shape[1] - T + gen], s.no_repeat_ngram_size, V, start)
            if ban is not None:
                logp = logp.masked_fill(ban, float("-inf"))
        # The best K continuations over all of a prompt's beams are among each beam's best K: a
        # top-K per row of logp (adding the beam's score keeps its order), then over the k * K.
        row_logp, row_tok = torch.topk(logp, K, dim=-1)  # [R, K]
        total = (row_logp.view(B, k, K) + run_scores[:, :, None]).view(B, k * K)
        cand_scores, flat = torch.topk(total, K, dim=-1)  # [B, K], best first
        cand_beam, cand_tok = flat // K, row_tok.view(B, k * K).gather(1, flat)
        ends = torch.isin(cand_tok, end_ids) if end_ids.numel() else torch.zeros_like(cand_tok, dtype=torch.bool)
        if gen + 1 >= T:
            ends = torch.ones_like(ends)

        # Finished hypotheses: the ending ones among the best num_beams candidates, while the
        # prompt is open (and not full, with early_stopping=True).
        takes = open_ & ~(fin_full.all(-1) & (s.early_stopping is True))
        new = ends & first_k & takes[:, None]
        if bool(new.any()):
            cand_ids = run_ids.gather(1, cand_beam[:, :, None].expand(B, K, T)).clone()
            cand_ids[:, :, gen] = cand_tok
            scored = torch.where(new, cand_scores / (float(gen + 1) ** s.length_penalty), float("-inf"))
            merged = torch.cat([fin_scores, scored], 1)
            fin_scores, pick = torch.topk(merged, k, dim=-1)
            fin_ids = torch.cat([fin_ids, cand_ids], 1).gather(1, pick[:, :, None].expand(B, k, T))
            fin_len = torch.cat([fin_len, torch.full_like(cand_tok, gen + 1)], 1).gather(1, pick)
            fin_full = torch.cat([fin_full, new], 1).gather(1, pick)
        if gen + 1 >= T:
            break

        # The next running beams: the best num_beams candidates that do not end.
        run_scores, pick = torch.topk(cand_scores.masked_fill(ends, float("-inf")), k, dim=-1)
        beam = cand_beam.gather(1, pick)
        tokens = cand_tok.gather(1, pick)
        run_ids = run_ids.gather(1, beam[:, :, None].expand(B, k, T))
        run_ids[:, :, gen] = tokens
        parents = (group + beam).view(R)
        if history is not None:
            history = history.index_select(0, parents)
            history[:, history.shape[1] - T + gen] = tokens.view(R)
        if seen is not None:
            seen = seen.index_select(0, parents)
            seen[torch.arange(R, device=device), tokens.view(R)] = True

        # Can a running beam still beat the worst finished hypothesis? (see the module doc)
        length = T if s.early_stopping == "never" and s.length_penalty > 0.0 else gen + 1
        best_possible = run_scores[:, 0] / (float(length) ** s.length_penalty)
        full = fin_full.all(-1)
        open_ = open_ & (~full | (best_possible > fin_scores.min(-1).values))
        if not bool(open_.any()) or (s.early_stopping is True and bool(full.all())):
            break
        logits = step(tokens.view(R), parents)

    out = []
    for b in range(B):
        hyps = []
        for j in range(k):
            if not bool(fin_full[b, j]):  # only where every candidate was -inf (a banned-out vocabulary)
                continue
            ids = fin_ids[b, j, : int(fin_len[b, j])].tolist()
            hyps.append(Hypothesis(ids, float(fin_scores[b, j]), bool(ids) and ids[-1] in s.end_ids))
        out.append(hyps[: s.num_return_sequences])
    return out
