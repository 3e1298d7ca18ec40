"""Serving: `lmforge serve` (continuous batching) against llama-cpp-python's OpenAI-compatible
server (one request at a time) on the same GGUF, SmolLM2-135M-Instruct Q4_1 as shipped.

Each server runs as a subprocess on a free loopback port (lmforge from this venv, the peer from the
venv bench/setup_llamacpp.sh built), is warmed up with a few short requests, then loaded with C
concurrent streaming clients for each C in --clients. Every client sends its requests one after
another (POST /v1/chat/completions, stream, temperature 0, max_tokens fixed; --requests-per-client,
by default enough for ~--requests-per-level requests in all, at least 2 each), cycling through a
few short chat prompts. A level is bounded: no client starts a request after --max-seconds, and a
response still open at twice that is cut (counted apart from errors; its tokens so far count, and a
wait without a first token enters the TTFT percentiles as a lower bound). Figures per level:
  - aggregate generated tokens/s: all completion tokens / wall time of the level (first request
    sent to last response done)
  - time to first token (request sent to the first chunk with text), p50 / p99
  - inter-token latency (gap between successive text chunks of a response), p50 / p99
  - requests done, cut, errors (must be 0; each is printed); CPU seconds of the server's process
    tree, of the client, and of every other process meanwhile (`other_cpu_s`: more than a few
    seconds means a neighbour disturbed the level)
Generation length is fixed on both sides: lmforge gets `ignore_eos: true`; llama-cpp-python has no
such field, so the peer gets `logit_bias: -100` on every end-of-generation token of the vocabulary
(read from the GGUF) and `repeat_penalty: 1.0` (its default 1.1 would change the text and the
work). Completion tokens come from the final chunk's `usage` (`stream_options.include_usage`)
where the server sends it (lmforge does, llama-cpp-python ignores the option); otherwise a response
that finished with "length" counts max_tokens and any other the text chunks it had. The JSON says
which (`token_count`) and how many responses were shorter than max_tokens. Peak RSS of each server's process tree is sampled every 100 ms with
psutil. The peer runs with `--interrupt_requests False` (its default cuts a streaming response
short as soon as another request arrives) and --peer-threads threads (2, as lmforge's).

Plus the reference for the single-client target: `lmforge generate`'s own single-stream speed on the
same chat prompts and max tokens, in-process (`Engine.generate_ids`, as the CLI runs it without a
terminal), in a fresh process: tokens / (prefill + decode) time. `--lmforge-arg=--int8-activations`
serves with int8 activations, and the reference then uses them too.

Each figure is the median of --runs runs; each run starts each server afresh (interleaved: lmforge,
then the peer, then the `generate` reference). Targets (lmforge): at 8 clients ≥ 3× its own
single-client tokens/s and ≥ 2× the peer's at 8 clients; single client within 10% of `lmforge
generate`; p99 TTFT at 8 clients ≤ 2 s.

    bash bench/setup_llamacpp.sh /work/peer/llama-venv       # once: the peer, with its [server] extra
    .venv/bin/python bench/bench_serve.py --runs 3 --save     # bench/results/serve.json + serve.png

The client shares the machine with the server (2 cores here): keep other load low while timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from benchutil import REPO, run_measured

RESULTS = REPO / "bench" / "results"
MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms, in simple words.",
    "Give me some tips for staying focused when working from home.",
    "What are the main differences between Python and C?",
]
THREADS = 2


# -- servers ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def tree_cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Server:
    """A server subprocess: started, awaited until healthy, sampled for RSS, stopped."""

    def __init__(self, name: str, argv: list[str], port: int, health: str, log_dir: Path):
        self.name, self.argv, self.port, self.health = name, argv, port, health
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}-{port}.log"
        self.peak_rss = 0
        self._stop = threading.Event()

    def start(self, timeout: float = 600) -> float:
        """Start and wait for the health URL; the seconds it took."""
        t0 = time.perf_counter()
        self.log = open(self.log_path, "w")
        self.popen = subprocess.Popen(self.argv, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        self.proc = psutil.Process(self.popen.pid)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        while time.perf_counter() - t0 < timeout:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.base + self.health, timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"{self.name} not healthy after {timeout} s:\n{tail}")

    def _sample(self) -> None:
        while not self._stop.is_set() and self.popen.poll() is None:
            self.peak_rss = max(self.peak_rss, tree_rss(self.proc))
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        return tree_cpu(self.proc)

    def model_id(self) -> str:
        return httpx.get(self.base + "/v1/models", timeout=10).json()["data"][0]["id"]

    def stop(self) -> None:
        if self._stop.is_set() or not hasattr(self, "popen"):
            return
        self._stop.set()
        children = self.proc.children(recursive=True) if self.popen.poll() is None else []
        self.popen.terminate()
        try:
            self.popen.wait(20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        for child in children:  # anything the server started and left behind
            try:
                child.kill()
            except psutil.Error:
                pass
        self.log.close()

    def log_tail(self, n: int = 3000) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]


def lmforge_server(args, port: int, log_dir: Path) -> Server:
    argv = [sys.executable, "-m", "lmforge", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
            "--max-batch", str(args.max_batch or max(args.clients)), *args.lmforge_arg]
    return Server("lmforge", argv, port, "/health", log_dir)


def peer_server(args, port: int, log_dir: Path) -> Server:
    argv = [str(args.peer_venv / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(args.gguf),
            "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(args.peer_threads),
            "--n_threads_batch", str(args.peer_threads),
            "--n_ctx", "2048", "--interrupt_requests", "False"]
    return Server("llama.cpp", argv, port, "/v1/models", log_dir)


def peer_eog_ids(args) -> list[int]:
    """The GGUF's end-of-generation token ids, as llama.cpp itself classifies them."""
    code = ("import json, llama_cpp\n"
            f"m = llama_cpp.Llama({str(args.gguf)!r}, vocab_only=True, verbose=False)\n"
            "v = m._model.vocab\n"
            "print(json.dumps([t for t in range(llama_cpp.llama_vocab_n_tokens(v)) if llama_cpp.llama_vocab_is_eog(v, t)]))")
    out = subprocess.run([str(args.peer_venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the load --------------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, body: dict, rec: dict) -> None:
    """One streaming chat completion into `rec`: times of its text chunks, usage, finish reason."""
    rec.update(t0=time.perf_counter(), ttft=None, gaps=[], chunks=0, usage=None, finish=None, error=None, cut=False)
    last = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:1000]}"
                return
            done = False
            async for line in resp.aiter_lines():  # SSE: "data: {json}" lines; ":" comments, blank lines
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    rec["error"] = f"error event: {data[:1000]}"
                    return
                if event.get("usage"):
                    rec["usage"] = event["usage"]
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        rec["chunks"] += 1
                        if last is None:
                            rec["ttft"] = now - rec["t0"]
                        else:
                            rec["gaps"].append(now - last)
                        last = now
                    if choice.get("finish_reason"):
                        rec["finish"] = choice["finish_reason"]
            if not done:
                rec["error"] = "stream ended without data: [DONE]"
    except asyncio.CancelledError:  # cut at the level's hard limit: not an error, reported apart
        rec["cut"] = True
        raise
    except Exception as e:  # noqa: BLE001 - every failure is a counted, printed error
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        rec["end"] = time.perf_counter()


def completion_tokens(rec: dict, max_tokens: int) -> tuple[int, str]:
    if rec["usage"] and "completion_tokens" in rec["usage"]:
        return rec["usage"]["completion_tokens"], "usage"
    if rec["finish"] == "length":
        return max_tokens, "finish_reason=length"
    return rec["chunks"], "text chunks"


async def run_level(base: str, body: dict, clients: int, per_client: int, max_seconds: float) -> dict:
    """C clients, each sending its requests in sequence; none starts after max_seconds, and what is
    still open at 2 x max_seconds is cut (cancelled; its tokens so far still count)."""
    records: list[dict] = []
    not_sent = 0
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    timeout = httpx.Timeout(10.0, read=2 * max_seconds + 60)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:
        start = time.perf_counter()

        async def worker(i: int) -> None:
            nonlocal not_sent
            for j in range(per_client):
                if time.perf_counter() - start >= max_seconds:
                    not_sent += per_client - j
                    return
                records.append(rec := {})
                msg = [{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}]
                await one_request(client, {**body, "messages": msg}, rec)

        tasks = [asyncio.create_task(worker(i)) for i in range(clients)]
        _, late = await asyncio.wait(tasks, timeout=2 * max_seconds)
        for t in late:
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        wall = max((r["end"] for r in records), default=start) - start
    return {"records": records, "wall_s": wall, "not_sent": not_sent}


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def summarize(level: dict, max_tokens: int) -> dict:
    done = [r for r in level["records"] if not r["error"] and not r["cut"]]
    cut = [r for r in level["records"] if r["cut"]]
    errors = [r["error"] for r in level["records"] if r["error"]]
    counted = [completion_tokens(r, max_tokens) for r in done]
    tokens = sum(n for n, _ in counted) + sum(r["chunks"] for r in cut)
    # A request cut before its first token waited at least until the cut: that wait enters the
    # TTFT percentiles as a lower bound (ttft_lower_bounds says how many).
    waits = [r["end"] - r["t0"] for r in cut if r["ttft"] is None]
    ttfts = [r["ttft"] for r in done + cut if r["ttft"] is not None] + waits
    gaps = [g for r in done + cut for g in r["gaps"]]
    return {
        "tokens_per_s": round(tokens / level["wall_s"], 1) if level["wall_s"] > 0 else 0.0,
        "ttft_ms_p50": pct(ttfts, 50),
        "ttft_ms_p99": pct(ttfts, 99),
        "itl_ms_p50": pct(gaps, 50),
        "itl_ms_p99": pct(gaps, 99),
        "requests": len(done),
        "errors": len(errors),
        "error_messages": sorted(set(errors))[:5],
        "cut_at_limit": len(cut),
        "ttft_lower_bounds": len(waits),
        "not_sent_after_deadline": level["not_sent"],
        "tokens": tokens,
        "short_responses": sum(n < max_tokens for n, _ in counted),
        "tokens_per_text_chunk": round(sum(n for n, _ in counted) / max(1, sum(r["chunks"] for r in done)), 3),
        "token_count": sorted({how for _, how in counted}),
        "wall_s": round(level["wall_s"], 2),
    }


def per_client_requests(args, clients: int) -> int:
    if args.requests_per_client:
        return args.requests_per_client
    return max(2, math.ceil(args.requests_per_level / clients))


def others_cpu(exclude: set[int]) -> dict[int, float]:
    """CPU seconds of every process outside `exclude`, with the children each has reaped."""
    out = {}
    for p in psutil.process_iter():
        if p.pid in exclude:
            continue
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return out


def neighbours_cpu_seconds(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(max(0.0, v - before.get(pid, 0.0)) for pid, v in after.items())


def bench_server(server: Server, args, body: dict) -> dict:
    out: dict = {"levels": {}}
    try:
        out["load_s"] = round(server.start(), 2)
        body = {**body, "model": server.model_id()}
        warm = time.perf_counter()  # prefill, batch 1 and a small batch, so no level pays a first-use cost
        asyncio.run(run_level(server.base, {**body, "max_tokens": 32}, 4, 2, 120))
        out["warmup_s"] = round(time.perf_counter() - warm, 2)
        for clients in args.clients:
            ours = {os.getpid(), server.proc.pid, *(c.pid for c in server.proc.children(recursive=True))}
            cpu_client, cpu_server, cpu_others = time.process_time(), server.cpu_seconds(), others_cpu(ours)
            level = asyncio.run(run_level(server.base, body, clients, per_client_requests(args, clients), args.max_seconds))
            s = summarize(level, args.max_tokens)
            s["client_cpu_s"] = round(time.process_time() - cpu_client, 2)
            s["server_cpu_s"] = round(server.cpu_seconds() - cpu_server, 2)
            # CPU time of every other process meanwhile: more than a few seconds means a noisy level
            s["other_cpu_s"] = round(neighbours_cpu_seconds(cpu_others, others_cpu(ours)), 2)
            for msg in s["error_messages"]:
                print(f"[{server.name}] {clients} clients: ERROR {msg}", file=sys.stderr)
            print(f"[{server.name}] {clients:>2} clients: {s['tokens_per_s']:7.1f} tok/s, ttft p50/p99 "
                  f"{s['ttft_ms_p50']}/{s['ttft_ms_p99']} ms, itl p50/p99 {s['itl_ms_p50']}/{s['itl_ms_p99']} ms, "
                  f"{s['requests']} done, {s['cut_at_limit']} cut, {s['errors']} errors, {s['wall_s']} s, "
                  f"other CPU {s['other_cpu_s']} s", file=sys.stderr)
            out["levels"][str(clients)] = s
    finally:
        server.stop()
    out["peak_rss_mb"] = round(server.peak_rss / 2**20, 1)
    return out


# -- `lmforge generate`'s own speed, in a fresh process ---------------------------------------------
def run_generate(model: str, max_tokens: int, int8_activations: bool = False, reps: int = 2) -> dict:
    from lmforge.chat import render_chat
    from lmforge.generate.engine import Engine
    from lmforge.generate.params import SamplingParams
    from lmforge.interop.registry import load_model

    loaded = load_model(model)
    engine = Engine(loaded.model, loaded.tokenizer, stop_token_ids=loaded.generation.get("stop_token_ids", ()),
                    int8_activations=int8_activations)
    prompts = [render_chat(loaded.tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True).ids
               for p in PROMPTS]
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, top_k=0, ignore_eos=True)
    first = SamplingParams(max_new_tokens=1, temperature=0.0, top_k=0, ignore_eos=True)
    engine.generate_ids([prompts[0]], SamplingParams(max_new_tokens=32, temperature=0.0, top_k=0, ignore_eos=True))

    def timed(ids, p):
        t = time.perf_counter()
        engine.generate_ids([ids], p)
        return time.perf_counter() - t

    whole = [timed(ids, params) for _ in range(reps) for ids in prompts]
    ttft = [timed(ids, first) for ids in prompts]
    return {"tokens_per_s": max_tokens / statistics.median(whole), "ttft_ms": 1000 * statistics.median(ttft),
            "decode_tokens_per_s": (max_tokens - 1) / (statistics.median(whole) - statistics.median(ttft)),
            "prompt_tokens": [len(ids) for ids in prompts]}


# -- results ---------------------------------------------------------------------------------------
def median_levels(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]["levels"]:
        levels = [r["levels"][key] for r in runs if key in r["levels"]]
        m = {k: round(statistics.median(x[k] for x in levels if x[k] is not None), 1)
             for k in ("tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "wall_s",
                       "client_cpu_s", "server_cpu_s") if any(x[k] is not None for x in levels)}
        m["runs_other_cpu_s"] = [x["other_cpu_s"] for x in levels]
        m.update({"runs_tokens_per_s": [x["tokens_per_s"] for x in levels],
                  "runs_ttft_ms_p99": [x["ttft_ms_p99"] for x in levels],
                  "requests": [x["requests"] for x in levels], "errors": sum(x["errors"] for x in levels),
                  "short_responses": sum(x["short_responses"] for x in levels),
                  "cut_at_limit": sum(x["cut_at_limit"] for x in levels),
                  "ttft_lower_bounds": sum(x["ttft_lower_bounds"] for x in levels),
                  "not_sent_after_deadline": sum(x["not_sent_after_deadline"] for x in levels),
                  "tokens_per_text_chunk": statistics.median(x["tokens_per_text_chunk"] for x in levels),
                  "token_count": sorted({h for x in levels for h in x["token_count"]})})
        out[key] = m
    return out


def targets(result: dict) -> dict:
    ours = result.get("lmforge", {}).get("levels", {})
    peer = result.get("llama.cpp", {}).get("levels", {})
    gen = result.get("lmforge_generate", {})
    t: dict = {}

    def add(name, value, target, met):
        t[name] = {"value": round(value, 3), "target": target, "met": bool(met)}

    if "8" in ours and "1" in ours:
        r = ours["8"]["tokens_per_s"] / ours["1"]["tokens_per_s"]
        add("tokens_per_s_8_clients_vs_own_1_client", r, ">= 3.0", r >= 3.0)
    if "8" in ours and "8" in peer:
        r = ours["8"]["tokens_per_s"] / peer["8"]["tokens_per_s"]
        add("tokens_per_s_8_clients_vs_peer_8_clients", r, ">= 2.0", r >= 2.0)
    if "1" in ours and gen:
        r = ours["1"]["tokens_per_s"] / gen["tokens_per_s"]
        add("tokens_per_s_1_client_vs_lmforge_generate", r, "within 10% (>= 0.9)", r >= 0.9)
    if "8" in ours:
        v = ours["8"]["ttft_ms_p99"] / 1000
        add("ttft_p99_s_8_clients", v, "<= 2.0", v <= 2.0)
    return t


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, style in (("lmforge", "o-"), ("llama.cpp", "s-")):
        if name in result:
            levels = result[name]["levels"]
            xs = [int(c) for c in levels]
            label = "lmforge serve" if name == "lmforge" else "llama-cpp-python server"
            ax.plot(xs, [levels[c]["tokens_per_s"] for c in levels], style, label=label)
    if "lmforge_generate" in result:
        ax.axhline(result["lmforge_generate"]["tokens_per_s"], color="gray", ls="--", lw=1,
                   label="lmforge generate, single stream")
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(c) for c in next(iter(r["levels"] for k, r in result.items() if "levels" in r))])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("aggregate generated tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{Path(result['config']['gguf']).stem}, {result['config']['max_tokens']} tokens a request, "
                 f"{result['machine']['cpus']} CPUs", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,4,8,16,32", help="concurrency levels, comma-separated")
    ap.add_argument("--requests-per-client", type=int, default=None,
                    help="requests each client sends in sequence (default: --requests-per-level / clients, at least 2)")
    ap.add_argument("--requests-per-level", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=60,
                    help="per level: no client starts a request after this; requests open at twice this are cut")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--systems", default="lmforge,llama.cpp", help="which servers to run")
    ap.add_argument("--no-generate", action="store_true", help="skip the `lmforge generate` reference")
    ap.add_argument("--model", default=MODEL, help="what `lmforge serve` and `generate` load")
    ap.add_argument("--gguf", type=Path, default=None, help="the peer's GGUF (default: lmforge's cached copy of MODEL's)")
    ap.add_argument("--max-batch", type=int, default=None, help="lmforge serve --max-batch (default: the most clients)")
    ap.add_argument("--lmforge-arg", action="append", default=[], help="extra argument for `lmforge serve` (repeatable)")
    ap.add_argument("--peer-venv", type=Path, default=Path("/work/peer/llama-venv"))
    ap.add_argument("--peer-threads", type=int, default=THREADS, help="the peer's --n_threads and --n_threads_batch")
    ap.add_argument("--save", action="store_true", help="write bench/results/serve.json and serve.png")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    systems = args.systems.split(",")
    if args.gguf is None:  # the very file lmforge's registry fetched and imported for MODEL
        code = f"from lmforge.interop.registry import fetch_known_gguf; print(fetch_known_gguf({args.model!r}))"
        found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        if found.returncode != 0:
            sys.exit(f"could not locate {args.model}'s GGUF (pass --gguf):\n{found.stderr[-2000:]}")
        args.gguf = Path(found.stdout.strip().splitlines()[-1])
    body = {"stream": True, "max_tokens": args.max_tokens, "temperature": 0.0, "seed": 0}
    bodies = {
        "lmforge": {**body, "ignore_eos": True, "stream_options": {"include_usage": True}},
        "llama.cpp": {**body, "stream_options": {"include_usage": True}, "repeat_penalty": 1.0},
    }
    if "llama.cpp" in systems:
        eog = peer_eog_ids(args)
        bodies["llama.cpp"]["logit_bias"] = {str(t): -100.0 for t in eog}
    makers = {"lmforge": lmforge_server, "llama.cpp": peer_server}
    load_start = [round(x, 2) for x in os.getloadavg()]
    log_dir = Path(tempfile.mkdtemp(prefix="lmforge-bench-serve-"))
    raw: dict = {name: [] for name in systems}
    gen_runs: list[dict] = []
    for run in range(args.runs):
        for name in systems:
            print(f"run {run + 1}/{args.runs}: {name}", file=sys.stderr)
            raw[name].append(bench_server(makers[name](args, free_port(), log_dir), args, bodies[name]))
        if not args.no_generate:
            int8 = "--int8-activations" in args.lmforge_arg  # the same arithmetic as the server's
            code = f"import json, bench_serve as b; print(json.dumps(b.run_generate({args.model!r}, {args.max_tokens}, {int8})))"
            gen_runs.append(run_measured(code, env={"OMP_NUM_THREADS": str(THREADS)}))
            print(f"run {run + 1}/{args.runs}: lmforge generate {gen_runs[-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr)

    result: dict = {"config": {
        "clients": args.clients, "max_tokens": args.max_tokens, "max_seconds": args.max_seconds, "runs": args.runs,
        "requests_per_client": {str(c): per_client_requests(args, c) for c in args.clients},
        "prompts": PROMPTS, "endpoint": "/v1/chat/completions", "threads": THREADS, "gguf": str(args.gguf),
        "request_bodies": {k: v for k, v in bodies.items() if k in systems},
        "commands": {name: " ".join(makers[name](args, 0, log_dir).argv[1:]).replace("--port 0", "--port PORT")
                     for name in systems},
    }}
    for name, runs in raw.items():
        result[name] = {"levels": median_levels(runs),
                        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                        "runs_peak_rss_mb": [r["peak_rss_mb"] for r in runs],
                        "load_s": statistics.median(r["load_s"] for r in runs),
                        "warmup_s": statistics.median(r["warmup_s"] for r in runs)}
    if "llama.cpp" in raw:
        result["llama.cpp"]["version"] = subprocess.run(
            [str(args.peer_venv / "bin" / "python"), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
            capture_output=True, text=True).stdout.strip()
        result["llama.cpp"]["fixed_length"] = f"logit_bias -100 on end-of-generation ids {sorted(map(int, bodies['llama.cpp']['logit_bias']))}"
    if "lmforge" in raw:
        result["lmforge"]["fixed_length"] = "ignore_eos: true"
    if gen_runs:
        result["lmforge_generate"] = {k: round(statistics.median(r[k] for r in gen_runs), 1)
                                      for k in ("tokens_per_s", "ttft_ms", "decode_tokens_per_s", "peak_rss_mb")}
        result["lmforge_generate"]["runs_tokens_per_s"] = [round(r["tokens_per_s"], 1) for r in gen_runs]
        result["lmforge_generate"]["prompt_tokens"] = gen_runs[0]["prompt_tokens"]
    result["targets"] = targets(result)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                         "load_average_start": load_start, "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "serve.json").write_text(text + "\n")
        plot(result, RESULTS / "serve.png")


if __name__ == "__main__":
    main()
