from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from mirwatch.textnorm import normalize

TYPOGRAPHIC = "\u2011\u2010\u2012\u2013\u2014\u2015\u2212\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u00a0\u202f\u2009"


def test_typographic_punctuation_becomes_ascii() -> None:
    text = "\u201cLo\u2011fi\u201d at 85\u202fBPM \u2013 it\u2019s warm \u2014 very warm\u2026"
    assert normalize(text) == '"Lo-fi" at 85 BPM - it\'s warm - very warm...'


def test_nfkc_folds_compatibility_characters() -> None:
    # Full-width letters, ligatures and superscripts are what NFKC is for.
    assert normalize("\uff21\uff22 \ufb01ne x\u00b2 \u2460") == "AB fine x2 1"


def test_surrounding_whitespace_removed_inner_kept() -> None:
    assert normalize("  \u00a0Verse\n\nChorus \u202f") == "Verse\n\nChorus"


def test_plain_ascii_unchanged() -> None:
    text = "A driving 128 BPM house track in F minor; kick, bass, pads."
    assert normalize(text) == text


@given(st.text())
def test_idempotent_and_free_of_mapped_characters(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once
    assert unicodedata.is_normalized("NFKC", once)
    assert not set(once) & set(TYPOGRAPHIC)


def test_removed_zero_width_space_does_not_leave_decomposed_text() -> None:
    assert normalize("e\u200b\u0301") == "\u00e9"
