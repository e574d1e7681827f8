"""dvc.yaml: each stage depends on exactly the code it runs — its script and the titletune modules
that script imports, directly or not — so that an edit re-runs the stages that use it, and only
those (and what follows them)."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import yaml

from titletune.testing import ROOT, run

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imported_modules(path: Path) -> set[str]:
    """The titletune and stages modules a file imports (module names), at any depth in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from titletune import x
    return {name for name in found if name.split(".")[0] in ("titletune", "stages")}


def code_closure(script: str) -> set[str]:
    """script and every module file it imports, transitively, as repo-relative paths."""
    todo, seen = [script], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in imported_modules(ROOT / path):
            file = module.replace(".", "/") + ".py"
            if (ROOT / file).is_file():
                todo.append(file)
    return seen


PHASES = ["data", "training", "generation", "export"]  # the lifecycle, in order


def test_no_import_climbs_to_a_later_phase():
    """The shared base (titletune/*.py) imports no phase; a phase imports the base and earlier
    phases only (data never imports training; export may use generation for its checks)."""
    for path in ROOT.glob("titletune/**/*.py"):
        rel = path.relative_to(ROOT).parts
        rank = PHASES.index(rel[1]) if len(rel) > 2 else -1
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "titletune" and len(parts) > 1 and parts[1] in PHASES:
                assert PHASES.index(parts[1]) <= rank, f"{path.relative_to(ROOT)} imports {module}"


def stage_code_deps(stage: dict) -> set[str]:
    return {d for d in stage["deps"] if d.endswith(".py")}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deps_are_exactly_the_code_the_stage_imports(name):
    stage = STAGES[name]
    script = f"stages/{name.replace('-', '_')}.py"
    assert stage["cmd"].startswith(f"python -m stages.{name.replace('-', '_')} "), stage["cmd"]
    assert stage_code_deps(stage) == code_closure(script)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_no_param_reaches_a_shell_command(name):
    """DVC runs `cmd` through a shell: a ${param} there would paste user text (a file name) into
    it. Stages read their params from params.yaml themselves."""
    assert "${" not in STAGES[name]["cmd"]


def test_package_inits_hold_no_code():
    """The package __init__.py files (titletune's, its phases', stages') run with every import but
    are no dep of any stage: they may hold a docstring only."""
    for init in [*map(str, ROOT.glob("titletune/**/__init__.py")), "stages/__init__.py"]:
        body = ast.parse((ROOT / init).read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), init


def outs_of(stage: dict) -> set[str]:
    paths = set()
    for key in ("outs", "metrics", "plots"):
        for out in stage.get(key, []):
            paths |= set(out) if isinstance(out, dict) else {out}
    return paths


def downstream(changed: set[str]) -> set[str]:
    """changed and every stage that depends, directly or not, on an output of one of them."""
    result = set(changed)
    grew = True
    while grew:
        grew = False
        for name, stage in STAGES.items():
            if name in result:
                continue
            produced = set().union(*(outs_of(STAGES[s]) for s in result))
            if any(d == o or d.startswith(o.rstrip("/") + "/") for d in stage["deps"] for o in produced):
                result.add(name)
                grew = True
    return result


def changed_stages(repo: Path) -> set[str]:
    return set(json.loads(run(["dvc", "status", "--json"], repo).stdout))


@pytest.mark.slow
def test_editing_the_prompt_module_reruns_tokenize_format_and_what_follows(pipeline_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    assert changed_stages(repo) == set()
    prompt = repo / "titletune" / "prompt.py"
    prompt.write_text(prompt.read_text() + "# a comment\n")
    assert changed_stages(repo) == {"tokenize-format"}
    assert downstream({"tokenize-format"}) == {"tokenize-format", "train", "evaluate-base", "evaluate", "export", "gguf"}

    # A real change of the prompt: tokenize-format re-runs, and then what uses its data is out of
    # date (export too: its parity gate reads the test split); the data stages before it never are.
    prompt.write_text(prompt.read_text().replace("Write a response that answers it.", "Answer it."))
    run(["dvc", "repro", "tokenize-format"], repo, timeout=300)
    assert "Answer it." in (repo / "data/formatted/train/data-00000-of-00001.arrow").read_bytes().decode("utf-8", "replace")
    assert changed_stages(repo) == {"train", "evaluate-base", "evaluate", "export", "gguf"}


@pytest.mark.slow
def test_editing_the_cleaning_module_reruns_preprocess_and_what_follows(pipeline_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    cleaning = repo / "titletune" / "data" / "cleaning.py"
    cleaning.write_text(cleaning.read_text() + "# a comment\n")
    assert changed_stages(repo) == {"preprocess"}
    assert downstream({"preprocess"}) == {"preprocess", "tokenize-format", "train", "evaluate-base", "evaluate",
                                         "export", "gguf"}
    assert "decompress" not in downstream({"preprocess"})


def test_a_training_change_does_not_reach_the_base_model_evaluation():
    """evaluate-base reads no output of train and no train param: `dvc exp run -S train.X=...`
    re-runs train, evaluate, export and gguf, never the base model's answers."""
    assert downstream({"train"}) == {"train", "evaluate", "export", "gguf"}
    assert not any(p.startswith("train") for p in STAGES["evaluate-base"]["params"])
