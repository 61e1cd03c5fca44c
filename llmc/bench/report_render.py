"""The two renderings of a `llmc bench report` (llmc.bench.report): one self-contained HTML page and
its Markdown twin, from the same `Section`s and `Table`s. Every string is escaped here: table cells,
captions, the title and the source paths come from result files or the command line.

The page loads nothing: the style sheet is inline, there is no script, and the plots are `data:`
URIs; its Content-Security-Policy forbids any other source, so a browser would refuse even an
injected reference rather than fetch it.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    left: int = 1                      # the first `left` columns are text; the rest are numbers
    caption: str | None = None
    wrap: tuple[int, ...] = (0,)       # columns of long text (names, paths) that may break anywhere


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    tables: tuple[Table, ...]
    plot: str | None = None            # "quality": plot-quality.png
    plot_alt: str = ""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0;
       color: #1d232b; background: #ffffff; }
main { max-width: 1200px; margin: 0 auto; padding: 1.5rem 2rem 3rem; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; }
h2 { font-size: 1.25rem; margin: 2rem 0 .6rem; padding-bottom: .2rem; border-bottom: 2px solid #e3e7ec; }
p.meta, nav { color: #5b6773; font-size: .9rem; margin: .2rem 0; }
nav a { color: #1f5fa8; margin-right: 1rem; text-decoration: none; }
ul.sources { color: #5b6773; font-size: .85rem; margin: .3rem 0 0; font-family: ui-monospace, monospace; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .88rem; }
caption { caption-side: bottom; text-align: left; color: #5b6773; font-size: .8rem; padding-top: .3rem; }
th, td { padding: .3rem .65rem; border-bottom: 1px solid #e3e7ec; vertical-align: top; white-space: nowrap; }
td.wrap { white-space: normal; overflow-wrap: anywhere; min-width: 8rem; max-width: 26rem; }
th { background: #f3f5f8; text-align: left; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:hover { background: #f8fafc; }
figure { margin: .8rem 0 1.2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e7ec; }
figcaption { color: #5b6773; font-size: .85rem; }
"""


def _e(s: str) -> str:
    return html.escape(str(s), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _html_table(t: Table) -> str:
    def cls(i: int, cell: bool = True) -> str:
        return ' class="num"' if i >= t.left else ' class="wrap"' if cell and i in t.wrap else ""
    head = "".join(f"<th{cls(i, False)}>{_e(c)}</th>" for i, c in enumerate(t.columns))
    body = "\n".join("<tr>" + "".join(f"<td{cls(i)}>{_e(c)}</td>" for i, c in enumerate(row)) + "</tr>"
                     for row in t.rows)
    caption = f"<caption>{_e(t.caption)}</caption>" if t.caption else ""
    return (f'<div class="scroll"><table>{caption}<thead><tr>{head}</tr></thead>\n'
            f'<tbody>\n{body}\n</tbody></table></div>')


def html_page(title: str, sections: list[Section], plots: dict[str, bytes], sources: list[str],
              producer: str) -> str:
    nav = " ".join(f'<a href="#{s.id}">{_e(s.title)}</a>' for s in sections)
    parts = []
    for s in sections:
        parts.append(f'<section id="{s.id}">\n<h2>{_e(s.title)}</h2>')
        parts += [_html_table(t) for t in s.tables]
        if s.plot is not None:
            png = plots[s.plot]
            w, h = png_size(png)
            parts.append(f'<figure><img id="plot-{s.plot}" src="{data_uri(png)}" width="{w}" height="{h}" '
                         f'alt="{_e(s.plot_alt)}"><figcaption>{_e(s.plot_alt)}</figcaption></figure>')
        parts.append("</section>")
    listed = "".join(f"<li>{_e(p)}</li>" for p in sources)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="{_e(producer)}">
<title>{_e(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<main>
<h1>{_e(title)}</h1>
<p class="meta">Written by {_e(producer)} from {len(sources)} result file{"s" if len(sources) != 1 else ""}:</p>
<ul class="sources">{listed}</ul>
<nav>{nav}</nav>
{chr(10).join(parts)}
</main>
</body>
</html>
"""


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#])")


def md(s: str) -> str:
    """Text for a Markdown table cell or line: HTML-escaped (renderers pass raw HTML through) and
    Markdown's own specials backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(" ".join(str(s).split()), quote=False))


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(md(c) for c in t.columns) + " |",
             "|" + "|".join(":---" if i < t.left else "---:" for i in range(len(t.columns))) + "|"]
    lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in t.rows]
    if t.caption:
        lines += ["", f"*{md(t.caption)}*"]
    return "\n".join(lines)


def markdown(title: str, sections: list[Section], sources: list[str], producer: str) -> str:
    out = [f"# {md(title)}", "",
           f"Written by {md(producer)} from {len(sources)} result file{'s' if len(sources) != 1 else ''}:", ""]
    out += [f"- {md(p)}" for p in sources]
    for s in sections:
        out += ["", f"## {md(s.title)}", ""]
        for t in s.tables:
            out += [_md_table(t), ""]
        if s.plot is not None:
            out += [f"![{md(s.plot_alt)}](plot-{s.plot}.png)", ""]
    return "\n".join(out).rstrip() + "\n"
