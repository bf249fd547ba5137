"""Patch ids: which ones are safe, which ones name their pixels, and how to show any of them on a terminal.

Ids come from file names and CSV cells, so they are untrusted text: ingest refuses unsafe ones, a store refuses
to open with one, and every message that quotes an id shows it escaped and quoted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SHA1_HEX = re.compile(r"^[0-9a-f]{40}$")
# What makes an id unsafe, and why: each could make a path built from the id point outside its folder.
UNSAFE = (
    (re.compile(r"^$"), "empty id"),
    (re.compile(r"[\x00-\x1f\x7f]"), "control character in id"),
    (re.compile(r"[/\\]"), "path separator in id"),
    (re.compile(r"\.\."), "'..' in id"),
    (re.compile(r"^[A-Za-z]:"), "drive letter in id"),
    (re.compile("[\ud800-\udfff]"), "a file name that is not UTF-8 text in id"),  # no CSV, JSON or figure takes it
)
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # names joined by line breaks, screened at once
# Every unsafe id holds one of these (or is empty, or holds a line break): a screen that is cheap over all ids at once.
SCREEN = (*(chr(code) for code in range(32) if chr(code) != "\n"), "\x7f", "/", "\\", "..", ":")


def unsafe_reason(name: str) -> str | None:
    """Why ``name`` cannot be a patch id (it could name a path outside the folder); None when it is safe."""
    return next((reason for pattern, reason in UNSAFE if pattern.search(name)), None)


def first_unsafe(names: Sequence[str]) -> int | None:
    """Position of the first unsafe name, or None when all are safe.

    A store holds up to 220,025 ids, and a regular expression per id takes about a second: the ids are screened
    at once instead (substring searches, in C, over all of them joined by line breaks), and checked one by one
    only when the screen finds something that could be unsafe.
    """
    joined = "\n".join(names)
    if (
        all(names)
        and joined.count("\n") == len(names) - 1
        and not any(mark in joined for mark in SCREEN)
        and _utf8(joined)
    ):
        return None
    return next((position for position, name in enumerate(names) if unsafe_reason(name)), None)


def text_problem(name: str) -> str | None:
    """Why ``name`` (a slide's, say) cannot go into a CSV, a JSON file or a figure: a control character, or bytes
    that were not UTF-8; None when it can."""
    if CONTROL.search(name):
        return "a control character"
    return None if _utf8(name) else "a file name that is not UTF-8 text"


def _utf8(text: str) -> bool:
    """Whether ``text`` holds no surrogate escape (a file name's bytes that were not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def group_problem(name: str) -> str | None:
    """Why ``name`` cannot be a slide group (empty, or text a terminal would act on); None when it is fine.

    A group never names a file, so only what would make it unprintable or meaningless is refused."""
    if not name.strip():
        return "empty group"
    return "control character in group" if CONTROL.search(name) else None


def first_bad_group(names: Sequence[str]) -> int | None:
    """Position of the first name that is not empty and not a valid group (see :func:`group_problem`), or None.
    Screened at once, as :func:`first_unsafe` does, since a store's index is checked every time it opens."""
    joined = "\n".join(names)
    screened = joined.count("\n") == len(names) - 1 and CONTROL_BUT_NEWLINE.search(joined) is None
    if screened and all(name.strip() or not name for name in names):
        return None
    return next((at for at, name in enumerate(names) if name and group_problem(name)), None)


def looks_like_sha1(name: str) -> bool:
    """Competition ids are the SHA-1 of the pixels; only names of that form are checked against the pixels."""
    return SHA1_HEX.match(name) is not None


def shown(text: str) -> str:
    """``text`` quoted, with control characters, escape sequences and invisible characters escaped.

    What a terminal prints for it is exactly the text, so an id with an ESC sequence cannot recolour or move
    the cursor, and an id with surrounding spaces shows them.
    """
    return repr(text)
