"""titletune.generation.evaluation: the base model's results as evaluate-base writes them and evaluate
reads them back (checked against the settings and the examples), and the settings list dvc.yaml
declares for evaluate-base."""
from __future__ import annotations

import json

import pytest
import yaml

from titletune.cli import UserError
from titletune.generation.evaluation import BASE_SETTINGS, base_settings, read_base, write_base
from titletune.params import load_params
from titletune.testing import ROOT

EXAMPLES = {"uid": ["a", "b", "c"], "title": ["T1", "T2", "T3"], "question": ["Q1", "Q2", "Q3"],
            "content": ["R1", "R2", "R3"]}


def rows(examples: dict) -> list[dict]:
    return [dict(zip(examples, values)) for values in zip(*examples.values())]


class Examples(list):
    """What the evaluation reads of a datasets.Dataset: rows, and a column by name."""
    def __getitem__(self, key):
        return [row[key] for row in self] if isinstance(key, str) else super().__getitem__(key)


def test_dvc_yaml_declares_exactly_the_settings_that_change_the_base_answers():
    params = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate-base"]["params"]
    declared = {p.removeprefix("evaluate.") for p in params if p.startswith("evaluate.")}
    assert declared == set(BASE_SETTINGS)
    assert set(BASE_SETTINGS) < set(load_params("evaluate", path=ROOT / "params.yaml").model_dump())


@pytest.fixture
def saved(tmp_path):
    ep = load_params("evaluate", path=ROOT / "params.yaml")
    paths = tmp_path / "eval_base.json", tmp_path / "eval_base_samples.jsonl"
    write_base(*paths, Examples(rows(EXAMPLES)), base_settings(ep), {"perplexity": 2.5}, ["x", "y", "z"])
    return paths, ep


def test_what_evaluate_base_writes_evaluate_reads_back(saved):
    paths, ep = saved
    assert read_base(*paths, Examples(rows(EXAMPLES)), base_settings(ep)) == ({"perplexity": 2.5}, ["x", "y", "z"])
    written = json.loads(paths[0].read_text())
    assert written["samples"] == 3 and written["settings"]["max_new_tokens"] == ep.max_new_tokens
    assert json.loads(paths[1].read_text().splitlines()[1]) == {"uid": "b", "title": "T2", "question": "Q2",
                                                               "reference": "R2", "base": "y"}


@pytest.mark.parametrize("uids, message", [
    (["a", "c", "b"], "line 2: uid 'b' where this test sample has uid 'c'"),
    (["a", "b"], "line 3: uid 'c' where this test sample has only 2 examples"),
    (["a", "b", "c", "d"], "3 answers for 4 test examples"),
])
def test_base_answers_for_other_examples_are_refused(saved, uids, message):
    paths, ep = saved
    examples = Examples(rows(EXAMPLES | {"uid": uids, "title": uids, "question": uids, "content": uids}))
    with pytest.raises(UserError, match="dvc repro evaluate-base") as err:
        read_base(*paths, examples, base_settings(ep))
    assert message in str(err.value)


def test_base_results_of_other_settings_are_refused(saved, tmp_path):
    paths, ep = saved
    with pytest.raises(UserError, match=r"eval_base.json: the base results are for max_new_tokens = \d+, "
                                        r"params.yaml has 999"):
        read_base(*paths, Examples(rows(EXAMPLES)), base_settings(ep) | {"max_new_tokens": 999})
    with pytest.raises(UserError, match="missing.json: not found; run `dvc repro evaluate-base`"):
        read_base(tmp_path / "missing.json", paths[1], Examples(rows(EXAMPLES)), base_settings(ep))
