"""What the inspection pages share: one self-contained HTML file each (inline CSS and JS, no
fonts, scripts or images fetched from anywhere), data embedded as JSON."""

from __future__ import annotations

import html
import json

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; max-width: 72em; }
h1 { font-size: 1.3em; } .meta { color: #555; font-size: 0.9em; }
.tokens { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.95em;
  line-height: 1.9; white-space: pre-wrap; word-break: break-word; }
.tok { border-radius: 3px; padding: 1px 0; cursor: default; }
.tok.nl::after { content: "\\21B5"; color: #aaa; }
"""


def escape(text: str) -> str:
    return html.escape(text, quote=True)


def embed_json(data) -> str:
    """JSON that is safe inside a <script> element (no "</script>" or "<!--" can end it)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def page(title: str, body: str, *, css: str = "", script: str = "") -> str:
    js = f"<script>\n{script}\n</script>\n" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{CSS}{css}</style>\n</head>\n<body>\n{body}\n{js}</body>\n</html>\n")
