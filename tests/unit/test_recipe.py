"""Recipes: parsing, round trip through YAML, fingerprints, and errors that name file and field."""

from __future__ import annotations

import codecs
import copy
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from compress.errors import EXIT_BAD_INPUT, BadInputError, RecipeError
from compress.recipe import MAX_RECIPE_BYTES, Recipe, dump_recipe, load_recipe, parse_recipe

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
    assert "\n  eval.tasks: " in message  # the list that holds the duplicate
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


# --- strict schema: no coercion, bounds, text ---


def _prune_recipe() -> dict[str, Any]:
    return _with_prune({"criterion": "magnitude", "norm": 2, "ffn": {"ratio": 0.25}})


STRICT_ERRORS = [
    # Literal[1] and Literal[4, 8] take True (True == 1) and 4.0 unless checked.
    pytest.param(valid_recipe, ("version",), True, "version", id="version-true"),
    pytest.param(valid_recipe, ("version",), "1", "version", id="version-str"),
    pytest.param(valid_recipe, ("version",), 1.0, "version", id="version-float"),
    pytest.param(valid_recipe, ("stages", 0, "bits"), True, "stages[0].bits", id="bits-true"),
    pytest.param(valid_recipe, ("stages", 0, "bits"), 4.0, "stages[0].bits", id="bits-float"),
    pytest.param(valid_recipe, ("stages", 0, "bits"), "4", "stages[0].bits", id="bits-str"),
    pytest.param(_prune_recipe, ("stages", 0, "norm"), True, "stages[0].norm", id="norm-true"),
    pytest.param(
        valid_recipe, ("stages", 0, "group_size"), "64", "stages[0].group_size", id="group-str"
    ),
    pytest.param(
        valid_recipe, ("stages", 0, "symmetric"), "no", "stages[0].symmetric", id="bool-str"
    ),
    pytest.param(
        valid_recipe, ("eval", "tasks", 0, "limit"), True, "eval.tasks[0].limit", id="limit-true"
    ),
    pytest.param(
        valid_recipe, ("eval", "tasks", 0, "limit"), 1.0, "eval.tasks[0].limit", id="limit-float"
    ),
    pytest.param(valid_recipe, ("name",), 5, "name", id="name-int"),
    pytest.param(valid_recipe, ("model", "source"), 5, "model.source", id="source-int"),
    pytest.param(
        valid_recipe,
        ("gate", "budgets", "mmlu", "max_drop"),
        float("inf"),
        "gate.budgets.mmlu.max_drop",
        id="drop-inf",
    ),
    pytest.param(
        valid_recipe,
        ("gate", "budgets", "mmlu", "max_drop"),
        float("nan"),
        "gate.budgets.mmlu.max_drop",
        id="drop-nan",
    ),
    pytest.param(
        valid_recipe,
        ("gate", "budgets", "mmlu", "max_drop"),
        "0.05",
        "gate.budgets.mmlu.max_drop",
        id="drop-str",
    ),
]


@pytest.mark.parametrize(("recipe", "path", "value", "field"), STRICT_ERRORS)
def test_values_are_taken_only_as_what_they_are(tmp_path, recipe, path, value, field):
    data = recipe()
    _set(path, value)(data)
    message = load_error(write_recipe(tmp_path, data))
    assert f"\n  {field}: " in message, message


def test_float_fields_take_ints():
    # YAML writes `max_drop: 0` and `temperature: 2` as ints; they are numbers all the same.
    data = valid_recipe()
    data["gate"]["budgets"]["mmlu"]["max_drop"] = 0
    assert parse_recipe(data).gate.budgets["mmlu"].max_drop == 0.0


def test_unsupported_version_says_which_is_supported():
    data = valid_recipe()
    data["version"] = 2
    with pytest.raises(
        RecipeError, match=r"\n  version: unsupported recipe version 2: .*`version: 1`"
    ):
        parse_recipe(data)


@pytest.mark.parametrize(
    ("path", "largest", "field"),
    [
        (("calibration", "seq_len"), 1 << 20, "calibration.seq_len"),
        (("calibration", "num_samples"), 1 << 20, "calibration.num_samples"),
        (("calibration", "seed"), 2**32 - 1, "calibration.seed"),
        (("eval", "batch_size"), 1 << 16, "eval.batch_size"),
        (("gate", "budgets", "mmlu", "max_drop"), 1, "gate.budgets.mmlu.max_drop"),
        (("gate", "sequential", "first"), 1 << 30, "gate.sequential.first"),
        (("stages", 0, "group_size"), 1 << 20, "stages[0].group_size"),
        (("stages", 0, "gptq", "block_size"), 1 << 16, "stages[0].gptq.block_size"),
    ],
)
def test_upper_bounds(path, largest, field):
    data = valid_recipe()
    data["calibration"] = {"path": "calib.txt"}
    data["gate"]["sequential"] = {}
    data["stages"][0] |= {"method": "gptq", "gptq": {}}
    _set(path, largest)(data)
    parse_recipe(data)
    _set(path, largest + 1)(data)
    with pytest.raises(RecipeError, match=rf"\n  {re.escape(field)}: .*less than or equal"):
        parse_recipe(data)


def test_seeds_are_what_numpy_takes():
    data = valid_recipe()
    data["eval"]["seed"] = -1  # np.random.seed(-1) fails after the model has loaded
    with pytest.raises(RecipeError, match=r"\n  eval\.seed: "):
        parse_recipe(data)


def test_name_is_a_short_directory_name():
    data = valid_recipe()
    data["name"] = "a" * 100
    assert parse_recipe(data).name == "a" * 100
    for name in ("a" * 101, "a" * 300, "../x", "..", "org/name", "modèle", ""):
        data["name"] = name
        with pytest.raises(RecipeError, match=r"\n  name: "):
            parse_recipe(data)


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("output", "dir"), "output.dir"),
        (("model", "source"), "model.source"),
        (("eval", "tasks", 0, "name"), "eval.tasks[0].name"),
        (("eval", "data_dir"), "eval.data_dir"),
        (("stages", 0, "exclude"), "stages[0].exclude[0]"),
    ],
)
@pytest.mark.parametrize("text", ["", "a\x00b", "x" * 5000], ids=["empty", "nul", "too-long"])
def test_text_fields_are_non_empty_text(path, field, text):
    data = valid_recipe()
    data.setdefault("output", {"dir": "runs"})
    _set(path, [text] if field.endswith("[0]") else text)(data)
    with pytest.raises(RecipeError, match=rf"\n  {re.escape(field)}: "):
        parse_recipe(data)


def test_empty_include_is_refused():
    data = valid_recipe()
    data["stages"][0]["include"] = []  # quantizes nothing; null is the default selection
    with pytest.raises(RecipeError, match=r"\n  stages\[0\]\.include: "):
        parse_recipe(data)


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("    1: {max_drop: 0.1}\n", "gate.budgets"),
        ("    on: {max_drop: 0.1}\n", "gate.budgets"),  # YAML 1.1 reads `on` as True
    ],
)
def test_mapping_keys_must_be_strings(tmp_path, yaml_text, field):
    text = yaml.safe_dump(valid_recipe(), sort_keys=False).replace(
        "  budgets:\n", "  budgets:\n" + yaml_text
    )
    message = load_error(write_recipe(tmp_path, text))
    assert f"\n  {field}: key " in message and "is not a string" in message, message


def test_cross_field_errors_name_the_field(tmp_path):
    data = valid_recipe()
    data["stages"][0]["gptq"] = {"damp_percent": 0.1}  # and method stays rtn
    assert "\n  stages[0].gptq: " in load_error(write_recipe(tmp_path, data))
    data = valid_recipe()
    data["gate"]["budgets"]["gsm8k"] = {"max_drop": 0.1}
    assert "\n  gate.budgets: " in load_error(write_recipe(tmp_path, data))
    qat = {"bits": 4, "group_size": 32, "symmetric": False}
    data = _prune_distill_quantize({"steps": 5, "qat": qat})
    assert "\n  stages[1].qat: " in load_error(write_recipe(tmp_path, data))


def test_configs_built_in_python_still_validate():
    """Strict mode keeps the ways other code builds configs working."""
    from compress.distill.config import DistillConfig
    from compress.recipe import EvalConfig, GateConfig, TaskConfig

    task = TaskConfig(name="mmlu", limit=None, num_fewshot=None)
    assert TaskConfig.model_validate_json(task.model_dump_json()) == task
    assert EvalConfig(tasks=[task]).tasks == [task]
    gate = parse_recipe(valid_recipe()).gate
    # What `compress gate` re-reads from a report (JSON: every number a float or an int).
    assert GateConfig.model_validate(json.loads(json.dumps(gate.model_dump(mode="json")))) == gate
    distill = parse_recipe(_prune_distill_quantize({"steps": 5})).stages[1]
    assert DistillConfig.model_validate(distill.model_dump(mode="json")) == distill


def test_every_config_model_is_strict():
    from compress import recipe as recipe_module
    from compress.distill import config as distill_config
    from compress.prune import config as prune_config
    from compress.quant import config as quant_config
    from compress.schema import StrictConfig

    for module in (recipe_module, distill_config, prune_config, quant_config):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseModel) and value is not BaseModel:
                assert issubclass(value, StrictConfig), value


# --- loading: the file itself ---


def test_recipe_of_exactly_the_size_limit_loads(tmp_path):
    text = yaml.safe_dump(valid_recipe())
    padding = MAX_RECIPE_BYTES - len(text.encode()) - 2
    path = write_recipe(tmp_path, text + "#" + "x" * padding + "\n")
    assert path.stat().st_size == MAX_RECIPE_BYTES
    assert load_recipe(path) == parse_recipe(valid_recipe())


def test_oversized_recipe_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"a: [" + b"1, " * (20 << 20) + b"]\n")  # ~60 MB: minutes to parse
    start = time.perf_counter()
    message = load_error(path)
    assert time.perf_counter() - start < 1
    assert "huge.yaml" in message and "larger than" in message


@pytest.mark.parametrize(
    "encode",
    [
        lambda t: t.encode("utf-16"),
        lambda t: t.encode("utf-16-le"),
        lambda t: ("# modèle\n" + t).encode("latin-1"),
        lambda t: b"\xff\xfe\x00garbage" + t.encode(),
    ],
    ids=["utf-16-bom", "utf-16-no-bom", "latin-1", "random"],
)
def test_not_utf8_is_refused(tmp_path, encode):
    path = tmp_path / "my-recipe.yaml"
    path.write_bytes(encode(yaml.safe_dump(valid_recipe())))
    message = load_error(path)
    assert message.startswith(f"{path}: not UTF-8 text"), message


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "my-recipe.yaml"
    path.write_bytes(codecs.BOM_UTF8 + yaml.safe_dump(valid_recipe()).encode())
    assert load_recipe(path) == parse_recipe(valid_recipe())


def test_yaml_errors_give_the_line(tmp_path):
    message = load_error(write_recipe(tmp_path, "version: 1\nname: x\nstages: [unclosed\n"))
    assert "my-recipe.yaml: not valid YAML at line 4" in message


@pytest.mark.parametrize(
    ("text", "key", "line", "first"),
    [
        ("version: 1\nname: a\nname: b\n", "'name'", 3, 2),
        ("version: 1\nmodel:\n  source: a\n  source: b\n", "'source'", 4, 3),
        ("stages:\n- {type: quantize, bits: 4, bits: 8}\n", "'bits'", 2, 2),
    ],
    ids=["top", "nested", "flow"],
)
def test_duplicate_keys_are_refused_with_their_line(tmp_path, text, key, line, first):
    message = load_error(write_recipe(tmp_path, text))
    assert f"not valid YAML at line {line}, " in message
    assert f"duplicate key {key} (first at line {first})" in message


def test_anchors_and_merge_keys_still_work(tmp_path):
    text = yaml.safe_dump(valid_recipe(), sort_keys=False) + ("output: &out {dir: runs}\n")
    text = text.replace("stages:\n", "stages:\n- &q {type: quantize, bits: 8}\n", 1)
    # A merged key overridden by an explicit one is YAML's merge, not a duplicate.
    text = text.replace("- bits: 4\n", "- <<: *q\n  bits: 4\n", 1)
    recipe = load_recipe(write_recipe(tmp_path, text))
    assert [s.bits for s in recipe.stages] == [8, 4]


@pytest.mark.parametrize(
    "extra",
    [
        "zz: " + "[" * 5000 + "]" * 5000 + "\n",  # a RecursionError in PyYAML's composer
        "".join(f"{'  ' * i}k{i}:\n" for i in range(40)) + "  " * 40 + "leaf: 1\n",
        "zz: &r [*r]\n",  # refers to itself: infinitely deep once walked
        "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 40)),
    ],
    ids=["flow-5000", "block-40", "self-reference", "alias-chain"],
)
def test_deep_nesting_is_refused(tmp_path, extra):
    message = load_error(write_recipe(tmp_path, yaml.safe_dump(valid_recipe()) + extra))
    assert "my-recipe.yaml" in message and "nested deeper than 32 levels" in message


def test_alias_bomb_is_refused_at_once(tmp_path):
    lol = 'l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
        f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)
    )
    text = yaml.safe_dump(valid_recipe()).replace("name: ", "name: *l9 #")
    start = time.perf_counter()
    message = load_error(write_recipe(tmp_path, lol + text))
    assert time.perf_counter() - start < 1
    assert "more than 100,000 values" in message


def test_too_many_values_are_refused_as_they_are_read(tmp_path):
    text = yaml.safe_dump(valid_recipe()) + "zz: [" + "1," * 400_000 + "1]\n"  # < 1 MB
    start = time.perf_counter()
    message = load_error(write_recipe(tmp_path, text))
    assert time.perf_counter() - start < 2  # parsing all of it takes ~12 s
    assert "not valid YAML at line " in message and "more than 10,000 values" in message


def test_recursion_anywhere_is_a_recipe_error(monkeypatch):
    def recurse(data: Any) -> Recipe:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(Recipe, "model_validate", recurse)
    with pytest.raises(RecipeError, match="nested too deeply"):
        parse_recipe(valid_recipe(), "r.yaml")


def test_unreadable_file(tmp_path, monkeypatch):
    path = write_recipe(tmp_path, valid_recipe())

    def denied(self: Path, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")  # chmod 0 does not stop root

    monkeypatch.setattr(Path, "open", denied)
    message = load_error(path)
    assert message == f"{path}: cannot read the recipe: Permission denied"


def test_a_directory_is_not_a_recipe(tmp_path):
    message = load_error(tmp_path)
    assert str(tmp_path) in message and "is a directory" in message


@pytest.mark.parametrize("value", ["2024-13-45", "9" * 5000], ids=["bad-date", "5000-digits"])
def test_values_yaml_cannot_construct(tmp_path, value):
    text = yaml.safe_dump(valid_recipe()).replace("name: test-int4-g64", f"name: {value}")
    message = load_error(write_recipe(tmp_path, text))
    assert "my-recipe.yaml: not valid YAML at line " in message and "cannot read" in message


def test_error_report_stays_short():
    data = valid_recipe() | {f"unknown_{i}": i for i in range(1000)}
    data["stages"][0]["type"] = "q" * 100_000  # pydantic quotes a tag it does not know
    with pytest.raises(RecipeError) as excinfo:
        parse_recipe(data, "r.yaml")
    lines = str(excinfo.value).splitlines()
    assert lines[0] == "r.yaml: invalid recipe" and lines[-1] == "  ... and 981 more"
    assert len(lines) == 22 and max(len(line) for line in lines) < 400
