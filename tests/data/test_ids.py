"""Patch ids: the fast screen over a whole store agrees with the per-id rule; ids are shown escaped and quoted."""

from __future__ import annotations

import pytest

from histodetect.data.ids import first_bad_group, first_unsafe, group_problem, shown, unsafe_reason

SAFE = ["f38a6374c348f90b587e046aac6079959adf3835", "patch.v2", "a b", "tumour_01"]


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a\\b", "a..b", "C:x", "a\nb", "\x1b[31m", "a\tb", "x\x7f"])
@pytest.mark.parametrize("where", [0, 2, 4])
def test_first_unsafe_finds_what_unsafe_reason_refuses(bad: str, where: int) -> None:
    names = [*SAFE[:where], bad, *SAFE[where:]]
    assert unsafe_reason(bad) is not None
    assert first_unsafe(names) == where


def test_first_unsafe_passes_safe_ids() -> None:
    assert first_unsafe(SAFE) is None and first_unsafe([]) is None


@pytest.mark.parametrize("bad", [" ", "\t", "a\nb", "\x1b[31m", "slide\x7f", "\r"])
@pytest.mark.parametrize("where", [0, 2, 5])
def test_first_bad_group_finds_what_group_problem_refuses(bad: str, where: int) -> None:
    fine = ["camelyon16_train_normal_001", "", "patient 7/slide 2", "..", "tumor_056"]
    names = [*fine[:where], bad, *fine[where:]]
    assert group_problem(bad) is not None and first_bad_group(names) == where
    assert first_bad_group(fine) is None and first_bad_group([]) is None


def test_shown_escapes_control_characters_and_shows_spaces() -> None:
    assert shown("\x1b[2Jred") == r"'\x1b[2Jred'" and shown(" padded ") == "' padded '"
    assert "\u202e" not in shown("abc\u202etxt.exe")  # right-to-left override: invisible, so escaped
