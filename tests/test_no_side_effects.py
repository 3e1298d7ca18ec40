"""`import lmforge` changes nothing in the user's process: no environment variable, no matplotlib
backend (a notebook keeps its inline plots), and plotting goes through lmforge's own canvas.
Huge pages are opt-in (`lmforge.allocator.use_huge_pages`), set by the `lmforge` command for its
own process. Each check runs in a fresh interpreter: the pytest process has imported everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _child(code: str, env: dict | None = None) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "THP_MEM_ALLOC_ENABLE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


IMPORT_AND_PLOT = """
import json, os, sys, tempfile
from pathlib import Path
import matplotlib
matplotlib.use("svg")  # the user's choice, as a notebook's inline backend would be
env = dict(os.environ)
import lmforge, lmforge.cli
torch_after_cli = "torch" in sys.modules
import lmforge.report, lmforge.eval.results
rows = [{"step": s, "train_loss": 3.0 - s / 10, "lr": 1e-3} for s in range(5)]
out = Path(tempfile.mkdtemp())
png = lmforge.report.plot_loss_curves(rows, out / "loss.png")
lmforge.eval.results._plot_windows({"nll": 1.0, "perplexity": 2.7, "settings": {"stride": 8},
                                    "details": {"window_nll": [1.0, 1.2, 0.8]}}, out / "w.png")
print(json.dumps({
    "env_changed": sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)),
    "backend": matplotlib.get_backend(),
    "pyplot": "matplotlib.pyplot" in sys.modules,
    "torch_after_cli": torch_after_cli,
    "png": png.read_bytes()[:8].hex(),
    "png2": (out / "w.png").read_bytes()[:8].hex(),
}))
"""


def test_import_changes_no_environment_and_no_matplotlib_backend():
    r = _child(IMPORT_AND_PLOT)
    assert r["env_changed"] == []
    assert r["backend"] == "svg" and not r["pyplot"]
    assert r["png"] == r["png2"] == b"\x89PNG\r\n\x1a\n".hex()
    # entry() sets huge pages before torch is imported: the CLI module must stay torch-free.
    assert not r["torch_after_cli"]


HUGE_PAGES = """
import json, os, sys
from lmforge.allocator import use_huge_pages
from lmforge.errors import LmforgeError
first = use_huge_pages()
value = os.environ.get("THP_MEM_ALLOC_ENABLE")
if sys.argv[1] == "late":
    del os.environ["THP_MEM_ALLOC_ENABLE"]
    import types
    sys.modules["torch"] = types.ModuleType("torch")  # torch loaded (all the check can see; a real import takes seconds)
    try:
        use_huge_pages()
        late = None
    except LmforgeError as e:
        late = str(e)
else:
    late = None
print(json.dumps({"on": first, "value": value, "late": late}))
"""


def _huge_pages(mode: str, env: dict | None = None) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES, mode], capture_output=True, text=True, env={**base, **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_use_huge_pages_is_opt_in_and_refused_once_torch_is_loaded():
    assert _huge_pages("early") == {"on": True, "value": "1", "late": None}
    assert _huge_pages("early", {"THP_MEM_ALLOC_ENABLE": "0"}) == {"on": False, "value": "0", "late": None}  # the user's wins
    late = _huge_pages("late")["late"]
    assert late == ("use_huge_pages() must be called before torch is imported (it is already); "
                    "call it first, or set THP_MEM_ALLOC_ENABLE=1 before starting Python")


CLI_ENTRY = """
import json, os, sys
import lmforge.cli as cli
seen = {}
def fake_main(argv=None):
    seen.update(thp=os.environ.get("THP_MEM_ALLOC_ENABLE"), torch="torch" in sys.modules)
    return 0
cli.main = fake_main
try:
    cli.entry()
except SystemExit as e:
    seen["code"] = e.code
print(json.dumps(seen))
"""


def test_the_cli_sets_huge_pages_for_its_own_process_before_torch():
    assert _child(CLI_ENTRY) == {"thp": "1", "torch": False, "code": 0}


# -- logs people can read ------------------------------------------------------------------------
def test_progress_to_a_pipe_is_plain_lines(cli, tmp_path, tiny_model_dir, one_thread):
    """stderr not a terminal (the cli fixture captures it): no carriage-return frames, one line
    per bar when the work takes less than the interval, and that line says what was done."""
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    r = cli("eval", "ppl", tiny_model_dir, "--data", text, "--context", 64, "--stride", 32, "-o", tmp_path / "p.json")
    assert r.code == 0, r.err
    assert "\r" not in r.err and "\x1b[" not in r.err
    lines = [ln for ln in r.err.splitlines() if ln.startswith("perplexity:")]
    assert len(lines) == 1, r.err
    windows = len(json.loads((tmp_path / "p.json").read_text())["details"]["window_nll"])
    assert lines[0].startswith(f"perplexity: {windows}/{windows} window (100%), ") and "done in 00:0" in lines[0]


def test_line_progress_prints_every_interval_with_rate_eta_and_postfix(monkeypatch):
    import io

    import lmforge.progress as progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    bar = progress.progress_bar(total=400, desc="train", unit="step", file=out)
    assert isinstance(bar, progress.LineProgress)
    for step in range(100):
        now[0] += 1.0  # a step a second: 100 s in all
        bar.update(1)
        bar.set_postfix(loss=f"{4 - step / 100:.2f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # one every 10 s, and the last
    assert lines[0] == "train: 10/400 step (2%), 1 step/s, ETA 06:30, loss=3.92"  # printed by update(), before this step's postfix
    assert lines[-1] == "train: 100/400 step (25%), 1 step/s, stopped after 01:40, loss=3.01"  # short of 400


def test_progress_on_a_terminal_is_tqdm():
    import io

    from tqdm import tqdm

    from lmforge.progress import progress_bar

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    bar = progress_bar(total=3, desc="pack", file=out)
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.close()
    assert "\r" in out.getvalue()


# -- global state: scoped to the call, and to the thread ---------------------------------------
def test_skip_init_patches_nothing_global_and_other_threads_still_initialise():
    import threading

    import torch
    from torch import nn

    from lmforge.model.gpt import skip_init

    def build(seed: int):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Embedding(8, 16))

    expected = [p.detach().clone() for p in build(3).parameters()]
    normal = nn.init.normal_
    built = {}
    with skip_init():
        assert nn.init.normal_ is normal  # nothing monkeypatched
        worker = threading.Thread(target=lambda: built.update(m=build(3)))
        worker.start()
        worker.join()
        # This thread skips the init: the RNG is not drawn from (a real init would move it).
        torch.manual_seed(5)
        state = torch.random.get_rng_state()
        nn.Linear(16, 16)
        assert torch.equal(torch.random.get_rng_state(), state)
    for got, want in zip(built["m"].parameters(), expected):
        assert torch.equal(got, want)  # the other thread's model got its usual init
