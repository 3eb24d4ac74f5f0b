"""Blocks (:mod:`dfqkern.report.content`) as markdown with linked PNGs, or as one HTML page with the
PNGs embedded (base64 data URIs), so the HTML file is the whole report."""
from __future__ import annotations

import base64
import html

from .content import Block

_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.6em 0;font-size:.85em}th,td{border:1px solid #ccc;padding:.2em .5em;"
        "text-align:left}th{background:#f2f2f2}img{max-width:100%}pre{background:#f6f6f6;padding:.6em;"
        "font-size:.8em;overflow-x:auto}code{background:#f6f6f6}")


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    lines = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "table":
            lines.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            lines.append("|" + "|".join("---" for _ in b.headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif b.kind == "img":
            lines += [f"![{b.text}]({b.file})", ""]
        elif b.kind == "code":
            lines += ["```json", b.text, "```", ""]
        else:
            raise ValueError(f"unknown block kind {b.kind!r}")
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escape, then turn markdown's `code` spans into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(blocks: list[Block], images: dict[str, bytes], title: str = "dfqkern quantization report") -> str:
    """``images``: PNG bytes by the file name the blocks refer to (embedded, not linked)."""
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "img":
            data = base64.b64encode(images[b.file]).decode("ascii")
            body.append(f'<p><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}"></p>')
        elif b.kind == "code":
            body.append(f"<pre>{html.escape(b.text)}</pre>")
        else:
            raise ValueError(f"unknown block kind {b.kind!r}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
