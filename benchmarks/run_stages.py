"""Run pipeline stages exactly as dvc.yaml calls them, with params overrides, timing each.

For machines without DVC (the lent GPU machine): same commands, same scripts, same params file.

    python benchmarks/run_stages.py --set model.name=/tmp/bench_models/1b --set train.max_steps=60 \
        decompress preprocess tokenize-format train evaluate

The overrides are written into params.yaml for the run and the original is put back after.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def stage_commands() -> dict[str, str]:
    """Each stage's cmd, with ${section.key} filled from params.yaml as DVC does."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def fill(cmd: str) -> str:
        while "${" in cmd:
            start = cmd.index("${")
            end = cmd.index("}", start)
            value = params
            for key in cmd[start + 2:end].split("."):
                value = value[key]
            cmd = cmd[:start] + str(value) + cmd[end + 1:]
        return cmd

    return {name: fill(stage["cmd"]) for name, stage in stages.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="+")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML_VALUE")
    args = ap.parse_args()

    params_file = ROOT / "params.yaml"
    backup = params_file.with_suffix(".yaml.bak")
    shutil.copy2(params_file, backup)
    try:
        params = yaml.safe_load(params_file.read_text())
        for item in args.set:
            key, value = item.split("=", 1)
            section, name = key.split(".", 1)
            params[section][name] = yaml.safe_load(value)
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        commands = stage_commands()
        timings = {}
        for stage in args.stages:
            print(f"=== {stage}: {commands[stage]}", flush=True)
            start = time.perf_counter()
            subprocess.run(commands[stage], shell=True, cwd=ROOT, check=True)
            timings[stage] = round(time.perf_counter() - start, 1)
        print("TIMINGS " + json.dumps(timings), flush=True)
    finally:
        shutil.move(backup, params_file)


if __name__ == "__main__":
    main()
