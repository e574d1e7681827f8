"""Fixed subsets of a formatted split: the same examples whatever the row order or size of the split
(evaluate's and export's test examples, the validation examples train evaluates)."""
from __future__ import annotations

import zlib


def select_examples(split, max_samples: int):
    """The first max_samples examples in a fixed pseudo-random order (crc32 of uid), so the sample
    is the same whatever the row order of the split, and spread over the whole split; 0 = all."""
    uids = list(split["uid"])  # a plain list: indexing datasets' lazy Column costs ~0.1 ms an item
    order = sorted(range(len(uids)), key=lambda i: (zlib.crc32(uids[i].encode("utf-8")), uids[i]))
    return split.select(order[:max_samples] if max_samples > 0 else order)
