"""titletune/splits.py: fixed subsets of a split."""
from __future__ import annotations

import random

from datasets import Dataset

from titletune.splits import select_examples


def test_sample_selection_is_deterministic_and_order_free():
    rows = [{"uid": f"U{i:03d}", "input_ids": [1, 10 + i, 2], "completion_mask": [0, 0, 1]} for i in range(50)]
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    a = select_examples(Dataset.from_list(rows), 10)["uid"]
    b = select_examples(Dataset.from_list(shuffled), 10)["uid"]
    assert a == b and len(set(a)) == 10
    assert a != [r["uid"] for r in rows[:10]]  # spread over the split, not its first rows
    assert len(select_examples(Dataset.from_list(rows), 0)) == 50  # 0 = all
