"""`lmforge inspect logit-lens`: what each layer's residual stream already predicts (nostalgebraist's
logit lens): the stream after every block (and the embeddings before the first) through the
model's final norm and output head, softmaxed, top-k per position. The last row is the model's
own output. Written as OUT/logit-lens.md (the top token per layer and position), .csv (all top-k)
and .png (a heat map: layers x positions, colour = the top token's probability, labelled with it).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.inspect.capture import capture_residuals, stream_parts
from lmforge.inspect.inputs import Inputs, prepare_inputs, token_label, token_text

LABELLED_POSITIONS = 64  # the heat map labels its cells and positions up to this many


@dataclass
class LogitLens:
    """top_ids/top_probs [n_layer + 1, T, k]: row 0 the embeddings, row i + 1 after block i."""

    inputs: Inputs
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    top_texts: list[list[list[str]]]  # [row][position][rank]
    logits: torch.Tensor  # the model's own output [T, vocab]
    files: list[Path] = field(default_factory=list)

    @property
    def row_names(self) -> list[str]:
        return ["embeddings"] + [f"block {i}" for i in range(self.top_ids.shape[0] - 1)]


def logit_lens(loaded, text: str, source: str | None = None, *, top: int = 5) -> LogitLens:
    model, tok = loaded.model, loaded.tokenizer
    if not 1 <= top <= model.config.vocab_size:
        raise LmforgeError(f"--top must be in [1, {model.config.vocab_size}] (the vocabulary), got {top}")
    inputs = prepare_inputs(loaded, text, source)
    states, logits = capture_residuals(model, inputs)
    _, norm_f, head = stream_parts(model)
    ids, probs = [], []
    with torch.inference_mode():
        for x in states:  # one layer at a time: [T, vocab] fp32 each, never [layers, T, vocab]
            p = torch.softmax(head(norm_f(x)).float(), dim=-1)
            values, indices = p.topk(top, dim=-1)
            probs.append(values.cpu())
            ids.append(indices.cpu())
    top_ids, top_probs = torch.stack(ids), torch.stack(probs)
    texts = [[[token_text(tok, i) for i in pos] for pos in row.tolist()] for row in top_ids]
    return LogitLens(inputs, top_ids, top_probs, texts, logits.float().cpu())


def markdown(lens: LogitLens, model_name: str) -> str:
    from lmforge.report import markdown_table

    cell = lambda t: token_label(t, 14).replace("|", "\\|")  # noqa: E731
    headers = ["layer"] + [f"{i}: {cell(t)}" for i, t in enumerate(lens.inputs.texts)]
    rows = [[name] + [f"{cell(texts[0])} {float(p[0]):.2f}" for texts, p in zip(lens.top_texts[r], lens.top_probs[r])]
            for r, name in enumerate(lens.row_names)]
    k = lens.top_ids.shape[-1]
    return (f"# Logit lens: {model_name}\n\nEach row: the residual stream after that block (the first: the embeddings) "
            "through the final norm and the output head. Each cell: the most likely next token at that position and "
            f"its probability; the column heads are the input tokens. The last row is the model's own output. "
            f"The top {k} per cell are in logit-lens.csv.\n\n" + markdown_table(headers, rows) + "\n")


def csv_text(lens: LogitLens) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "position", "input_token", "rank", "token_id", "token", "probability"])
    for r, name in enumerate(lens.row_names):
        for pos, inp in enumerate(lens.inputs.texts):
            for rank in range(lens.top_ids.shape[-1]):
                w.writerow([name, pos, inp, rank + 1, int(lens.top_ids[r, pos, rank]), lens.top_texts[r][pos][rank],
                            f"{float(lens.top_probs[r, pos, rank]):.6g}"])
    return buf.getvalue()


def plot(lens: LogitLens, path: Path, model_name: str) -> Path:
    from lmforge.report import save_png, subplots

    p = lens.top_probs[:, :, 0].numpy()
    rows, T = p.shape
    fig, ax = subplots(figsize=(min(40.0, 1.5 + 0.75 * T), min(30.0, 1.6 + 0.32 * rows)))
    im = ax.imshow(p, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", origin="lower", interpolation="nearest")
    if T <= LABELLED_POSITIONS:  # beyond, the labels would overlap (and take minutes to draw)
        size = 7 if T <= 24 else 5
        for r in range(rows):
            for t in range(T):
                ax.text(t, r, token_label(lens.top_texts[r][t][0], 8), ha="center", va="center", fontsize=size,
                        color="black" if p[r, t] > 0.6 else "white")
        ax.set_xticks(range(T), [token_label(t, 10) for t in lens.inputs.texts], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(rows), ["emb"] + [str(i) for i in range(rows - 1)], fontsize=7)
    ax.set_ylabel("residual stream after block (emb = the embeddings)")
    ax.set_xlabel("input token (each cell: the next token predicted there)")
    ax.set_title(f"logit lens: {model_name}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="probability of the top token")
    fig.tight_layout()
    return save_png(fig, path)


def write_lens(lens: LogitLens, out: Path, model_name: str) -> list[Path]:
    import warnings

    from lmforge.fsutil import write_text_atomic

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{out} exists and is not a folder: -o names the folder the tables go to")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "logit-lens.md", markdown(lens, model_name))
    write_text_atomic(out / "logit-lens.csv", csv_text(lens))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        plot(lens, out / "logit-lens.png", model_name)
    lens.files = [out / "logit-lens.md", out / "logit-lens.csv", out / "logit-lens.png"]
    return lens.files
