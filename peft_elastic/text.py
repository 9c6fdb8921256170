"""Real English text that every Python install has: the pydoc topics of the standard library
(`pydoc_data.topics.topics`: 79 help pages of the language reference, ~465k characters), split by topic into
disjoint sets, for calibration (Wanda, GPTQ, importance), training and held-out perplexity on a real model offline.
"""

from __future__ import annotations

from .checks import check_int

#: The splits: every fifth topic (in sorted order) is held out, the one before it is calibration, the rest train.
SPLITS = ("train", "calibration", "heldout")


def pydoc_texts(split: str, chunk_chars: int = 1200) -> list[str]:
    """The texts of `split` ("train", "calibration" or "heldout"): each topic of the split cut at paragraph breaks
    into chunks of about `chunk_chars` characters (a paragraph longer than that is a chunk of its own). Topics are
    assigned by their index `i` in sorted order: `i % 5 == 4` held out, `i % 5 == 3` calibration, else train, and a
    chunk that several topics share is kept in the first of heldout, calibration, train only: no text is in two
    splits. The result is the same on every machine with the same Python version."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
    check_int("chunk_chars", chunk_chars, valid="a positive int")
    from pydoc_data.topics import topics

    def split_of(index: int) -> str:
        return "heldout" if index % 5 == 4 else "calibration" if index % 5 == 3 else "train"

    taken: set[str] = set()
    for name in ("heldout", "calibration", "train"):  # a chunk some topics share stays in the first split only
        chosen = [topics[topic] for i, topic in enumerate(sorted(topics)) if split_of(i) == name]
        chunks = [chunk for chunk in _chunks(chosen, chunk_chars) if chunk not in taken]
        if name == split:
            return list(dict.fromkeys(chunks))
        taken.update(chunks)
    raise AssertionError(split)


def _chunks(texts: list[str], chunk_chars: int) -> list[str]:
    """`texts` cut at paragraph breaks into chunks of about `chunk_chars` characters."""
    chunks = []
    for text in texts:
        current = ""
        for paragraph in text.split("\n\n"):
            if current and len(current) + len(paragraph) + 2 > chunk_chars:
                chunks.append(current)
                current = ""
            current = f"{current}\n\n{paragraph}" if current else paragraph
        chunks.append(current)
    return [chunk.strip() for chunk in chunks if chunk.strip()]
