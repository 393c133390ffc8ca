"""Render one report document as Markdown and as self-contained HTML.

A document is a list of ``Section``s, each a list of blocks (``Note``, ``Table``, ``Plot``); both writers
walk the same list, so the two files always say the same thing. Every string from a record is
escaped (``html.escape`` in HTML; in Markdown ``<``, ``>``, ``&`` as entities, the characters of links,
images, emphasis and code with a backslash, line breaks as spaces, and ``|`` in tables), and no table cell
is longer than ``CELL_LIMIT`` characters.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .plots import Plot

# no scripts, no external loads: images are data: URIs; a record string can never run code
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
# backslash-escaped in Markdown: with [ ] escaped no link or image can open, so ( ) stay readable
MD_ESCAPE = str.maketrans({c: "\\" + c for c in "\\`*[]!~$"})
CELL_LIMIT = 1000  # characters of one table cell
CSS = """
body { font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
caption { caption-side: top; text-align: left; font-style: italic; padding: 0.3em 0; }
td { font-variant-numeric: tabular-nums; }
.warning { background: #fff3cd; border: 2px solid #d39e00; color: #5c4400; padding: 0.6em 1em; margin: 0.8em 0;
           font-weight: bold; }
.reference td { background: #eef4fb; }
.note { color: #555; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; }
code { word-break: break-all; }
"""


@dataclass
class Note:
    text: str
    kind: str = "note"  # note | warning | text


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str = ""
    kind: str = ""  # "reference" marks quoted, not measured, values
    name: str = ""  # the table's id in HTML (e.g. "overview")
    bold: set = field(default_factory=set)  # (row, column) positions of cells shown in bold (a task's best)


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)
    level: int = 2


def write_markdown(path: Path, title: str, sections: list[Section]) -> None:
    lines = [f"# {_md(title)}", ""]
    for s in sections:
        lines += [f"{'#' * s.level} {_md(s.title)}", ""]
        for b in s.blocks:
            lines += _md_block(b, path.parent) + [""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_html(path: Path, title: str, sections: list[Section]) -> None:
    body = [f"<h1>{_h(title)}</h1>"]
    for s in sections:
        body.append(f"<h{s.level}>{_h(s.title)}</h{s.level}>")
        body += [_html_block(b) for b in s.blocks]
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f"<title>{_h(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    path.write_text(page, encoding="utf-8")


def _md_block(b, root: Path) -> list[str]:
    if isinstance(b, Note):
        return [f"> **{_md(b.text)}**" if b.kind == "warning" else f"*{_md(b.text)}*" if b.kind == "note"
                else _md(b.text)]
    if isinstance(b, Table):
        head = [f"*{_md(b.caption)}*", ""] if b.caption else []
        if b.frame.empty:
            return head + ["*(none)*"]
        cols = [_cell(c) for c in b.frame.columns]
        rows = [[_strong_md(_cell(_clip(v)), (i, j) in b.bold) for j, v in enumerate(r)]
                for i, r in enumerate(b.frame.itertuples(index=False))]
        return head + ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + \
            ["| " + " | ".join(r) + " |" for r in rows]
    if isinstance(b, Plot):
        if b.skipped:
            return [f"*Plot skipped ({_md(b.title)}): {_md(b.skipped)}.*"]
        png, svg = b.png.relative_to(root).as_posix(), b.svg.relative_to(root).as_posix()
        return [f"![{_md(b.title)}]({png})", "", f"*{_md(b.caption)}* (also [SVG]({svg}))"]
    raise TypeError(f"unknown block {type(b).__name__}")


def _html_block(b) -> str:
    if isinstance(b, Note):
        cls = {"warning": "warning", "note": "note"}.get(b.kind, "")
        return f'<p class="{cls}">{_h(b.text)}</p>' if cls else f"<p>{_h(b.text)}</p>"
    if isinstance(b, Table):
        caption = f"<caption>{_h(b.caption)}</caption>" if b.caption else ""
        ident = f' id="{_h(b.name)}"' if b.name else ""
        if b.frame.empty:
            return f'<table{ident} class="{_h(b.kind)}">{caption}<tr><td class="note">(none)</td></tr></table>'
        head = "".join(f"<th>{_h(c)}</th>" for c in b.frame.columns)
        # 'mean ± std' stays on one line
        rows = "".join("<tr>" + "".join(_strong_html(_h(_clip(v)).replace(' ± ', '&nbsp;±&nbsp;'), (i, j) in b.bold)
                                        for j, v in enumerate(r)) + "</tr>"
                       for i, r in enumerate(b.frame.itertuples(index=False)))
        return (f'<table{ident} class="{_h(b.kind)}">{caption}<thead><tr>{head}</tr></thead>'
                f"<tbody>{rows}</tbody></table>")
    if isinstance(b, Plot):
        if b.skipped:
            return f'<p class="note">Plot skipped ({_h(b.title)}): {_h(b.skipped)}.</p>'
        data = base64.b64encode(b.png.read_bytes()).decode("ascii")
        return (f'<figure><img alt="{_h(b.title)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_h(b.caption)}</figcaption></figure>")
    raise TypeError(f"unknown block {type(b).__name__}")


def _str(v) -> str:
    return "" if v is None or (isinstance(v, float) and v != v) else str(v)


def _h(v) -> str:
    return html.escape(_str(v), quote=True)


def _md(v) -> str:
    """Record text as literal Markdown: raw HTML is shown, not interpreted; no link, image or emphasis opens."""
    text = _str(v).translate(MD_ESCAPE).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def _clip(v):
    """A table cell cut to CELL_LIMIT characters (a huge record string would make the report that large)."""
    return v[:CELL_LIMIT] + "…" if isinstance(v, str) and len(v) > CELL_LIMIT else v


def _cell(v) -> str:
    return _md(v).replace("|", "\\|")


def _strong_md(cell: str, bold: bool) -> str:
    return f"**{cell}**" if bold and cell else cell


def _strong_html(cell: str, bold: bool) -> str:
    return f"<td><strong>{cell}</strong></td>" if bold and cell else f"<td>{cell}</td>"
