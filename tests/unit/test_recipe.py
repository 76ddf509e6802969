"""Recipes: parsing, round trip through YAML, fingerprints, and errors that name file and field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from compress.errors import EXIT_BAD_INPUT, BadInputError, RecipeError
from compress.recipe import Recipe, dump_recipe, load_recipe, parse_recipe

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
REAL_RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def valid_recipe() -> dict[str, Any]:
    return {
        "version": 1,
        "name": "test-int4-g64",
        "model": {"source": "org/model"},
        "stages": [{"type": "quantize", "bits": 4, "group_size": 64, "symmetric": False}],
        "eval": {"tasks": [{"name": "mmlu", "limit": 1}]},
        "gate": {"budgets": {"mmlu": {"max_drop": 0.05}}},
    }


def write_recipe(tmp_path: Path, data: Any, name: str = "my-recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    return str(excinfo.value)


# --- valid recipes ---


def test_valid_recipe_parses():
    recipe = parse_recipe(valid_recipe())
    assert isinstance(recipe, Recipe)
    assert recipe.version == 1
    assert recipe.name == "test-int4-g64"
    assert recipe.model.source == "org/model"
    (stage,) = recipe.stages
    assert (stage.type, stage.bits, stage.group_size, stage.symmetric) == ("quantize", 4, 64, False)
    assert stage.scheme == "int4-g64-asym"
    assert [(t.name, t.limit) for t in recipe.eval.tasks] == [("mmlu", 1)]
    assert recipe.gate.budgets["mmlu"].max_drop == 0.05
    # Defaults are filled in.
    assert recipe.dtype == "bfloat16"
    assert recipe.output.dir == "runs"
    assert recipe.calibration is None


def test_load_recipe_from_file(tmp_path):
    path = write_recipe(tmp_path, valid_recipe())
    assert load_recipe(path) == parse_recipe(valid_recipe())
    assert load_recipe(str(path)) == parse_recipe(valid_recipe())


def test_round_trip_through_yaml():
    recipe = parse_recipe(valid_recipe())
    dumped = dump_recipe(recipe)
    again = parse_recipe(yaml.safe_load(dumped))
    assert again == recipe
    assert again.fingerprint() == recipe.fingerprint()
    # The dump is fully resolved (defaults written out) and is itself a fixed point.
    assert "output" in yaml.safe_load(dumped)
    assert dump_recipe(again) == dumped


def test_fingerprint_is_stable_and_sensitive():
    recipe = parse_recipe(valid_recipe())
    fingerprint = recipe.fingerprint()
    assert len(fingerprint) == 64
    int(fingerprint, 16)  # hex
    assert parse_recipe(valid_recipe()).fingerprint() == fingerprint
    # Key order in the document does not matter ...
    reordered = dict(reversed(list(valid_recipe().items())))
    assert parse_recipe(reordered).fingerprint() == fingerprint
    # ... and writing out a default explicitly does not change the recipe.
    explicit = valid_recipe() | {"dtype": "bfloat16"}
    assert parse_recipe(explicit).fingerprint() == fingerprint
    # Any real change does.
    changed = valid_recipe()
    changed["stages"][0]["group_size"] = 128
    assert parse_recipe(changed).fingerprint() != fingerprint


@pytest.mark.parametrize("path", REAL_RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.version == 1
    assert recipe.stages
    assert set(recipe.gate.budgets) <= {t.name for t in recipe.eval.tasks}
    assert parse_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_shipped_recipes_are_found():
    assert {p.name for p in REAL_RECIPES} >= {
        "int4-group.yaml",
        "int8-channel.yaml",
        "prune-heads-ffn.yaml",
        "prune-distill-int4.yaml",
    }


# --- errors: file name and exact field path ---


def _set(path: tuple, value: Any):
    def mutate(data: dict) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: tuple):
    def mutate(data: dict) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


FIELD_ERRORS = [
    pytest.param(_set(("stages", 0, "group_sise"), 64), "stages[0].group_sise", id="unknown-key"),
    pytest.param(_set(("stages", 0, "type"), "sparsify"), "stages[0]", id="unknown-stage"),
    pytest.param(_set(("stages", 0, "bits"), 3), "stages[0].bits", id="bits-3"),
    pytest.param(_set(("version",), 2), "version", id="version-2"),
    pytest.param(_delete(("version",)), "version", id="version-missing"),
    pytest.param(
        _set(("eval", "tasks", 0, "limit"), "many"), "eval.tasks[0].limit", id="limit-many"
    ),
    pytest.param(_set(("eval", "tasks", 0, "limit"), 0), "eval.tasks[0].limit", id="limit-0"),
    pytest.param(_set(("model", "source_"), "x"), "model.source_", id="unknown-model-key"),
    pytest.param(_delete(("model", "source")), "model.source", id="source-missing"),
    pytest.param(_set(("name",), "has spaces"), "name", id="bad-name"),
    pytest.param(_set(("stages",), []), "stages", id="no-stages"),
    pytest.param(
        _set(("gate", "budgets", "mmlu", "max_drop"), -0.1),
        "gate.budgets.mmlu.max_drop",
        id="negative-budget",
    ),
]


@pytest.mark.parametrize(("mutate", "field"), FIELD_ERRORS)
def test_invalid_field_names_file_and_path(tmp_path, mutate, field):
    data = valid_recipe()
    mutate(data)
    message = load_error(write_recipe(tmp_path, data))
    assert "my-recipe.yaml" in message
    # The path is a line of its own: "  <path>: <what is wrong>".
    assert f"\n  {field}: " in message, message


@pytest.mark.parametrize("group_size", [0, -2, 7])
def test_invalid_group_size_names_the_field_path(tmp_path, group_size):
    # 0 and -2 are neither -1 nor positive; 7 · 4 bits = 28 does not fill whole int32 words.
    data = valid_recipe()
    data["stages"][0]["group_size"] = group_size
    message = load_error(write_recipe(tmp_path, data))
    assert "my-recipe.yaml" in message
    assert "\n  stages[0].group_size: " in message, message
    assert str(group_size) in message


def test_group_size_must_fill_whole_words_at_8_bits_too():
    data = valid_recipe()
    data["stages"][0] |= {"bits": 8, "group_size": 4}  # 4 · 8 = 32: fine
    assert parse_recipe(data).stages[0].group_size == 4
    data["stages"][0]["group_size"] = 6  # 6 · 8 = 48: not whole words
    with pytest.raises(RecipeError, match=r"stages\[0\]\.group_size: .*\b6\b"):
        parse_recipe(data)


def test_gate_budget_for_a_task_not_evaluated(tmp_path):
    data = valid_recipe()
    data["gate"]["budgets"]["gsm8k"] = {"max_drop": 0.1}
    message = load_error(write_recipe(tmp_path, data))
    assert "my-recipe.yaml" in message
    assert "gate.budgets" in message
    assert "gsm8k" in message


def test_duplicate_task_names(tmp_path):
    data = valid_recipe()
    data["eval"]["tasks"].append({"name": "mmlu", "limit": 2})
    message = load_error(write_recipe(tmp_path, data))
    assert "my-recipe.yaml" in message
    assert "\n  eval: " in message
    assert "listed twice" in message
    assert "mmlu" in message


@pytest.mark.parametrize(
    ("text", "type_name"),
    [("- version: 1\n- name: x\n", "list"), ("just a string\n", "str"), ("", "NoneType")],
    ids=["list", "scalar", "empty"],
)
def test_non_mapping_document(tmp_path, text, type_name):
    message = load_error(write_recipe(tmp_path, text))
    assert "my-recipe.yaml" in message
    assert "mapping" in message
    assert type_name in message


def test_invalid_yaml_syntax(tmp_path):
    message = load_error(write_recipe(tmp_path, "version: 1\nstages: [unclosed\n"))
    assert "my-recipe.yaml" in message
    assert "not valid YAML" in message


def test_missing_file(tmp_path):
    path = tmp_path / "does-not-exist.yaml"
    message = load_error(path)
    assert "does-not-exist.yaml" in message
    assert "not found" in message


def test_directory_instead_of_file(tmp_path):
    assert "not found" in load_error(tmp_path)


def test_parse_recipe_names_its_source():
    data = valid_recipe()
    data["version"] = 2
    with pytest.raises(RecipeError, match=r"^from-somewhere: invalid recipe\n  version: "):
        parse_recipe(data, "from-somewhere")
    with pytest.raises(RecipeError, match=r"^<recipe>: "):
        parse_recipe(data)


def test_recipe_errors_are_bad_input():
    """Recipe errors map to exit code 2 (bad input), which release pipelines rely on."""
    assert issubclass(RecipeError, BadInputError)
    with pytest.raises(RecipeError) as excinfo:
        parse_recipe([])
    assert excinfo.value.exit_code == EXIT_BAD_INPUT == 2


def test_every_error_is_reported_at_once(tmp_path):
    data = valid_recipe()
    data["version"] = 2
    data["stages"][0]["group_sise"] = 64
    data["eval"]["tasks"][0]["limit"] = "many"
    message = load_error(write_recipe(tmp_path, data))
    for field in ("version", "stages[0].group_sise", "eval.tasks[0].limit"):
        assert f"\n  {field}: " in message


def test_valid_recipe_is_not_mutated_by_parsing():
    data = valid_recipe()
    snapshot = copy.deepcopy(data)
    parse_recipe(data)
    assert data == snapshot


def test_quality_budget_needs_quality_eval(tmp_path):
    data = valid_recipe()
    data["gate"]["quality"] = {"max_kl_divergence": 0.1}
    message = load_error(write_recipe(tmp_path, data))
    assert "gate.quality needs eval.quality" in message
    data["eval"]["quality"] = {"path": "held-out.txt"}
    assert parse_recipe(data).gate.quality.max_kl_divergence == 0.1


def test_quality_budget_must_set_a_limit_and_gate_must_gate(tmp_path):
    data = valid_recipe()
    data["eval"]["quality"] = {"path": "held-out.txt"}
    data["gate"]["quality"] = {}
    assert "gate.quality" in load_error(write_recipe(tmp_path, data))
    data["gate"] = {"budgets": {}}
    assert "no budget" in load_error(write_recipe(tmp_path, data))
    data["gate"] = {"quality": {"min_top1_agreement": 1.5}}
    assert "gate.quality.min_top1_agreement" in load_error(write_recipe(tmp_path, data))


# --- the prune stage ---


def _with_prune(prune: dict[str, Any], *, after_quantize: bool = False, calibration: bool = True):
    data = valid_recipe()
    stage = {"type": "prune", **prune}
    data["stages"] = data["stages"] + [stage] if after_quantize else [stage, *data["stages"]]
    if calibration:
        data["calibration"] = {"path": "calib.txt"}
    return data


def test_prune_then_quantize_parses():
    recipe = parse_recipe(
        _with_prune({"criterion": "taylor", "heads": {"ratio": 0.25}, "ffn": {"keep": 1024}})
    )
    prune, quantize = recipe.stages
    assert (prune.type, quantize.type) == ("prune", "quantize")
    assert (prune.criterion, prune.heads.unit, prune.heads.ratio) == ("taylor", "query", 0.25)
    assert (prune.ffn.keep, prune.ffn.multiple_of) == (1024, 1)
    assert parse_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe


@pytest.mark.parametrize(
    ("prune", "field", "message"),
    [
        ({"ffn": {"keep": 100, "ratio": 0.1}}, "stages[0].ffn", "exactly one of keep, ratio"),
        ({"ffn": {}}, "stages[0].ffn", "exactly one of keep, ratio"),
        ({"ffn": {"ratio": 1.0}}, "stages[0].ffn.ratio", "less than 1"),
        ({"ffn": {"keep": 0}}, "stages[0].ffn.keep", "greater than 0"),
        ({"ffn": {"keep": 100, "multiple_of": 64}}, "stages[0].ffn", "not a multiple of"),
        ({"heads": {"keep": 0}}, "stages[0].heads.keep", "greater than 0"),
        ({"heads": {"unit": "head", "keep": 4}}, "stages[0].heads.unit", "'query' or 'kv_group'"),
        ({"layers": {"indices": [2, 2]}}, "stages[0].layers", "listed twice"),
        ({"criterion": "random", "ffn": {"ratio": 0.1}}, "stages[0].criterion", "magnitude"),
        ({}, "stages[0]", "at least one target"),
    ],
)
def test_bad_prune_targets_name_the_field(tmp_path, prune, field, message):
    error = load_error(write_recipe(tmp_path, _with_prune(prune)))
    line = next(line for line in error.splitlines() if line.strip().startswith(field))
    assert message in line


def test_prune_after_quantize_is_refused(tmp_path):
    error = load_error(
        write_recipe(tmp_path, _with_prune({"ffn": {"ratio": 0.1}}, after_quantize=True))
    )
    assert "stages[1] prune after a quantize stage (stages[0])" in error


@pytest.mark.parametrize(
    ("prune", "needs"),
    [
        ({"criterion": "activation", "ffn": {"ratio": 0.1}}, True),
        ({"criterion": "taylor", "heads": {"ratio": 0.3}}, True),
        ({"criterion": "magnitude", "layers": {"remove": 2}}, True),  # layer scores need data
        ({"criterion": "magnitude", "ffn": {"ratio": 0.1}}, False),
        ({"criterion": "activation", "layers": {"indices": [3]}}, False),  # nothing scored
    ],
)
def test_calibration_is_required_exactly_when_scores_need_data(tmp_path, prune, needs):
    data = _with_prune(prune, calibration=False)
    if needs:
        assert "stages[0] (prune) need a `calibration` section" in load_error(
            write_recipe(tmp_path, data)
        )
    else:
        assert parse_recipe(data).calibration is None


# --- the distill stage ---


def _prune_distill_quantize(distill: dict[str, Any], quantize: dict[str, Any] | None = None):
    data = valid_recipe()
    data["calibration"] = {"path": "calib.txt"}
    data["stages"] = [
        {"type": "prune", "ffn": {"ratio": 0.25}},
        {"type": "distill", **distill},
        {"type": "quantize", "bits": 4, "group_size": 64, "symmetric": False, **(quantize or {})},
    ]
    return data


def test_prune_distill_quantize_parses():
    qat = {"bits": 4, "group_size": 64, "symmetric": False}
    recipe = parse_recipe(_prune_distill_quantize({"steps": 100, "qat": qat}))
    distill = recipe.stages[1]
    assert (distill.type, distill.temperature, distill.alpha) == ("distill", 2.0, 0.7)
    assert distill.qat.group_size == 64
    assert parse_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe


@pytest.mark.parametrize(
    ("distill", "field", "message"),
    [
        ({"steps": 0}, "stages[1].steps", "greater than 0"),
        ({"tokens": 0}, "stages[1].tokens", "greater than 0"),
        ({}, "stages[1]", "exactly one of steps, tokens"),
        ({"steps": 5, "tokens": 500}, "stages[1]", "exactly one of steps, tokens"),
        ({"steps": 5, "alpha": 1.5}, "stages[1].alpha", "less than or equal to 1"),
        (
            {"steps": 5, "hidden": {"layers": [1, 2], "teacher_layers": [1]}},
            "stages[1].hidden",
            "one teacher layer per student layer",
        ),
    ],
)
def test_bad_distill_settings_name_the_field(tmp_path, distill, field, message):
    error = load_error(write_recipe(tmp_path, _prune_distill_quantize(distill)))
    line = next(line for line in error.splitlines() if line.strip().startswith(field))
    assert message in line


def test_qat_must_match_the_quantize_stage(tmp_path):
    qat = {"bits": 4, "group_size": 32, "symmetric": False}
    error = load_error(write_recipe(tmp_path, _prune_distill_quantize({"steps": 5, "qat": qat})))
    assert "stages[1].qat must fake-quantize exactly as the next quantize stage" in error
    assert "group_size 32 vs 64" in error


def test_distill_after_quantize_is_refused(tmp_path):
    data = _prune_distill_quantize({"steps": 5})
    data["stages"] = [data["stages"][2], data["stages"][1]]
    assert "stages[1] distill after a quantize stage (stages[0])" in load_error(
        write_recipe(tmp_path, data)
    )
