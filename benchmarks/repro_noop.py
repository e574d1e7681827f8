"""How long does `dvc repro` take when nothing changed? (target: <= 3 s on the sample)

    python benchmarks/repro_noop.py                      # sample, then the full-size source
    python benchmarks/repro_noop.py --skip-full          # sample only
    python benchmarks/repro_noop.py --sample-repo DIR    # reuse a repo where `dvc repro` ran

Works in copies of this repository under benchmarks/out/repro_noop/ (git-ignored):

1. sample: a copy with the tests' fast params (titletune.testing.FAST_PARAMS); `dvc repro` runs
   every stage once, then a no-op `dvc repro` is timed --repeats times.
2. full: the same copy with data.source = the full-size generated corpus (build/trn.json.gz,
   `python scripts/make_sample.py --full`; 2,248,619 records) and preprocess.max_records so
   that tokenize/train/evaluate stay sample-sized: the big files DVC must hash are the source
   (a dependency) and data/interim/trn.jsonl (1.7 GB, an output).

"First-run hashing" is measured apart from the no-op: DVC keeps the md5 of every file it has
hashed, keyed by inode, mtime and size, in a state database under core.site_cache_dir; a fresh
clone, another machine or a wiped state must hash every dependency and output again. The script
points core.site_cache_dir into its work dir, wipes it, and times `dvc status` (which hashes
everything once); the no-op `dvc repro` right after runs on the warm state.

Results: printed, and written to benchmarks/out/repro_noop/results.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from titletune.testing import ENV, FAST_PARAMS, ROOT, copy_repo, set_params

DEFAULT_FULL = ROOT / "build" / "trn.json.gz"


def sh(cmd: list[str], cwd: Path, check: bool = True) -> tuple[float, str]:
    """Run cmd; return (seconds, stdout+stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode} in {cwd}:\n{out[-4000:]}")
    return dt, out


def ran_stages(output: str) -> list[str]:
    """Stages a `dvc repro` ran or restored from the run cache (a no-op has none)."""
    restored = re.findall(r"Stage '([^']+)' is cached - skipping run", output)
    ran = [s for s in re.findall(r"Running stage '([^']+)'", output) if s not in restored]
    return ran + [f"{s} (restored from run cache)" for s in restored]


def private_state(repo: Path) -> None:
    """Keep DVC's state database (the md5 of every hashed file) in repo/.site_cache, so that
    wipe_state() can make it cold."""
    sh(["dvc", "config", "--local", "core.site_cache_dir", str(repo / ".site_cache")], repo)
    exclude = repo / ".git" / "info" / "exclude"
    if "/.site_cache/" not in exclude.read_text():
        with open(exclude, "a") as f:
            f.write("/.site_cache/\n")


def wipe_state(repo: Path) -> None:
    shutil.rmtree(repo / ".site_cache", ignore_errors=True)


def measure(repo: Path, repeats: int) -> dict:
    """After a full `dvc repro`: the first repro, cold-state hashing, and warm no-ops."""
    res = {}
    dt, out = sh(["dvc", "repro"], repo)
    res["first_repro_after_run_s"] = round(dt, 2)
    res["first_repro_after_run_ran"] = ran_stages(out)

    wipe_state(repo)
    dt, out = sh(["dvc", "status"], repo)
    res["cold_state_status_s"] = round(dt, 2)
    res["status_after_run"] = out.strip().splitlines()[:6]

    times, ran = [], []
    for _ in range(repeats):
        dt, out = sh(["dvc", "repro"], repo)
        times.append(dt)
        ran += ran_stages(out)
    res["noop_repro_s"] = [round(t, 2) for t in times]
    res["noop_repro_median_s"] = round(statistics.median(times), 2)
    res["noop_repro_ran"] = ran
    dt, _ = sh(["dvc", "status"], repo)
    res["warm_status_s"] = round(dt, 2)
    return res


def md5_seconds(path: Path) -> float:
    """Plain hashlib md5 of a file, 1 MiB reads: the floor for any hashing of it."""
    t0, h = time.perf_counter(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return round(time.perf_counter() - t0, 2)


def prepare_sample(work: Path) -> tuple[Path, float]:
    repo = work / "sample"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    copy_repo(repo)
    set_params(repo, FAST_PARAMS)
    private_state(repo)
    sh(["git", "commit", "-qam", "fast params"], repo)
    dt, _ = sh(["dvc", "repro"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "repro"], repo)
    return repo, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "repro_noop")
    ap.add_argument("--sample-repo", type=Path, help="a repo copy where `dvc repro` already ran")
    ap.add_argument("--full-source", type=Path, default=DEFAULT_FULL)
    ap.add_argument("--max-records", type=int, default=4000,
                    help="preprocess.max_records for the full-size run (downstream stays small)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"dvc": sh(["dvc", "--version"], ROOT)[1].strip(), "cpus": os.cpu_count()}
    # The floor of any dvc command: starting the CLI (Python imports) and nothing else.
    results["dvc_version_s"] = round(statistics.median(sh(["dvc", "--version"], ROOT)[0] for _ in range(3)), 2)

    if args.sample_repo:
        sample = args.sample_repo.resolve()
        private_state(sample)
        results["sample_full_run_s"] = None
    else:
        sample, dt = prepare_sample(args.work)
        results["sample_full_run_s"] = round(dt, 1)
    print(f"sample repo: {sample}", flush=True)
    results["sample"] = measure(sample, args.repeats)
    print(json.dumps(results["sample"], indent=2), flush=True)

    if not args.skip_full:
        source = args.full_source.resolve()
        if not source.is_file():
            raise SystemExit(f"{source}: missing; generate it with `python scripts/make_sample.py --full`")
        full = args.work / "full"
        if full.exists():
            shutil.rmtree(full)
        shutil.copytree(sample, full, symlinks=True)
        private_state(full)
        wipe_state(full)
        # An absolute path outside the repo is a valid DVC dependency: no 400 MB copy.
        set_params(full, {"data": {"source": str(source)},
                          "preprocess": {"max_records": args.max_records}})
        sh(["git", "commit", "-qam", "full-size source"], full)
        info = {"source": str(source), "source_bytes": source.stat().st_size,
                "source_md5_hashlib_s": md5_seconds(source)}
        dt, out = sh(["dvc", "status"], full)
        info["status_before_run_s"] = round(dt, 2)   # hashes the new source once
        dt, out = sh(["dvc", "repro"], full)
        info["full_run_s"] = round(dt, 1)
        info["full_run_ran"] = ran_stages(out)
        sh(["git", "add", "-A"], full)
        sh(["git", "commit", "-qm", "repro"], full)
        interim = full / "data" / "interim" / "trn.jsonl"
        info["interim_bytes"] = interim.stat().st_size
        info["interim_md5_hashlib_s"] = md5_seconds(interim)
        info.update(measure(full, args.repeats))
        results["full"] = info
        print(json.dumps(info, indent=2), flush=True)

    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
