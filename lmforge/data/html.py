"""HTML to plain text with a real HTML5 parser (Lexbor, through selectolax): never regexes."""

from __future__ import annotations

import re

from selectolax.lexbor import LexborHTMLParser

# Boilerplate and non-content elements whose text must not reach the corpus.
DROP_TAGS = ("script", "style", "nav", "noscript", "template", "head", "svg", "iframe", "form", "button")
# Elements that start a new line in rendered text; inline ones (b, a, span...) do not.
BLOCK_TAGS = frozenset(
    "address article aside blockquote dd details div dl dt fieldset figcaption figure footer h1 h2 h3 "
    "h4 h5 h6 header hr li main ol p pre section summary table tbody thead tfoot tr ul caption".split()
)
CELL_TAGS = frozenset(("td", "th"))
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


def html_to_text(html: str) -> str:
    tree = LexborHTMLParser(html)
    for node in tree.css(",".join(DROP_TAGS)):
        node.decompose()
    root = tree.body if tree.body is not None else tree.root
    if root is None:
        return ""
    parts: list[str] = []

    def at_line_start() -> bool:
        return not parts or parts[-1].endswith("\n")

    # Iterative walk (deeply nested pages would overflow recursion); None marks a block's end.
    stack: list = [root.first_child] if root.first_child is not None else []
    while stack:
        node = stack.pop()
        if node is None:
            parts.append("\n")
            continue
        if node.next is not None:
            stack.append(node.next)
        if node.is_text_node:
            text = node.text_content or ""
            if not _inside_pre(node):
                text = _HTML_SPACE.sub(" ", text)
                if at_line_start():
                    text = text.lstrip(" ")
            if text:
                parts.append(text)
            continue
        tag = node.tag
        if tag == "br":
            parts.append("\n")
        elif tag in CELL_TAGS and not at_line_start():
            parts.append("\t")
        if node.first_child is None:
            continue
        if tag in BLOCK_TAGS:
            parts.append("\n")
            stack.append(None)
        stack.append(node.first_child)
    text = "\n".join(line.rstrip() for line in "".join(parts).split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


def _inside_pre(node) -> bool:
    parent = node.parent
    while parent is not None:
        if parent.tag == "pre":
            return True
        parent = parent.parent
    return False
