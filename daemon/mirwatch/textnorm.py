"""Plain text for downstream tokenizers.

Language models like to write typographic punctuation (curly quotes, dashes,
non-breaking hyphens, narrow no-break spaces). T5-style SentencePiece
vocabularies used by text-to-music models map many of those to <unk>, so
descriptions are stored as NFKC text with that punctuation spelled in ASCII.
"""

from __future__ import annotations

import unicodedata

# Applied after NFKC, which already turns NBSP/narrow NBSP into spaces and the
# ellipsis into "...", but leaves these (or maps U+2011 to the non-ASCII U+2010).
_ASCII_PUNCTUATION = str.maketrans(
    {
        "\u2010": "-",  # hyphen
        "\u2011": "-",  # non-breaking hyphen
        "\u2012": "-",  # figure dash
        "\u2013": "-",  # en dash
        "\u2014": "-",  # em dash
        "\u2015": "-",  # horizontal bar
        "\u2212": "-",  # minus sign
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",  # prime, often used as an apostrophe
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u201f": '"',
        "\u2033": '"',
        "\u00a0": " ",
        "\u202f": " ",
        "\u2009": " ",
        "\u200b": "",  # zero-width space
        "\ufeff": "",
    }
)


def normalize(text: str) -> str:
    """NFKC, typographic punctuation as ASCII, surrounding whitespace removed."""
    text = unicodedata.normalize("NFKC", text).translate(_ASCII_PUNCTUATION)
    # Removing a zero-width character can bring a base letter and a combining
    # mark together again, so compose once more.
    return unicodedata.normalize("NFKC", text).strip()
