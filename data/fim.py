"""Fill-in-the-middle at preparation time, as DeepSeek-Coder trains it (PSM mode).

DeepSeek-Coder §3.2 (after Bavarian et al., "Efficient Training of Language Models to Fill in
the Middle", 2022): with probability `fim_rate` a document is cut at two random character
positions into prefix, middle and suffix, and written as

    <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <eos>

(DeepSeek's sentinels are `<｜fim▁begin｜>`, `<｜fim▁hole｜>`, `<｜fim▁end｜>` in that order).
The decision and the cut points come from a hash of (seed, document key), not from an RNG
stream, so they do not depend on how documents are batched over processes, and a resumed
preparation makes the same choices. data.prepare passes each document's key k·2³² + r (file k
of the sorted input listing, row r in it), so a part prepared on another machine
(shard_index=…) cuts a document exactly as one preparation of the whole input does.
"""

from __future__ import annotations

import numpy as np

from .permutation import uniform

_STREAM_APPLY, _STREAM_CUT1, _STREAM_CUT2 = 1, 2, 3


def plan(texts: list[str], first_index: int, rate: float, seed: int) -> list[tuple[int, int] | None]:
    """For each document, None (kept whole) or the (start, end) character span of its middle."""
    if rate <= 0:
        return [None] * len(texts)
    idx = np.arange(first_index, first_index + len(texts), dtype=np.uint64)
    apply = uniform(seed, _STREAM_APPLY, idx) < rate
    u1, u2 = uniform(seed, _STREAM_CUT1, idx), uniform(seed, _STREAM_CUT2, idx)
    out: list[tuple[int, int] | None] = []
    for i, text in enumerate(texts):
        if not apply[i]:
            out.append(None)
            continue
        n = len(text)
        a, b = int(u1[i] * (n + 1)), int(u2[i] * (n + 1))
        out.append((min(a, b), max(a, b)))
    return out


def pieces(texts: list[str], spans: list[tuple[int, int] | None]) -> list[str]:
    """The strings to encode: the whole text, or prefix, suffix, middle (PSM order) for a FIM document."""
    out: list[str] = []
    for text, span in zip(texts, spans):
        if span is None:
            out.append(text)
        else:
            a, b = span
            out.extend((text[:a], text[b:], text[a:b]))
    return out
