"""What a prompt is once it is read: Unicode NFC, no control or zero-width characters, no outer whitespace.

A prompt of only invisible characters (zero-width spaces, a byte-order mark, control codes) would pass a plain
`strip()` and make an unconditional object; normalised it is empty and can be refused as such. Whitespace
controls (tab, newline) become spaces so that the words they separate stay apart. Torch-free, like
`ln3diff_rt.options`.
"""

from __future__ import annotations

import unicodedata

_WHITESPACE_CONTROLS = "\t\n\v\f\r\x1c\x1d\x1e\x1f\x85"


def normalise_prompt(prompt: str) -> str:
    """NFC, whitespace controls as spaces, other control (Cc) and format (Cf: zero-width, BOM, bidi) characters
    dropped, outer whitespace stripped."""
    kept = (" " if c in _WHITESPACE_CONTROLS else c for c in prompt)
    visible = "".join(c for c in kept if unicodedata.category(c) not in ("Cc", "Cf"))
    return unicodedata.normalize("NFC", visible).strip()
