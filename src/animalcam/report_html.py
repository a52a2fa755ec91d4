"""The pieces of the run report's one HTML page: escaped text, tables, embedded images.

Every function returns a fragment of HTML as a string; every value that comes from the
run (class names, file names, params) goes through :func:`text`, so an odd class name
such as ``<b>&cat`` shows as written and breaks nothing. Images are embedded as
``data:`` URIs and the style sheet is inline: the page loads nothing from anywhere, so
it reads the same as an e-mail attachment, an MLflow artifact or a file on a laptop
offline.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from PIL import Image

# Photos (galleries, Grad-CAM panels) are re-encoded as JPEG for the page: as PNG the
# run's pictures weigh megabytes each. Quality 90 keeps the heatmaps' colour steps.
JPEG_QUALITY = 90
# Widest picture embedded, in px: wide enough for a 1600 px Grad-CAM strip on a large
# screen, and the page stays a few MB for the default 8 + 8 panels and two galleries.
MAX_WIDTH_PX = 1600

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1100px; padding: 0 1.5em 3em; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #d0d7de; padding: .25em .6em; text-align: left;
         vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: .8em;
      line-height: 1.25; }
img { max-width: 100%; height: auto; display: block; margin: .5em 0; }
figure { margin: 1em 0; }
figcaption { color: #59636e; font-size: .9em; }
.note { color: #59636e; font-style: italic; }
.missing { color: #9a6700; background: #fff8c5; padding: .3em .6em; border-radius: 4px; }
nav ul { columns: 2; }
code { background: #f6f8fa; padding: 0 .25em; border-radius: 3px; }
details summary { cursor: pointer; color: #0969da; }
"""


def text(value: object) -> str:
    """``value`` as HTML text: ``<``, ``>``, ``&`` and quotes escaped."""
    return html.escape(str(value), quote=True)


def paragraph(content: str) -> str:
    """A paragraph of already escaped HTML."""
    return f"<p>{content}</p>\n"


def note(message: str) -> str:
    """A remark in grey italics (``message`` is plain text)."""
    return f'<p class="note">{text(message)}</p>\n'


def missing(what: str, stage: str | None) -> str:
    """``what`` is not there: say which stage writes it (plain text in, HTML out)."""
    command = f"dvc repro {stage}" if stage else "dvc repro"
    return f'<p class="missing">{text(what)}: not available: run <code>{text(command)}</code></p>\n'


def code(value: object) -> str:
    return f"<code>{text(value)}</code>"


def preformatted(content: str) -> str:
    """Text shown as written (monospace, whitespace kept), escaped."""
    return f"<pre>{text(content)}</pre>\n"


def cell(value: object) -> str:
    """One table cell: numbers right-aligned, everything escaped."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num">{text(value)}</td>'
    return f"<td>{text(value)}</td>"


def table(header: Sequence[str] | None, rows: Iterable[Sequence[object]]) -> str:
    """A table of plain values (escaped, numbers right-aligned); ``header`` None: none."""
    head = "".join(f"<th>{text(name)}</th>" for name in header or ())
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>\n" for row in rows)
    return f"<table>\n{f'<tr>{head}</tr>' if head else ''}\n{body}</table>\n"


def key_values(pairs: Mapping[str, object] | Iterable[tuple[str, object]]) -> str:
    """A two-column table without a header: name, value."""
    return table(None, pairs.items() if isinstance(pairs, Mapping) else pairs)


def details(summary: str, content: str) -> str:
    """``content`` (HTML) folded under a one-line ``summary`` (plain text)."""
    return f"<details><summary>{text(summary)}</summary>\n{content}</details>\n"


def png_data(data: bytes) -> str:
    """PNG bytes as a ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def photo_data(path: str | Path) -> str:
    """An image file as a JPEG ``data:`` URI, at most :data:`MAX_WIDTH_PX` wide."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if rgb.width > MAX_WIDTH_PX:
        height = round(rgb.height * MAX_WIDTH_PX / rgb.width)
        rgb = rgb.resize((MAX_WIDTH_PX, height), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure(source: str, caption: str = "", alt: str = "") -> str:
    """An embedded picture (``source``: a ``data:`` URI) with an optional caption."""
    caption_html = f"<figcaption>{text(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{source}" alt="{text(alt or caption)}">{caption_html}</figure>\n'


def section(anchor: str, title: str, content: str) -> str:
    """A titled section of the page; ``anchor`` is its id for the table of contents."""
    return f'<section id="{text(anchor)}">\n<h2>{text(title)}</h2>\n{content}</section>\n'


def page(title: str, intro: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole page: ``title``, ``intro`` (HTML), a table of contents, then the
    ``(anchor, title, content)`` sections."""
    contents = "".join(
        f'<li><a href="#{text(anchor)}">{text(name)}</a></li>' for anchor, name, _ in sections
    )
    body = "".join(section(*entry) for entry in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{text(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{text(title)}</h1>\n{intro}"
        f"<nav><ul>{contents}</ul></nav>\n{body}</body>\n</html>\n"
    )
