"""The reference for perplexity: the loop of transformers' guide "Perplexity of fixed-length
models", shared by tests/test_eval_ppl.py and bench/bench_eval.py (no pytest here)."""

from __future__ import annotations


def guide_scored_positions(n: int, max_length: int, stride: int) -> list[int]:
    """Which tokens the guide's loop scores: labels -100 except the last trg_len of each window,
    then the model's internal shift drops each window's first label."""
    scored, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        window = list(range(begin, end))
        labels = [p if j >= len(window) - trg_len else None for j, p in enumerate(window)]
        scored += [p for p in labels[1:] if p is not None]  # shift: position 0 has no prediction
        prev_end = end
        if end == n:
            break
    return scored


def hf_sliding_nll(hf_model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The guide's loop with transformers, but summing exactly: loss x the number of labels it
    really averaged (the guide's `num_valid_tokens - batch_size` is off by one for stride < max_length)."""
    import torch

    x = torch.tensor([ids])
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = x[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())
        total += float(loss) * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    return total, count
