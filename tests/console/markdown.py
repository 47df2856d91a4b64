"""What an operator's browser makes of a Markdown string, closely enough to test escaping.

Streamlit renders Markdown with react-markdown and remark-gfm. These helpers model the parts
that matter here: backslash escapes, code spans, inline links and images, autolinks in angle
brackets, and GFM's bare URL and email links (found in the text after escapes are decoded).
"""

from __future__ import annotations

import re

_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])")
_INLINE = re.compile(r"!?\[[^\]]*\]\(")  # [text](url) and ![alt](src)
_REFERENCE = re.compile(r"!?\[[^\]]*\]\[[^\]]*\]")
_ANGLE = re.compile(r"<[A-Za-z][A-Za-z0-9+.-]{1,31}:[^\s<>]*>|<[^\s<>@]+@[^\s<>]+>")
_BARE = re.compile(r"(?i)(https?://|www\.)[-.\w]+|[-.\w+]+@[-\w]+(\.[-\w]+)+")
_IMAGE = re.compile(r"!\[[^\]]*\]\(")


def _spans(markdown: str) -> tuple[str, list[str]]:
    """The text with escapes masked and code spans cut out, and the spans' raw contents.

    As in CommonMark: a backslash escapes ASCII punctuation outside code spans; a run of n
    backticks opens a span closed by the next run of exactly n; nothing inside is escaped.
    """
    out: list[str] = []
    spans: list[str] = []
    i = 0
    while i < len(markdown):
        char = markdown[i]
        if char == "\\" and i + 1 < len(markdown) and _ESCAPED.match(markdown, i):
            out.append("\x00" + format(ord(markdown[i + 1]), "03d"))
            i += 2
            continue
        if char == "`":
            run = len(markdown[i:]) - len(markdown[i:].lstrip("`"))
            for closing in re.finditer(r"`+", markdown[i + run :]):
                if len(closing.group(0)) == run:
                    spans.append(markdown[i + run : i + run + closing.start()].strip())
                    out.append("\x01")
                    i += run + closing.end()
                    break
            else:
                out.append("`" * run)
                i += run
            continue
        out.append(char)
        i += 1
    return "".join(out), spans


def _unmask(text: str) -> str:
    return re.sub(r"\x00(\d{3})", lambda m: chr(int(m.group(1))), text)


def links(markdown: str) -> list[str]:
    """Every link or image the string would render as (empty when it is all literal text)."""
    outside, _ = _spans(markdown)
    found = _INLINE.findall(outside) + _REFERENCE.findall(outside) + _ANGLE.findall(outside)
    decoded = _unmask(outside).replace("\u200b", "\x02")  # a zero-width space breaks a match
    found += [m.group(0) for m in _BARE.finditer(decoded)]
    return found


def images(markdown: str) -> list[str]:
    outside, _ = _spans(markdown)
    return _IMAGE.findall(outside)


def plain(markdown: str) -> str:
    """The text a reader sees: escapes decoded, code spans as their content, no zero-width
    spaces."""
    outside, spans = _spans(markdown)
    pieces = iter(spans)
    text = re.sub("\x01", lambda _: next(pieces), outside)
    return _unmask(text).replace("\u200b", "")
