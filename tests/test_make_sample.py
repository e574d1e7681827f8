"""scripts/make_sample.py: the embedded synthetic sample, deterministic for any worker count."""
from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

from titletune.testing import ROOT


def make_sample(out: Path, *args: str) -> bytes:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample.py"), "--out", str(out), *args],
                   check=True, capture_output=True)
    return out.read_bytes()


def test_sample_generator_is_deterministic(tmp_path):
    a = make_sample(tmp_path / "a.json.gz")
    b = make_sample(tmp_path / "b.json.gz")
    assert a == b
    # The committed sample has the same content. (Compared decompressed: a zlib/ISA-L build on
    # another CPU may encode the same bytes differently.)
    assert gzip.decompress(a) == gzip.decompress((ROOT / "data" / "sample" / "trn.json.gz").read_bytes())
    # Chunks are seeded on their own, so the worker count does not matter.
    one = make_sample(tmp_path / "one.json.gz", "--records", "20100", "--workers", "1")
    two = make_sample(tmp_path / "two.json.gz", "--records", "20100", "--workers", "2")
    assert one == two
    assert gzip.decompress(two).count(b"\n") == 20100
    assert gzip.decompress(two).startswith(gzip.decompress(a))    # the sample is its prefix
