"""titletune/params.py: the whole params.yaml is checked; every bad value is one line naming the
file, the key, the value and what is allowed."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from titletune.cli import UserError
from titletune.params import Params, load_params, read_params
from titletune.testing import ROOT

DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())


def params_file(tmp_path: Path, edit) -> Path:
    params = copy.deepcopy(DEFAULT)
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def with_value(tmp_path: Path, section: str, key: str, value) -> Path:
    return params_file(tmp_path, lambda p: p[section].__setitem__(key, value))


def error(path: Path, section: str = "data") -> str:
    with pytest.raises(UserError) as err:
        load_params(section, path=path)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_the_committed_params_are_valid_and_typed():
    data, train = load_params("data", "train", path=ROOT / "params.yaml")
    assert data.source == "data/sample/trn.json.gz"
    assert isinstance(train.learning_rate, float) and isinstance(train.per_device_train_batch_size, int)
    assert load_params("export", path=ROOT / "params.yaml").dtype == "auto"   # one section: no tuple
    assert set(Params.model_fields) == set(DEFAULT)


@pytest.mark.parametrize("section, key, value, allowed", [
    # positive rates and sizes
    ("train", "learning_rate", -1, "must be a number > 0"),
    ("train", "learning_rate", 0, "must be a number > 0"),
    ("train", "per_device_train_batch_size", 0, "must be a whole number >= 1"),
    ("train", "gradient_accumulation_steps", -2, "must be a whole number >= 1"),
    ("train", "num_train_epochs", 0, "must be a number > 0"),
    ("evaluate", "batch_size", 0, "must be auto or a whole number >= 1"),
    ("evaluate", "max_new_tokens", 0, "must be a whole number >= 1"),
    ("format", "max_length", 0, "must be a whole number in [1, 1048576]"),
    ("format", "max_length", 10**9, "must be a whole number in [1, 1048576]"),
    ("preprocess", "min_content_chars", -1, "must be a whole number >= 0"),
    ("preprocess", "max_records", -5, "must be a whole number >= 0"),
    # fractions
    ("preprocess", "val_fraction", 1.5, "must be a number in [0, 1)"),
    ("preprocess", "test_fraction", -0.1, "must be a number in [0, 1)"),
    ("preprocess", "max_bad_fraction", 2, "must be a number in [0, 1]"),
    ("train", "lora_dropout", 1.0, "must be a number in [0, 1)"),
    ("evaluate", "top_p", 0, "must be a number in (0, 1]"),
    ("train", "warmup_steps", 1.5, "must be a whole number of steps >= 0, or a fraction of all steps in [0, 1)"),
    ("train", "warmup_steps", -1, "must be a whole number of steps >= 0, or a fraction of all steps in [0, 1)"),
    # known values
    ("format", "style", "alpaca", "must be instruction or chat"),
    ("export", "dtype", "fp8", "must be auto, bfloat16, float16 or float32"),
    # the export parity gate
    ("export", "parity_samples", -1, "must be a whole number >= 0"),
    ("export", "parity_max_new_tokens", 0, "must be a whole number >= 1"),
    ("export", "parity_max_token_mismatch", 1.5, "must be a number in [0, 1]"),
    ("export", "parity_max_nll_diff", -0.01, "must be a number >= 0"),
    ("export", "register_merged", "yes", "must be true or false"),
    ("evaluate", "registered_model", "my model", "must be a name of letters, digits, '.', '_' and '-', "
                                                 "or empty (no registry)"),
    ("evaluate", "registered_model", "x' or name='y", "must be a name of letters, digits, '.', '_' and '-', "
                                                      "or empty (no registry)"),
    ("train", "gradient_checkpointing", "yes", "must be false, true or unsloth"),
    ("train", "gpus", -1, "must be auto or a whole number >= 0"),
    ("train", "gpus", "all", "must be auto or a whole number >= 0"),
    ("train", "tokens_per_step", "fast", "must be auto or a whole number >= 0"),
    ("train", "tokens_per_step", -1, "must be auto or a whole number >= 0"),
    ("predict", "gpus", -1, "must be auto or a whole number >= 0"),
    ("predict", "chunk_rows", 0, "must be a whole number >= 1"),
    # types: strict (no float for an int, no string or number for a bool)
    ("train", "per_device_train_batch_size", 8.5, "must be a whole number >= 1"),
    ("train", "learning_rate", "fast", "must be a number > 0"),
    ("train", "learning_rate", True, "must be a number > 0"),
    ("train", "seed", "42", "must be a whole number in [0, 4294967295]"),
    ("model", "load_in_4bit", "yes", "must be true or false"),
    ("evaluate", "do_sample", 1, "must be true or false"),
    ("model", "name", "", "must be a non-empty string"),
    ("train", "target_modules", [], "must be a list of module names"),
    # runnable values only (#22): numpy and torch take 32-bit seeds; no model has a rank this wide
    ("train", "seed", 2**32, "must be a whole number in [0, 4294967295]"),
    ("train", "seed", -1, "must be a whole number in [0, 4294967295]"),
    ("train", "lora_r", 10**9, "must be a whole number in [1, 16384]"),
    ("train", "lora_r", 0, "must be a whole number in [1, 16384]"),
    ("evaluate", "temperature", 1e-300, "must be a number >= 0.01 (for greedy answers set do_sample: false)"),
])
def test_a_bad_value_is_one_line_with_key_value_and_range(tmp_path, section, key, value, allowed):
    # Checked whatever section a stage asks for: here `data`.
    assert error(with_value(tmp_path, section, key, value)) == \
        f"params.yaml: {section}.{key}: {json.dumps(value)} is not allowed ({allowed})"


def test_the_example_of_the_brief(tmp_path):
    assert error(with_value(tmp_path, "train", "learning_rate", -1)) == \
        "params.yaml: train.learning_rate: -1 is not allowed (must be a number > 0)"


@pytest.mark.parametrize("value, expected", [
    ("1e-4", 1e-4), (2, 2.0), ("0.5", 0.5)])
def test_numbers_may_be_numeric_strings_or_ints(tmp_path, value, expected):
    # YAML 1.1 reads 1e-4 as a string; dvc exp run -S train.learning_rate=1e-4 must still work.
    lr = load_params("train", path=with_value(tmp_path, "train", "learning_rate", value)).learning_rate
    assert lr == expected and isinstance(lr, float)


@pytest.mark.parametrize("value, expected", [(0, 0), (10, 10), (0.1, 0.1), ("0.05", 0.05)])
def test_warmup_steps_is_a_step_count_or_a_fraction(tmp_path, value, expected):
    assert load_params("train", path=with_value(tmp_path, "train", "warmup_steps", value)).warmup_steps == expected


@pytest.mark.parametrize("value", ["auto", 0, 2])
def test_gpus_auto_or_a_count(tmp_path, value):
    assert load_params("train", path=with_value(tmp_path, "train", "gpus", value)).gpus == value


@pytest.mark.parametrize("value", [False, True, "unsloth"])
def test_gradient_checkpointing_values(tmp_path, value):
    path = with_value(tmp_path, "train", "gradient_checkpointing", value)
    assert load_params("train", path=path).gradient_checkpointing == value


def test_unknown_section_is_named_with_a_hint(tmp_path):
    path = params_file(tmp_path, lambda p: p.__setitem__("trian", p.pop("train")))
    assert error(path, "preprocess") == ("params.yaml: trian: unknown section (did you mean train?); "
                                         "the sections are data, preprocess, model, format, train, evaluate, export, predict")


def test_missing_section_and_missing_key(tmp_path):
    assert error(params_file(tmp_path, lambda p: p.pop("export"))) == "params.yaml: export: missing"
    assert error(params_file(tmp_path, lambda p: p["train"].pop("seed"))) == "params.yaml: train.seed: missing"
    assert error(params_file(tmp_path, lambda p: p.__setitem__("train", 3))) == \
        "params.yaml: train: expected a mapping of keys, got 3"


def test_unknown_key_with_a_hint(tmp_path):
    assert error(with_value(tmp_path, "train", "lerning_rate", 0.1)) == \
        "params.yaml: train.lerning_rate: unknown key (did you mean learning_rate?)"
    assert error(with_value(tmp_path, "preprocess", "min_title_char", 3)) == \
        "params.yaml: preprocess.min_title_char: unknown key (did you mean min_title_chars?)"


@pytest.mark.parametrize("old, new", [
    ("batch_size", "per_device_train_batch_size"), ("grad_accum", "gradient_accumulation_steps"),
    ("lr_scheduler", "lr_scheduler_type"), ("warmup_ratio", "warmup_steps"), ("optimizer", "optim"),
    ("epochs", "num_train_epochs")])
def test_a_renamed_train_key_names_its_new_name(tmp_path, old, new):
    def rename(p):
        p["train"][old] = p["train"].pop(new)
    message = error(params_file(tmp_path, rename))
    assert message.startswith(f"params.yaml: train.{old}: unknown key (renamed {new})"), message


@pytest.mark.parametrize("question, problem", [
    ("Describe this product", "must contain {title} and no other {...} placeholder"),
    ("What is {name}?", "must contain {title} and no other {...} placeholder"),
    ("What is {title} by {brand}?", "must contain {title} and no other {...} placeholder"),
    ("What is {title}? {", "must be a question with {title} (Single '{' encountered in format string)"),
    # str.format would run these on every title: pad it to 200 MB, or fail (#22)
    ("What is {title:>200000000}?", "must write the title as a bare {title}, without a format spec or conversion"),
    ("What is {title:{title}}?", "must write the title as a bare {title}, without a format spec or conversion"),
    ("What is {title!r}?", "must write the title as a bare {title}, without a format spec or conversion"),
    ("What is {title[0]}?", "must contain {title} and no other {...} placeholder"),
    ("What is {title.upper}?", "must contain {title} and no other {...} placeholder"),
])
def test_each_question_has_title_and_no_other_placeholder(tmp_path, question, problem):
    path = with_value(tmp_path, "format", "questions", ["What is {title}?", question])
    assert error(path) == f'params.yaml: format.questions[1]: "{question}" is not allowed ({problem})'


@pytest.mark.parametrize("section, key, value", [
    ("train", "weight_decay", float("inf")), ("train", "learning_rate", float("nan")),
    ("train", "num_train_epochs", float("inf")), ("evaluate", "temperature", float("inf")),
    ("export", "parity_max_nll_diff", float("nan")), ("train", "learning_rate", "1e999")])
def test_nan_and_infinity_are_not_numbers_here(tmp_path, section, key, value):
    # YAML writes them .nan and .inf; "1e999" is a string that float() reads as inf
    message = error(with_value(tmp_path, section, key, value))
    assert message.startswith(f"params.yaml: {section}.{key}: ") and " is not allowed (must be a number" in message


def test_a_duplicate_key_is_refused_with_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys; DVC refuses the file: so does the check (#22)."""
    text = (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("  seed: 42\n", "  seed: 42\n  lora_r: 8\n  seed: 7\n"))
    first = text[:text.index("  seed: 42")].count("\n") + 1
    assert error(path) == f"params.yaml: line {first + 2}: train.seed: duplicate key (also at line {first}); keep one"
    path.write_text(text + "data:\n  source: x.json\n")                      # a whole section again
    assert error(path).startswith(f"params.yaml: line {text.count(chr(10)) + 1}: data: duplicate key (also at line ")


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    """A params file needs no alias; nine nested ones are 9**9 strings ("billion laughs")."""
    path = tmp_path / "params.yaml"
    laughs = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))
    path.write_text('l0: &l0 "lol"\n' + laughs + "data:\n  source: *l9\n")
    assert error(path) == "params.yaml: l1.0: a YAML alias (*name) refers to line 1; write the value out"


def test_questions_and_patterns_lists(tmp_path):
    assert error(with_value(tmp_path, "format", "questions", [])) == ("params.yaml: format.questions: [] is not "
                                                                     "allowed (must be a list of at least one "
                                                                     "question, each with {title})")
    message = error(with_value(tmp_path, "preprocess", "boilerplate_patterns", ["ok$", "--This text (refers"]))
    assert re.fullmatch(r'params\.yaml: preprocess\.boilerplate_patterns\[1\]: "--This text \(refers" is not '
                        r"allowed \(must be a valid regular expression: missing \) at position 19\)", message), message


def test_early_stopping_needs_a_checkpoint_at_evaluated_steps(tmp_path):
    def edit(p):
        p["train"].update(early_stopping_patience=2, eval_steps=4, save_steps=6)
    assert error(params_file(tmp_path, edit)) == (
        "params.yaml: train.save_steps: 6 is not allowed with early_stopping_patience 2 (must be a multiple of "
        "eval_steps, 4, so that an evaluated step has a checkpoint to go back to)")
    for patience, save_steps in ((0, 6), (2, 8), (2, 4)):       # off, or a multiple: fine
        path = params_file(tmp_path, lambda p: p["train"].update(early_stopping_patience=patience, eval_steps=4,
                                                                 save_steps=save_steps))
        assert load_params("train", path=path).early_stopping_patience == patience
    assert error(with_value(tmp_path, "train", "early_stopping_patience", -1)) == \
        "params.yaml: train.early_stopping_patience: -1 is not allowed (must be a whole number >= 0)"


def test_split_fractions_leave_room_for_training(tmp_path):
    def edit(p):
        p["preprocess"].update(val_fraction=0.6, test_fraction=0.5)
    assert error(params_file(tmp_path, edit)) == \
        "params.yaml: preprocess.val_fraction + test_fraction: 1.1 is not allowed (must be < 1)"


def test_several_problems_name_the_first_and_count_the_rest(tmp_path):
    def edit(p):
        p["train"].update(lora_r=0, learning_rate=-1)
        p["evaluate"]["batch_size"] = 0
    assert error(params_file(tmp_path, edit)) == \
        "params.yaml: train.lora_r: 0 is not allowed (must be a whole number in [1, 16384]) (and 2 more)"


def test_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_params(tmp_path / "params.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(UserError, match=r"^.*bad\.yaml: not valid YAML: "):
        read_params(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="expected sections"):
        read_params(tmp_path / "list.yaml")


def test_sections_are_read_only(tmp_path):
    train = load_params("train", path=ROOT / "params.yaml")
    with pytest.raises(Exception):
        train.learning_rate = 1.0


@pytest.mark.parametrize("name", ["titletune", "team.adapters-v2_1", ""])
def test_registered_model_is_a_plain_name_or_empty(tmp_path, name):
    assert load_params("evaluate", path=with_value(tmp_path, "evaluate", "registered_model", name)).registered_model == name


@pytest.mark.parametrize("member", ["int", "literal['auto']", "a-member-name-of-a-later-pydantic[int]"])
def test_the_key_in_a_message_does_not_depend_on_how_pydantic_names_union_members(member):
    """pydantic adds the failed union member to an error's loc; the message keeps section.key whatever it is."""
    from titletune.params import _describe
    problem = {"type": "int_type", "loc": ("train", "gpus", member), "input": "all", "msg": "not an int"}
    assert _describe(problem) == 'train.gpus: "all" is not allowed (must be auto or a whole number >= 0)'
    listed = {"type": "value_error", "loc": ("format", "questions", 1, member), "input": "Hi",
              "ctx": {"error": "must contain {title} and no other {...} placeholder"}}
    assert _describe(listed) == 'format.questions[1]: "Hi" is not allowed (must contain {title} and no other ' \
                                '{...} placeholder)'


def test_a_folder_or_a_binary_file_as_params_is_one_line(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00train:")
    with pytest.raises(UserError, match=r"^.*/binary.yaml: not UTF-8 text \(byte 0\)$"):
        read_params(tmp_path / "binary.yaml")
    with pytest.raises(UserError, match=r"^.*: cannot be read \(Is a directory\)$"):
        read_params(tmp_path)


def test_gguf_types_are_the_known_ones_listed_once(tmp_path):
    assert load_params("export", path=with_value(tmp_path, "export", "gguf", [])).gguf == []
    assert load_params("export", path=with_value(tmp_path, "export", "gguf", ["q4_k_m", "f16"])).gguf == ["q4_k_m", "f16"]
    assert error(with_value(tmp_path, "export", "gguf", ["q8_0", "q5_k_s"])) == (
        'params.yaml: export.gguf[1]: "q5_k_s" is not allowed '
        "(must be a list of GGUF types, each one of f16, bf16, q8_0, q4_k_m (or [] for none))")
    assert error(with_value(tmp_path, "export", "gguf", ["q8_0", "q8_0"])) == (
        'params.yaml: export.gguf: ["q8_0", "q8_0"] is not allowed (must not repeat an item)')
