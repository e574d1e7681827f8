"""The full corpus, end to end on CPU: every stage on 2.25 M records, timed, with peak memory.

    python benchmarks/full_corpus.py [--file build/trn.json.gz] [--skip notebook,zcat]

Works in a copy of this repository (benchmarks/out/full_corpus/repo, git-ignored) whose
data.source is the full-size generated corpus (scripts/make_sample.py --full, made when missing:
2,248,619 records in the exact AmazonTitles format, 1.69 GB of JSON lines), read once first so that
every run finds it in the page cache. Each run below is a
fresh process tree, measured from outside: wall time, CPU time (user + system of the whole tree,
from wait4), peak RSS of its largest process (ru_maxrss, exact) and the tree's peak memory, sampled
every second from /proc/PID/smaps_rollup (reading it costs the kernel a walk of the page tables, so
not more often): PSS (pages shared by forked workers counted once) and its anonymous part (without
the pages of memory-mapped Arrow files, which the kernel can drop and read again).

  decompress, preprocess
                    exactly dvc.yaml's commands, default params
  notebook          the seed notebook's data path: gzip copy, pandas.read_json of all of it,
                    drop empty rows, to_json
  zcat              the floor of any data path: zcat FILE > /dev/null
  tokenize-format   dvc.yaml's command, default params
  train, evaluate   dvc.yaml's commands on the full formatted data, with train.max_steps=4 and
                    evaluate.max_samples=8 (what is measured is how soon they start and how much
                    memory they need with 1.1 M examples, not training), then the same two
                    commands on the sample's formatted data: the difference is what the data's
                    size costs them

Writes benchmarks/results/cpu_full_corpus.jsonl (one object per run: stage, records, wall_s,
cpu_s, peak_rss_gb, peak_pss_gb, peak_anon_gb, ...) and prints the table of benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from titletune.testing import ENV, ROOT, copy_repo, set_params

WORK = ROOT / "benchmarks" / "out" / "full_corpus"
RESULTS = ROOT / "benchmarks" / "results" / "cpu_full_corpus.jsonl"
PAGE = os.sysconf("SC_PAGE_SIZE")
# A few steps and answers: enough to see that the stages start at once and stay within memory.
SHORT_RUN = {"train": {"max_steps": 4, "eval_steps": 1000, "save_steps": 1000, "logging_steps": 1},
             "evaluate": {"max_samples": 8, "require_improvement": False}}

# The seed notebook's cells, as one script (argv: gz file, work dir).
NOTEBOOK = """
import gzip, shutil, sys
import pandas as pd
src, work = sys.argv[1], sys.argv[2]
with gzip.open(src, "rb") as f_in, open(f"{work}/trn.json", "wb") as f_out:
    shutil.copyfileobj(f_in, f_out)
df = pd.read_json(f"{work}/trn.json", lines=True)
df = df[(df["title"].str.len() > 0) & (df["content"].str.len() > 0)]
df.to_json(f"{work}/clean.json", orient="records", lines=True)
print(f"notebook: {len(df):,} rows kept")
"""


def tree_memory(root: int) -> dict[str, int]:
    """Resident bytes of a process and all its descendants, now: Rss summed (counts twice the
    pages that forked workers share with their parent), Pss (each shared page split between
    the processes that map it: what the tree occupies) and Pss_Anon (Pss without the pages of
    memory-mapped files, which the kernel can drop and read again)."""
    parent = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            parent[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    total = {"Rss": 0, "Pss": 0, "Pss_Anon": 0}
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in total:
                        total[key] += int(value.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        todo.extend(p for p, pp in parent.items() if pp == pid)
    return total


def measure(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run cmd (output to log): wall and CPU seconds, peak tree memory, load average meanwhile."""
    load0 = os.getloadavg()[0]
    started = time.perf_counter()
    peak = {"Rss": 0, "Pss": 0, "Pss_Anon": 0}
    samples = 0
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if samples % 20 == 0:  # reading smaps walks the page tables: 1 s apart, so as not to slow the run
                for key, value in tree_memory(proc.pid).items():
                    peak[key] = max(peak[key], value)
            samples += 1
            time.sleep(0.05)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            # the largest single process (ru_maxrss), and the tree's peaks (tree_memory)
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2), "peak_tree_rss_gb": round(peak["Rss"] / 1e9, 2),
            "peak_pss_gb": round(peak["Pss"] / 1e9, 2), "peak_anon_gb": round(peak["Pss_Anon"] / 1e9, 2),
            "load_before": round(load0, 1), "load_after": round(os.getloadavg()[0], 1)}


def stage_command(repo: Path, stage: str, paths: dict | None = None) -> list[str]:
    """dvc.yaml's command of a stage (with the paths in `paths` replaced), run by this Python."""
    cmd = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()
    assert cmd[0] == "python", cmd
    return [sys.executable, *((paths or {}).get(arg, arg) for arg in cmd[1:])]


def metrics(repo: Path, name: str) -> dict:
    return json.loads((repo / "metrics" / name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", type=Path, default=ROOT / "build" / "trn.json.gz")
    ap.add_argument("--skip", default="", help="comma-separated runs to leave out (e.g. notebook,zcat)")
    args = ap.parse_args()
    src, skip = args.file.resolve(), set(filter(None, args.skip.split(",")))
    if not src.exists():
        print(f"{src} missing: generating the full-size corpus", flush=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample.py"), "--full", "--out", str(src)],
                       check=True)
    shutil.rmtree(WORK, ignore_errors=True)
    repo = copy_repo(WORK / "repo")
    set_params(repo, {"data": {"source": str(src)}, **SHORT_RUN})
    ENV["MLFLOW_TRACKING_URI"] = f"sqlite:///{WORK / 'mlflow.db'}"
    with open(src, "rb") as f:   # into the page cache once, so that every run below reads it from memory
        while f.read(16 << 20):
            pass
    runs: list[dict] = []

    def run(stage: str, cmd: list[str], n: int | None, what: str) -> dict:
        if stage in skip:
            return {}
        print(f"== {stage}: {what}", flush=True)
        r = {"stage": stage, "records": n, "what": what, **measure(cmd, repo, WORK / f"{stage}.log")}
        print(f"== {stage}: {r['wall_s']} s wall, {r['cpu_s']} s CPU, peak RSS {r['peak_rss_gb']} GB (largest "
              f"process), {r['peak_pss_gb']} GB PSS of the tree ({r['peak_anon_gb']} GB anonymous); "
              f"load {r['load_before']} -> {r['load_after']}", flush=True)
        runs.append(r)
        return r

    data_path = [run("decompress", stage_command(repo, "decompress"), None, "ISA-L inflate + UTF-8 check -> JSON lines"),
                 run("preprocess", stage_command(repo, "preprocess"), None,
                     "parse, clean, filter, de-duplicate, split -> Parquet")]
    records = metrics(repo, "data.json")["records_in"]   # counted by preprocess: no extra pass over the file
    for row in data_path:
        row["records"] = records
    run("notebook", [sys.executable, "-c", NOTEBOOK, str(src), str(WORK)], records,
        "seed notebook: gzip copy + pandas.read_json + drop empty + to_json")
    for leftover in (WORK / "trn.json", WORK / "clean.json"):   # the notebook's 4 GB of copies
        leftover.unlink(missing_ok=True)
    # The path is an argument of sh, never part of its command text.
    run("zcat", ["sh", "-c", 'zcat "$1" > /dev/null', "sh", str(src)], records, "floor: zcat FILE > /dev/null")
    out = metrics(repo, "data.json")["records_out"]
    run("tokenize-format", stage_command(repo, "tokenize-format"), out["total"],
        "prompt + tokenise + labels -> Arrow")
    fmt = metrics(repo, "format.json")
    examples = sum(fmt[s]["examples"] for s in ("train", "val", "test"))
    run("train", stage_command(repo, "train"), fmt["train"]["examples"],
        f"{SHORT_RUN['train']['max_steps']} steps on the full train split")
    run("evaluate", stage_command(repo, "evaluate"), fmt["test"]["examples"],
        f"{SHORT_RUN['evaluate']['max_samples']} test examples of the full test split")

    # The same train and evaluate commands on the sample's formatted data (its own copy of the
    # three data stages, which take seconds): the baseline for what the full data's size costs.
    set_params(repo, {"data": {"source": "data/sample/trn.json.gz"}})
    on_sample = {"data/formatted": "data/sample_formatted"}
    for stage in ("decompress", "preprocess", "tokenize-format"):
        subprocess.run(stage_command(repo, stage, on_sample), cwd=repo, env=ENV, check=True, capture_output=True)
    sample = metrics(repo, "format.json")
    run("train (sample data)", stage_command(repo, "train", on_sample), sample["train"]["examples"],
        "the same steps on the sample's train split (baseline)")
    run("evaluate (sample data)", stage_command(repo, "evaluate", on_sample), sample["test"]["examples"],
        "as many test examples of the sample (baseline)")

    machine = {"cpus": os.cpu_count(), "python": platform.python_version(),
               "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                            if line.startswith("model name")), platform.processor()),
               "ram_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30),
               "date": time.strftime("%Y-%m-%d"), "file": str(args.file), "formatted_examples": examples}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "w") as f:
        for r in runs:
            f.write(json.dumps({**r, "machine": machine}) + "\n")

    print(f"\n{records:,} records; {machine['cpus']} CPUs ({machine['cpu']}), {machine['ram_gib']} GiB, "
          f"Python {machine['python']}\n")
    print("| stage | records | wall s | CPU s | peak RSS GB (largest process) | peak PSS GB (process tree) "
          "| of it anonymous GB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['stage']} | {r['records']:,} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_gb']} "
              f"| {r['peak_pss_gb']} | {r['peak_anon_gb']} |")
    by = {r["stage"]: r for r in runs}
    if {"notebook", "decompress", "preprocess"} <= by.keys():
        ours = by["decompress"]["wall_s"] + by["preprocess"]["wall_s"]
        print(f"\ndata path (decompress + preprocess): {ours:.1f} s = {by['notebook']['wall_s'] / ours:.1f}x "
              f"the notebook (target >= 10x)" + (f", {ours / by['zcat']['wall_s']:.2f}x the zcat floor"
                                                 if "zcat" in by else ""))
    for stage in ("train", "evaluate"):
        if {stage, f"{stage} (sample data)"} <= by.keys():
            extra = by[stage]["wall_s"] - by[f"{stage} (sample data)"]["wall_s"]
            print(f"{stage}: {extra:+.1f} s on the full data against the sample (the cost of its size)")
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
