"""The data stages under DVC, in a fresh copy of the repo, and the sample generator."""
from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from conftest import ROOT, run

OUTPUTS = ["data/processed/train.parquet", "data/processed/val.parquet",
           "data/processed/test.parquet", "data/processed/bad_lines.txt", "metrics/data.json"]


def digests(repo: Path) -> dict[str, str]:
    return {p: hashlib.sha256((repo / p).read_bytes()).hexdigest() for p in OUTPUTS}


def test_dvc_repro_preprocess(repo):
    if not (repo / ".dvc").is_dir():
        run(["dvc", "init", "-q"], repo)
    # Outputs someone made by hand in the working tree must not be in the copy's git.
    run(["git", "rm", "-r", "-q", "--cached", "--ignore-unmatch", "data/interim", "data/processed"], repo)
    for stale in ("data/interim", "data/processed"):
        shutil.rmtree(repo / stale, ignore_errors=True)

    first = run(["dvc", "repro", "preprocess"], repo)
    assert "decompress" in first.stdout and "preprocess" in first.stdout
    for p in OUTPUTS:
        assert (repo / p).is_file(), p
    assert sum(pq.read_metadata(repo / p).num_rows for p in OUTPUTS[:3]) > 1000

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage in ("decompress", "preprocess"):
        assert lock[stage]["deps"] and all(d.get("md5") for d in lock[stage]["deps"]), stage
        assert lock[stage]["outs"] and all(o.get("md5") for o in lock[stage]["outs"]), stage
    assert "preprocess" in lock["preprocess"]["params"]["params.yaml"]

    again = run(["dvc", "repro", "preprocess"], repo)
    assert "didn't change" in again.stdout or "up to date" in again.stdout, again.stdout
    assert "Running stage" not in again.stdout, again.stdout

    # Same inputs and params => the same bytes.
    before = digests(repo)
    run(["dvc", "repro", "-f", "preprocess"], repo)
    assert digests(repo) == before


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
