"""Reading texts leniently: strict UTF-8 (BOM allowed), XML sections by regex, HTML stripped to text."""

from __future__ import annotations

import html
import re
from pathlib import Path

from fgcmr.shard.records import Skip

_TEXT_TAG = re.compile(r"<text[^>]*>(.*?)</text>", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"<[^>]+>")
_DROP = re.compile(r"<(script|style)[^>]*>.*?</\1>", re.DOTALL | re.IGNORECASE)
_SPACE = re.compile(r"[ \t\r\f\v]+")


def read_text_file(path: Path) -> str:
    """A file's text as UTF-8; missing, non-UTF-8 or empty files are skips."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Skip("missing_text", str(path)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Skip("text_not_utf8", f"{path}: {e}") from None
    if path.suffix.lower() == ".xml":
        text = xml_text(text)
    elif path.suffix.lower() in (".html", ".htm"):
        text = html_text(text)
    text = text.strip()
    if not text:
        raise Skip("empty_text", str(path))
    return text


def xml_text(raw: str) -> str:
    """The ``<text>`` body of a Wikipedia-benchmark XML file; many are not well-formed, so no XML parser."""
    match = _TEXT_TAG.search(raw)
    body = match.group(1) if match else _TAG.sub(" ", raw)
    return html.unescape(body).strip()


def html_text(raw: str) -> str:
    """Visible text of an HTML page: scripts and styles dropped, tags removed, entities decoded."""
    text = html.unescape(_TAG.sub(" ", _DROP.sub(" ", raw)))
    return "\n".join(line for line in (_SPACE.sub(" ", raw_line).strip() for raw_line in text.splitlines()) if line)
