"""Where the spaces are in a line the recogniser read: CTC decoding that keeps each character's place.

RapidOCR's recognisers (PP-OCRv6's now, PP-OCRv4's before) read a crop 48 px high as one column of class
probabilities every 8 px (a CTC output: a character, the space, or "blank").  Trained mostly on Chinese,
where lines have no spaces, they often let "blank" win over "space" between two English words: PP-OCRv4's
even on plain paper ("SandyHook"), PP-OCRv6's where a line or the edge of a fill crosses the gap
("OriskanySandstone").  The space is still there in the output, only not on top.  Measured with PP-OCRv4
on the demo's 24 lettered sheets (2,711 boundaries between two characters of lines read letter for letter
right), the largest probability of the space class in the columns *between* two characters was at least
0.05 at 77 of the 79 word boundaries it dropped and at none of the 2,514 boundaries inside a word (the
highest there: 0.048).  How far apart the two characters are is a much weaker sign on its own (the column
gap at a dropped space is 1.5 times the line's median gap or more at three in four of them, but so is one
gap in nine inside words: wide letters, "m", "W"), so it only lowers the bar: where the gap is that wide,
a space probability of 0.02 is enough.

This is the recogniser's own evidence at that place of that line, not a word list: it works on any
script the model reads with spaces, and it adds no space where the model gave one no weight.  With
PP-OCRv6 and the same thresholds, on bench/ocr_bench.py's drawn sheets it lifts horizontal labels of
14 px and over from 0.90 / 0.94 to 0.92 / 0.95 word recall / precision (bench/results/ocr.md; higher
thresholds, 0.1 or 0.2, read fewer of the demo's words).
"""

from __future__ import annotations

import numpy as np

SPACING_METHOD = "ctc-space-probability"  # recorded in ocr_models.settings (OcrSettings.recorded)
SPACE_PROBABILITY = 0.05  # the space class this probable between two characters: a space
WIDE_GAP = 1.5  # a gap this many times the line's median gap between characters ...
WIDE_GAP_SPACE_PROBABILITY = 0.02  # ... needs only this much


def decode_with_spaces(probabilities: np.ndarray, characters: list[str], space: int | None,
                       respace: bool = True) -> tuple[str, float]:
    """Greedy CTC decoding of one line (``probabilities``: time steps x classes, class 0 blank,
    ``characters[i]`` the text of class i) -> (text, confidence), as RapidOCR decodes it (repeats
    merged, blanks dropped, the mean of the characters' probabilities), plus, when ``respace``, a
    space put back between two characters where the space class (index ``space``) was probable
    enough in the columns between them (module docstring)."""
    best = probabilities.argmax(axis=1)
    keep = np.ones(len(best), dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    keep &= best != 0
    columns = np.flatnonzero(keep)
    if len(columns) == 0:
        return "", 0.0
    confidence = float(probabilities[columns, best[columns]].mean())
    texts = [characters[int(i)] for i in best[columns]]
    if not respace or space is None or len(columns) < 2:
        return "".join(texts), confidence
    gaps = np.diff(columns)
    median_gap = float(np.median(gaps))
    out = [texts[0]]
    for k, gap in enumerate(gaps):
        before, after = texts[k], texts[k + 1]
        if gap >= 2 and before != " " and after != " ":
            between = float(probabilities[columns[k] + 1:columns[k + 1], space].max())
            wide = gap >= WIDE_GAP * median_gap
            if between >= SPACE_PROBABILITY or (wide and between >= WIDE_GAP_SPACE_PROBABILITY):
                out.append(" ")
        out.append(after)
    return "".join(out), confidence
