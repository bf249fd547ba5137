"""Patch ids: the fast screen over a whole store agrees with the per-id rule; ids are shown escaped and quoted."""

from __future__ import annotations

import pytest

from histodetect.data.ids import first_unsafe, shown, unsafe_reason

SAFE = ["f38a6374c348f90b587e046aac6079959adf3835", "patch.v2", "a b", "tumour_01"]


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a\\b", "a..b", "C:x", "a\nb", "\x1b[31m", "a\tb", "x\x7f"])
@pytest.mark.parametrize("where", [0, 2, 4])
def test_first_unsafe_finds_what_unsafe_reason_refuses(bad: str, where: int) -> None:
    names = [*SAFE[:where], bad, *SAFE[where:]]
    assert unsafe_reason(bad) is not None
    assert first_unsafe(names) == where


def test_first_unsafe_passes_safe_ids() -> None:
    assert first_unsafe(SAFE) is None and first_unsafe([]) is None


def test_shown_escapes_control_characters_and_shows_spaces() -> None:
    assert shown("\x1b[2Jred") == r"'\x1b[2Jred'" and shown(" padded ") == "' padded '"
    assert "\u202e" not in shown("abc\u202etxt.exe")  # right-to-left override: invisible, so escaped
