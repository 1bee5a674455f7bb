"""Per-token text and reasoning lines of a token-id sequence."""
from __future__ import annotations

import os


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, so that "".join(pieces) == decode(ids).

    Decoding tokens one at a time breaks characters that span several byte-level tokens; the
    difference of consecutive prefix decodes does not: a token that ends inside a character gets
    an empty piece and the token completing it gets the whole character. Special tokens are kept."""
    pieces, previous = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1], skip_special_tokens=False)
        if text.endswith("\ufffd") and i + 1 < len(ids):
            pieces.append("")
            continue
        # tokenizers whose prefix decodes are not prefixes of each other: best effort
        start = len(previous) if text.startswith(previous) else len(os.path.commonprefix([text, previous]))
        pieces.append(text[start:])
        previous = text
    return pieces


def line_numbers(pieces: list[str]) -> list[int]:
    """Reasoning-line index of every token; a newline token belongs to the line it ends."""
    lines, line = [], 0
    for piece in pieces:
        lines.append(line)
        line += piece.count("\n")
    return lines
