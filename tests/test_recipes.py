"""Recipe validation: good recipes, unknown keys (with the nearest valid key and the line), types, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from exporter.cli import cli
from exporter.errors import UserInputError
from exporter.recipes import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

GOOD = """\
base: embedded:all-MiniLM-L6-v2
task: text-classification
data:
  train: train.jsonl
lora:
  r: 4
training:
  max_steps: 3
"""


@pytest.fixture
def recipe_dir(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    return tmp_path


def write(d: Path, text: str) -> Path:
    p = d / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    r = load_recipe(path)
    assert r.data.train.is_file()
    assert CliRunner().invoke(cli, ["recipe", "check", str(path)]).exit_code == 0


def test_main_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"minilm-sentiment.yaml", "minilm-ner.yaml"} <= names
    assert any(load_recipe(p).task == "text-generation" for p in RECIPES)


def test_good_recipe_resolves_paths_relative_to_file(recipe_dir, monkeypatch):
    monkeypatch.chdir("/")
    r = load_recipe(write(recipe_dir, GOOD))
    assert r.data.train == recipe_dir / "train.jsonl"
    assert r.lora.r == 4 and r.training.max_steps == 3 and r.export.quantize == ["int8"]


def test_unknown_key_names_nearest_valid_key_and_line(recipe_dir):
    with pytest.raises(UserInputError) as e:
        load_recipe(write(recipe_dir, GOOD.replace("  max_steps: 3", "  max_step: 3")))
    msg = str(e.value)
    assert "r.yaml:8" in msg and "training.max_step" in msg and "did you mean 'training.max_steps'" in msg
    with pytest.raises(UserInputError) as e:
        load_recipe(write(recipe_dir, GOOD + "tolerance:\n  max_metric_drop: 0.1\n"))
    assert "r.yaml:9" in str(e.value) and "'tolerances'" in str(e.value)


def test_wrong_type_and_range(recipe_dir):
    with pytest.raises(UserInputError) as e:
        load_recipe(write(recipe_dir, GOOD.replace("r: 4", "r: four")))
    assert "r.yaml:6" in str(e.value) and "lora.r" in str(e.value)
    with pytest.raises(UserInputError) as e:
        load_recipe(write(recipe_dir, GOOD.replace("r: 4", "r: -1")))
    assert "greater than 0" in str(e.value)
    with pytest.raises(UserInputError) as e:
        load_recipe(write(recipe_dir, GOOD.replace("task: text-classification", "task: summarization")))
    assert "r.yaml:2" in str(e.value) and "task" in str(e.value)


def test_missing_file_and_missing_key(recipe_dir):
    with pytest.raises(UserInputError) as e:
        load_recipe(write(recipe_dir, GOOD.replace("train.jsonl", "nope.jsonl")))
    assert "r.yaml:4" in str(e.value) and "nope.jsonl" in str(e.value) and "relative to the recipe" in str(e.value)
    with pytest.raises(UserInputError) as e:
        load_recipe(write(recipe_dir, GOOD.replace("task: text-classification\n", "")))
    assert "missing required key 'task'" in str(e.value)
    with pytest.raises(UserInputError) as e:
        load_recipe(recipe_dir / "absent.yaml")
    assert "recipe not found" in str(e.value)


def test_bad_yaml_syntax_names_line(recipe_dir):
    with pytest.raises(UserInputError) as e:
        load_recipe(write(recipe_dir, GOOD + "lora: [unclosed\n"))
    assert "not valid YAML" in str(e.value) and "r.yaml:" in str(e.value)


def test_overrides_apply_and_are_validated(recipe_dir):
    p = write(recipe_dir, GOOD)
    assert load_recipe(p, {"training.epochs": 2.5}).training.epochs == 2.5
    with pytest.raises(UserInputError):
        load_recipe(p, {"training.batch_size": 0})


def test_cli_check_and_schema(recipe_dir):
    runner = CliRunner()
    r = runner.invoke(cli, ["recipe", "check", str(write(recipe_dir, GOOD.replace("r: 4", "rank: 4")))])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "did you mean 'lora.r'" in r.stderr
    r = runner.invoke(cli, ["recipe", "schema"])
    schema = json.loads(r.stdout)
    assert r.exit_code == 0 and schema == Recipe.model_json_schema()
    assert schema["additionalProperties"] is False


def test_session_config_from_the_recipe_is_checked_when_it_loads(recipe_dir):
    p = write(recipe_dir, GOOD + "export:\n  session_config:\n    session.intra_op.allow_spinning: '0'\n")
    assert load_recipe(p).export.session_config == {"session.intra_op.allow_spinning": "0"}
    assert load_recipe(write(recipe_dir, GOOD)).export.session_config == {}
    unquoted = GOOD + "export:\n  session_config:\n    session.intra_op.allow_spinning: 0\n    session.set_denormal_as_zero: true\n"
    assert load_recipe(write(recipe_dir, unquoted)).export.session_config == {
        "session.intra_op.allow_spinning": "0", "session.set_denormal_as_zero": "1"}
    bad = GOOD + "export:\n  session_config:\n    ep.context_file_path: /tmp/x\n"
    with pytest.raises(UserInputError, match="ep.context_file_path: not a session option a bundle may carry"):
        load_recipe(write(recipe_dir, bad))
    with pytest.raises(UserInputError, match="use one of 0, 1"):
        load_recipe(write(recipe_dir, GOOD + "export:\n  session_config:\n    session.set_denormal_as_zero: 'on'\n"))


def test_int8_weights_from_the_recipe_and_the_run_flag(recipe_dir, tmp_path):
    p = write(recipe_dir, GOOD + "export:\n  int8_weights: unsigned\n")
    assert load_recipe(p).export.int8_weights == "unsigned"
    assert load_recipe(write(recipe_dir, GOOD)).export.int8_weights == "auto"
    assert load_recipe(p, {"export.int8_weights": "signed7"}).export.int8_weights == "signed7"
    with pytest.raises(UserInputError, match="int8_weights"):
        load_recipe(write(recipe_dir, GOOD + "export:\n  int8_weights: signed8\n"))
    # A decoder recipe is refused before any fine-tuning: its int8 is weight-only.
    r = CliRunner().invoke(cli, ["run", str(ROOT / "recipes" / "smollm2-sft.yaml"), "-o", str(tmp_path / "out"),
                                 "--int8-weights", "signed7"])
    assert r.exit_code == 1 and "--int8-weights is for encoders" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.adapter").exists()
