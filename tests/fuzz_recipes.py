"""A seeded generator of malformed recipe files (tests/unit/test_recipe_fuzz.py runs them).

`mutations(base, seed=...)` takes a valid recipe (a dict) and yields `Case`s: the bytes of a
recipe file that `compress check` must refuse with exit code 2 and one error, and what that
error must name: a field path (`stages[0].group_size`) or, for a file that is not a recipe
document at all, a reason (`not UTF-8 text`). Cases are bytes so that encodings, duplicate
keys, alias bombs and oversized files travel the same path as a wrong type.

The generator knows the schema only through the small tables below (which leaves may be null,
which values are out of range, which are text), written from the documented rules rather
than read from the pydantic models: a bound the models forget is then a test failure, not a
case quietly left out.

Cases marked `pre_model` are refused by the checks `compress check` makes after the schema
and before the model's weights load (paths that do not exist, text too short, a group size
that does not divide the model's layers); they need the local files the base names.
"""

from __future__ import annotations

import codecs
import copy
import itertools
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Loc = tuple[int | str, ...]

HUGE_INT = 10**18
TOO_LONG_TEXT = "x" * 5000  # above PATH_MAX
LONE_SURROGATE = "SURROGATE-PLACEHOLDER-5e1f"  # replaced by a YAML "\ud800" escape when dumped
MAX_RECIPE_BYTES = 1 << 20


@dataclass(frozen=True)
class Case:
    kind: str  # the mutation kind (a row of the summary)
    name: str  # unique and readable: the case's id in failure messages
    data: bytes  # the recipe file
    expect: str  # a field path, or a reason phrase when `is_field` is False
    is_field: bool = True
    pre_model: bool = False  # refused by a check after the schema, before the model loads


def names_expected(message: str, case: Case) -> bool:
    """Whether the error names what the case expects: the field path as a whole path (not as
    the tail of a longer one; `stages[0]` is named by `stages[0].bits`), or the reason."""
    if not case.is_field:
        return case.expect in message
    pattern = r"(?<![\w.\]])" + re.escape(case.expect) + r"(?![\w])"
    return re.search(pattern, message) is not None


# --------------------------------------------------------------------------- the schema tables
# Keys are generalized paths: list indices become `[]`, gate.budgets' task names `*`.


@dataclass(frozen=True)
class Spec:
    invalid: tuple[Any, ...] = ()  # values of the leaf's own type that must be refused
    nullable: bool = False  # null is a valid value (or is refused elsewhere: see null_expect)
    null_expect: str | None = None  # null is refused, but the error names this (general) path
    text: bool = False  # a path, source, name or pattern: non-empty, no NUL, < 4096 chars


def _ints(*values: int) -> Spec:
    return Spec(invalid=values)


_COUNT = (-1, 0, 65_537, HUGE_INT)  # batch sizes, windows, blocks: 1 ..= 65,536
_TOKENS = (-1, 0, (1 << 20) + 1, HUGE_INT)  # seq_len, samples: 1 ..= 1,048,576
_SEED = (-1, 2**32, HUGE_INT)  # 0 ..= 2**32 - 1
_STEPS = (-1, 0, 10_000_001, HUGE_INT)
_GROUP = (0, -2, -64, 6, 7, 1 << 21, HUGE_INT)  # -1, or a positive group filling int32 words

SPECS: dict[str, Spec] = {
    "model.source": Spec(text=True),
    "model.revision": Spec(text=True, nullable=True),
    "dtype": Spec(invalid=("fp8", "BFLOAT16", "bf16", "")),
    "calibration": Spec(nullable=True, null_expect="calibration"),
    "calibration.path": Spec(text=True),
    "calibration.num_samples": _ints(*_TOKENS),
    "calibration.seq_len": _ints(*_TOKENS),
    "calibration.seed": _ints(*_SEED),
    "calibration.batch_size": _ints(*_COUNT),
    "calibration.device": Spec(
        invalid=("gpu", "cuda:", "cuda:x", "CPU", "", "cuda:999", "cuda:0001", "cuda:" + "9" * 20)
    ),
    "stages[].method": Spec(invalid=("awq", "GPTQ", "")),
    "stages[].bits": _ints(0, 2, 3, 16, -4),
    "stages[].group_size": _ints(*_GROUP),
    "stages[].observer": Spec(invalid=("max", "")),
    "stages[].include": Spec(nullable=True),
    "stages[].include[]": Spec(text=True),
    "stages[].exclude[]": Spec(text=True),
    "stages[].gptq": Spec(nullable=True),
    "stages[].gptq.damp_percent": Spec(invalid=(-0.1, 0, 1.5, HUGE_INT)),
    "stages[].gptq.block_size": _ints(*_COUNT),
    # prune
    "stages[].criterion": Spec(invalid=("random", "")),
    "stages[].norm": _ints(0, 3, -1),
    "stages[].heads": Spec(nullable=True),
    "stages[].heads.unit": Spec(invalid=("head", "")),
    "stages[].heads.keep": Spec(
        invalid=(0, -1, 65_537, HUGE_INT), nullable=True, null_expect="stages[].heads"
    ),
    "stages[].ffn": Spec(nullable=True),
    "stages[].ffn.ratio": Spec(
        invalid=(-0.1, 1.0, 1.5, 5), nullable=True, null_expect="stages[].ffn"
    ),
    "stages[].ffn.multiple_of": _ints(0, -1, 65_537, HUGE_INT),
    "stages[].layers": Spec(nullable=True),
    "stages[].layers.indices": Spec(nullable=True, null_expect="stages[].layers"),
    "stages[].layers.indices[]": _ints(-1, 65_536, HUGE_INT),
    "stages[].layers.criterion": Spec(invalid=("l2", "")),
    # distill
    "stages[].teacher": Spec(text=True, nullable=True),
    "stages[].temperature": Spec(invalid=(0, -1.0, 101.0, HUGE_INT)),
    "stages[].alpha": Spec(invalid=(-0.1, 1.1, 2)),
    "stages[].hidden": Spec(nullable=True),
    "stages[].hidden.layers[]": _ints(-1, 65_536, HUGE_INT),
    "stages[].hidden.teacher_layers": Spec(nullable=True),
    "stages[].hidden.teacher_layers[]": _ints(-1, 65_536, HUGE_INT),
    "stages[].hidden.loss": Spec(invalid=("l1", "")),
    "stages[].hidden.weight": Spec(invalid=(0, -1.0, 1001.0, HUGE_INT)),
    "stages[].synthetic": Spec(nullable=True),
    "stages[].synthetic.num_sequences": _ints(*_TOKENS),
    "stages[].synthetic.length": _ints(0, 1, -1, (1 << 20) + 1, HUGE_INT),
    "stages[].synthetic.temperature": Spec(invalid=(0, -1.0, 101.0)),
    "stages[].synthetic.batch_size": _ints(*_COUNT),
    "stages[].steps": Spec(invalid=_STEPS, nullable=True, null_expect="stages[]"),
    "stages[].batch_size": _ints(*_COUNT),
    "stages[].grad_accumulation": _ints(*_COUNT),
    "stages[].lr": Spec(invalid=(0, -1e-4, 2.0, HUGE_INT)),
    "stages[].weight_decay": Spec(invalid=(-0.1, 11.0)),
    "stages[].warmup_steps": _ints(-1, 10_000_001, HUGE_INT),
    "stages[].min_lr_ratio": Spec(invalid=(-0.1, 1.5)),
    "stages[].max_grad_norm": Spec(invalid=(0, -1.0, 1e7), nullable=True),
    "stages[].autocast": Spec(invalid=("fp16", "")),
    "stages[].seed": _ints(*_SEED),
    "stages[].device": Spec(invalid=("gpu", "cuda:", "", "cuda:128")),
    "stages[].teacher_device": Spec(invalid=("gpu", "auto", "", "cuda:" + "9" * 20), nullable=True),
    "stages[].checkpoint_every": _ints(*_STEPS),
    "stages[].qat": Spec(nullable=True),
    "stages[].qat.bits": _ints(0, 3, 16),
    "stages[].qat.group_size": _ints(*_GROUP),
    "stages[].qat.observer": Spec(invalid=("max",)),
    # eval
    "eval.tasks[].name": Spec(text=True),
    "eval.tasks[].limit": Spec(invalid=(-1, 0, (1 << 30) + 1, HUGE_INT), nullable=True),
    "eval.tasks[].num_fewshot": Spec(invalid=(-1, 1025, HUGE_INT), nullable=True),
    "eval.tasks[].metric": Spec(text=True, nullable=True),
    "eval.tasks[].max_gen_toks": Spec(invalid=_TOKENS, nullable=True),
    "eval.quality": Spec(nullable=True, null_expect="gate.quality"),
    "eval.quality.path": Spec(text=True),
    "eval.quality.seq_len": _ints(*_TOKENS),
    "eval.quality.max_windows": _ints(*_COUNT),
    "eval.batch_size": _ints(*_COUNT),
    "eval.seed": _ints(*_SEED),
    "eval.data_dir": Spec(text=True, nullable=True),
    # gate
    "gate.rule": Spec(invalid=("strict", "Point", "")),
    "gate.confidence": Spec(invalid=(0, 0.5, 1, 1.5, -0.95)),
    "gate.power": Spec(invalid=(0.5, 1.0, 2.0, -1)),
    "gate.budgets.*.max_drop": Spec(invalid=(-0.1, 1.01, 5, HUGE_INT)),
    "gate.budgets.*.rule": Spec(invalid=("strict", ""), nullable=True),
    "gate.quality": Spec(nullable=True),
    "gate.quality.max_kl_divergence": Spec(invalid=(0, -0.5), nullable=True),
    "gate.quality.max_perplexity_increase": Spec(invalid=(-0.1,), nullable=True),
    "gate.quality.min_top1_agreement": Spec(invalid=(0, 1.01, -0.5), nullable=True),
    "gate.quality.rule": Spec(invalid=("strict",), nullable=True),
    "output.dir": Spec(text=True),
}

# Keys whose removal must be refused, and the field the error names.
REQUIRED: dict[str, str] = {
    "version": "version",
    "name": "name",
    "model": "model",
    "model.source": "model.source",
    "stages": "stages",
    "eval": "eval",
    "eval.tasks": "eval.tasks",
    "eval.tasks[].name": "eval.tasks[]",
    "eval.quality": "gate.quality",  # a quality budget needs the held-out text
    "eval.quality.path": "eval.quality.path",
    "calibration": "calibration",  # gptq and data-driven pruning need it
    "calibration.path": "calibration.path",
    "gate": "gate",
    "gate.budgets.*.max_drop": "gate.budgets.*.max_drop",
    "stages[].type": "stages[]",  # the discriminator
    "stages[].bits": "stages[].bits",
    "stages[].method": "stages[].gptq",  # gptq options without method gptq
    "stages[].steps": "stages[]",  # a distill stage needs steps or tokens
    "stages[].heads.keep": "stages[].heads",
    "stages[].ffn.ratio": "stages[].ffn",
    "stages[].layers.indices": "stages[].layers",
    "stages[].hidden.layers": "stages[].hidden.layers",
    "stages[].qat.bits": "stages[].qat.bits",
    "stages[].qat.group_size": "stages[].qat.group_size",
}


def generalize(loc: Loc) -> str:
    """`('stages', 0, 'bits')` → `stages[].bits`; gate.budgets' task names → `*`."""
    parts: list[int | str] = list(loc)
    if len(parts) > 2 and parts[:2] == ["gate", "budgets"]:
        parts[2] = "*"
    return dotted(tuple(-1 if isinstance(p, int) else p for p in parts))


def dotted(loc: Loc) -> str:
    """`('stages', 0, 'bits')` → `stages[0].bits` (-1 → `[]`), as recipe errors write paths."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += "[]" if part < 0 else f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _fill(template: str, loc: Loc) -> str:
    """A generalized path (`stages[].ffn`) with its `[]` and `*` filled in from `loc`."""
    indices = iter(str(part) for part in loc if isinstance(part, int))
    task = str(loc[2]) if len(loc) > 2 and loc[:2] == ("gate", "budgets") else "*"
    return re.sub(r"\[\]|\*", lambda m: f"[{next(indices)}]" if m[0] == "[]" else task, template)


# --------------------------------------------------------------------------- document helpers


def dump(data: Any) -> bytes:
    """YAML bytes as a person would write them (placeholders become escapes YAML allows)."""
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=4096)
    text = re.sub(r"'?" + LONE_SURROGATE + r"'?", lambda _: '"lone \\ud800 surrogate"', text)
    return text.encode("utf-8")


def leaves_and_nodes(data: Any, loc: Loc = ()) -> Iterator[tuple[Loc, Any]]:
    """Every (location, value) below the root, parents before children."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield (*loc, key), value
            yield from leaves_and_nodes(value, (*loc, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield (*loc, index), value
            yield from leaves_and_nodes(value, (*loc, index))


def _replaced(base: dict, loc: Loc, value: Any) -> dict:
    data = copy.deepcopy(base)
    target: Any = data
    for part in loc[:-1]:
        target = target[part]
    target[loc[-1]] = value
    return data


def _deleted(base: dict, loc: Loc) -> dict:
    data = copy.deepcopy(base)
    target: Any = data
    for part in loc[:-1]:
        target = target[part]
    del target[loc[-1]]
    return data


def _renamed(base: dict, loc: Loc, new_key: str) -> dict:
    """The key at `loc` renamed in place (order kept)."""
    data = copy.deepcopy(base)
    parent: Any = data
    for part in loc[:-1]:
        parent = parent[part]
    items = [(new_key if k == loc[-1] else k, v) for k, v in parent.items()]
    parent.clear()
    parent.update(items)
    return data


def _typo(key: str, rng: random.Random) -> str:
    """A plausible misspelling: two neighbouring letters swapped, or one dropped or doubled."""
    if len(key) < 3:
        return key + key[-1]
    i = rng.randrange(len(key) - 1)
    options = [
        key[:i] + key[i + 1] + key[i] + key[i + 2 :],
        key[:i] + key[i + 1 :],
        key[: i + 1] + key[i] + key[i + 1 :],
    ]
    candidates = [o for o in options if o != key]
    return rng.choice(candidates)


# --------------------------------------------------------------------------- the mutations


def _type_swaps(value: Any, spec: Spec) -> list[tuple[str, Any]]:
    """(label, value) of every other type, skipping the ones the field takes (an int where a
    float is expected, null where null is allowed)."""
    if isinstance(value, bool):
        swaps = [("int", 1), ("float", 1.5), ("str", "true"), ("list", [value]), ("dict", {})]
    elif isinstance(value, int):
        swaps = [
            ("bool", True),
            ("float", 1.5),
            ("integral-float", float(value)),
            ("numeric-str", str(value)),
            ("list", [value]),
            ("dict", {"value": value}),
        ]
    elif isinstance(value, float):
        swaps = [("bool", False), ("numeric-str", str(value)), ("list", [value]), ("dict", {})]
    elif isinstance(value, str):
        swaps = [("bool", True), ("int", 5), ("float", 1.5), ("list", [value]), ("dict", {})]
    elif isinstance(value, list):
        swaps = [("bool", True), ("int", 1), ("str", "x"), ("dict", {"k": "v"})]
    else:  # a section
        swaps = [("bool", True), ("int", 1), ("str", "x"), ("list", [value])]
    if not spec.nullable or spec.null_expect is not None:
        swaps.append(("null", None))
    return swaps


def _leaf_mutations(base: dict) -> Iterator[Case]:
    for loc, value in leaves_and_nodes(base):
        where = dotted(loc)
        key = generalize(loc)
        spec = SPECS.get(key, Spec())
        if key in ("version", "name"):
            continue  # their own kinds
        if loc[-1] == "type" and len(loc) == 3 and loc[0] == "stages":
            continue  # the discriminator: its own kind below
        for label, swapped in _type_swaps(value, spec):
            expect = where
            if swapped is None and spec.null_expect is not None:
                expect = _fill(spec.null_expect, loc)  # a one-of pair, or a needed section
            yield Case("type-swap", f"{where}={label}", dump(_replaced(base, loc, swapped)), expect)
        for bad in spec.invalid:
            kind = "out-of-range" if isinstance(bad, int | float) else "bad-choice"
            yield Case(kind, f"{where}={bad!r}", dump(_replaced(base, loc, bad)), where)
        if isinstance(value, float):
            for label, bad in (
                ("inf", float("inf")),
                ("-inf", float("-inf")),
                ("nan", float("nan")),
            ):
                yield Case("non-finite", f"{where}={label}", dump(_replaced(base, loc, bad)), where)
        if spec.text:
            for label, bad in (
                ("empty", ""),
                ("nul", "a\x00b"),
                ("surrogate", LONE_SURROGATE),
                ("too-long", TOO_LONG_TEXT),
            ):
                yield Case("bad-text", f"{where}={label}", dump(_replaced(base, loc, bad)), where)


def _structure_mutations(base: dict, rng: random.Random) -> Iterator[Case]:
    sections: list[Loc] = [(), *(loc for loc, v in leaves_and_nodes(base) if isinstance(v, dict))]
    for loc in sections:
        parent = dotted(loc)
        if loc == ("gate", "budgets"):
            # Keys here are task names: an unknown one is a task eval.tasks does not run.
            data = _replaced(base, (*loc, "arc_easy"), {"max_drop": 0.1})
            yield Case("unknown-key", "gate.budgets.arc_easy", dump(data), "gate.budgets")
            continue
        key = "zz_unknown"
        data = _replaced(base, (*loc, key), 1) if loc else {**copy.deepcopy(base), key: 1}
        where = f"{parent}.{key}" if parent else key
        yield Case("unknown-key", where, dump(data), where)
    many = {**copy.deepcopy(base), **{f"zz_unknown_{i}": i for i in range(2_000)}}
    yield Case("unknown-key", "2000-unknown-keys", dump(many), "zz_unknown_0")
    for loc, _ in leaves_and_nodes(base):
        if not isinstance(loc[-1], str):
            continue
        where = dotted(loc)
        typo = _typo(loc[-1], rng)
        renamed = dotted((*loc[:-1], typo))
        if loc[:2] == ("gate", "budgets") and len(loc) == 3:
            expect = "gate.budgets"  # a misspelt task name
        elif loc[-1] == "type" and loc[0] == "stages":
            expect = dotted(loc[:-1])  # no tag: the stage cannot be told
        else:
            expect = renamed
        yield Case("typo-key", f"{where}->{typo}", dump(_renamed(base, loc, typo)), expect)
        key = generalize(loc)
        if key == "stages[].method" and "gptq" not in base["stages"][loc[1]]:
            continue  # only required as "gptq" where gptq options are set
        if key in REQUIRED:
            expect = _fill(REQUIRED[key], loc)
            yield Case("missing-key", f"-{where}", dump(_deleted(base, loc)), expect)


def _discriminator_mutations(base: dict) -> Iterator[Case]:
    # A tag pydantic quotes in its message: the error must stay short, and name the stage.
    data = _replaced(base, ("stages", 0, "type"), "q" * 500_000)
    yield Case("discriminator", "stages[0].type=500k-chars", dump(data), "stages[0]")
    for index, stage in enumerate(base["stages"]):
        for tag in ("sparsify", "Quantize", "", "prune", "distill", "quantize"):
            if tag == stage.get("type"):
                continue
            data = _replaced(base, ("stages", index, "type"), tag)
            yield Case(
                "discriminator", f"stages[{index}].type={tag!r}", dump(data), f"stages[{index}]"
            )
        for label, value in (("bool", True), ("int", 1), ("null", None), ("list", ["quantize"])):
            data = _replaced(base, ("stages", index, "type"), value)
            yield Case(
                "discriminator", f"stages[{index}].type={label}", dump(data), f"stages[{index}]"
            )
        for label, value in (("str", "quantize"), ("list", [stage]), ("null", None)):
            data = _replaced(base, ("stages", index), value)
            yield Case("discriminator", f"stages[{index}]={label}", dump(data), f"stages[{index}]")


def _version_mutations(base: dict) -> Iterator[Case]:
    for label, value in (
        ("true", True),
        ("false", False),
        ("2", 2),
        ("0", 0),
        ("-1", -1),
        ("str-1", "1"),
        ("float-1", 1.0),
        ("null", None),
        ("list", [1]),
        ("v1", "v1"),
    ):
        yield Case(
            "version", f"version={label}", dump(_replaced(base, ("version",), value)), "version"
        )


def _name_mutations(base: dict, rng: random.Random) -> Iterator[Case]:
    unicode_names = ["modèle-int4", "模型", "mödel", "naïve", "x\u200by", "e\u0301"]
    bad_names: list[tuple[str, Any]] = [
        ("101-chars", "a" * 101),
        ("300-chars", "a" * 300),
        ("slash", "org/name"),
        ("backslash", "org\\name"),
        ("dotdot", ".."),
        ("dotdot-slash", "../escape"),
        ("dot", "."),
        ("hidden", ".hidden"),
        ("dash-first", "-rf"),
        ("space", "has space"),
        ("newline", "name\n"),
        ("nul", "a\x00b"),
        ("empty", ""),
        ("unicode", rng.choice(unicode_names)),
        ("unicode-2", rng.choice(unicode_names)),
        ("int", 5),
        ("bool", True),
        ("null", None),
        ("list", ["name"]),
        ("surrogate", LONE_SURROGATE),
    ]
    for label, value in bad_names:
        yield Case("bad-name", f"name={label}", dump(_replaced(base, ("name",), value)), "name")


def _empty_list_mutations(base: dict) -> Iterator[Case]:
    for loc, value in leaves_and_nodes(base):
        key = generalize(loc)
        if isinstance(value, list) and value and key not in ("stages[].exclude",):
            where = dotted(loc)
            yield Case("empty-list", f"{where}=[]", dump(_replaced(base, loc, [])), where)


def _cross_field_mutations(base: dict) -> Iterator[Case]:
    yield Case(
        "cross-field",
        "duplicate-task",
        dump(
            _replaced(base, ("eval", "tasks"), [*base["eval"]["tasks"], base["eval"]["tasks"][0]])
        ),
        "eval.tasks",
    )
    if base["gate"].get("quality"):
        limits = dict.fromkeys(
            ("max_kl_divergence", "max_perplexity_increase", "min_top1_agreement")
        )
        data = _replaced(base, ("gate", "quality"), {**base["gate"]["quality"], **limits})
        yield Case("cross-field", "gate.quality-no-limit", dump(data), "gate.quality")
        data = _replaced(base, ("gate",), {**base["gate"], "budgets": {}, "quality": None})
        yield Case("cross-field", "gate-gates-nothing", dump(data), "gate")
    for index, stage in enumerate(base["stages"]):
        if stage.get("type") == "quantize" and stage.get("gptq") is not None:
            data = _replaced(base, ("stages", index, "method"), "rtn")
            yield Case(
                "cross-field",
                f"stages[{index}]-gptq-options-rtn",
                dump(data),
                f"stages[{index}].gptq",
            )
        if stage.get("type") == "distill":
            data = _replaced(base, ("stages", index, "tokens"), 100_000)
            yield Case(
                "cross-field", f"stages[{index}]-steps-and-tokens", dump(data), f"stages[{index}]"
            )
            if stage.get("qat"):
                qat = {**stage["qat"], "group_size": 64 if stage["qat"]["group_size"] != 64 else 32}
                data = _replaced(base, ("stages", index, "qat"), qat)
                yield Case(
                    "cross-field",
                    f"stages[{index}]-qat-mismatch",
                    dump(data),
                    f"stages[{index}].qat",
                )
                data = _replaced(base, ("stages",), base["stages"][: index + 1])
                yield Case(
                    "cross-field",
                    f"stages[{index}]-qat-no-quantize",
                    dump(data),
                    f"stages[{index}].qat",
                )
            hidden = stage.get("hidden")
            if hidden:
                pairs = {**hidden, "teacher_layers": [*hidden["layers"], 0]}
                data = _replaced(base, ("stages", index, "hidden"), pairs)
                yield Case(
                    "cross-field",
                    f"stages[{index}]-hidden-unpaired",
                    dump(data),
                    f"stages[{index}].hidden.teacher_layers",
                )
        if stage.get("type") == "prune":
            moved = [s for i, s in enumerate(base["stages"]) if i != index] + [stage]
            late = len(moved) - 1
            data = _replaced(base, ("stages",), moved)
            yield Case(
                "cross-field",
                f"stages[{index}]-prune-after-quantize",
                dump(data),
                f"stages[{late}]",
            )
            ffn = {"keep": 100, "multiple_of": 32}
            data = _replaced(base, ("stages", index, "ffn"), ffn)
            yield Case(
                "cross-field",
                f"stages[{index}]-ffn-keep-not-multiple",
                dump(data),
                f"stages[{index}].ffn.keep",
            )
            data = _replaced(base, ("stages", index, "layers"), {"indices": [1, 1]})
            yield Case(
                "cross-field",
                f"stages[{index}]-indices-twice",
                dump(data),
                f"stages[{index}].layers.indices",
            )
            data = _replaced(base, ("stages", index), {"type": "prune"})
            yield Case("cross-field", f"stages[{index}]-no-target", dump(data), f"stages[{index}]")
    budgets = dict(base["gate"]["budgets"])
    budgets["not_evaluated"] = {"max_drop": 0.1}
    data = _replaced(base, ("gate", "budgets"), budgets)
    yield Case("cross-field", "budget-for-unevaluated-task", dump(data), "gate.budgets")


def _key_type_mutations(base: dict) -> Iterator[Case]:
    budget = next(iter(base["gate"]["budgets"].values()))
    text = dump(base).decode()
    # A task name YAML reads as an int, and one it reads as a bool.
    data = _replaced(base, ("gate", "budgets"), {1: budget})
    yield Case("key-type", "gate.budgets-int-key", dump(data), "gate.budgets")
    data = _replaced(base, ("model",), {**base["model"], None: "x"})
    yield Case("key-type", "model-null-key", dump(data), "model")
    yield Case(
        "key-type", "top-level-on-key", (text + "on: 1\n").encode(), "is not a string", False
    )
    yield Case(
        "key-type", "top-level-float-key", (text + "1.5: x\n").encode(), "is not a string", False
    )


def _duplicate_key_mutations(base: dict) -> Iterator[Case]:
    """Each `key: scalar` line of the dumped recipe written twice, the copy right below."""
    lines = dump(base).decode().splitlines(keepends=True)
    entry = re.compile(r"^(?P<indent>\s*)(?P<dash>- )?(?P<key>[A-Za-z_][\w]*): (?P<value>\S.*)$")
    for number, line in enumerate(lines):
        match = entry.match(line.rstrip("\n"))
        if match is None:
            continue
        indent = match["indent"] + ("  " if match["dash"] else "")
        copy_line = f"{indent}{match['key']}: {match['value']}\n"
        text = "".join([*lines[: number + 1], copy_line, *lines[number + 1 :]])
        reason = f"duplicate key '{match['key']}'"
        yield Case(
            "duplicate-key", f"line-{number + 1}-{match['key']}", text.encode(), reason, False
        )
    text = "".join(lines)
    yield Case(
        "duplicate-key",
        "section-gate",
        (text + "gate: {budgets: {}}\n").encode(),
        "duplicate key 'gate'",
        False,
    )
    flow = text.replace("stages:\n", "stages:\n- {type: quantize, bits: 4, bits: 8}\n", 1)
    yield Case("duplicate-key", "flow-mapping", flow.encode(), "duplicate key 'bits'", False)


def _file_mutations(base: dict, rng: random.Random) -> Iterator[Case]:
    text = dump(base).decode()
    deep = "nested deeper than"
    # Nesting, written out and through aliases.
    yield Case(
        "deep-nesting",
        "flow-40",
        (text + "zz: " + "[" * 40 + "]" * 40 + "\n").encode(),
        deep,
        False,
    )
    yield Case(
        "deep-nesting",
        "flow-5000",
        (text + "zz: " + "[" * 5000 + "]" * 5000 + "\n").encode(),
        deep,
        False,
    )
    yield Case(
        "deep-nesting",
        "flow-100k-unclosed",
        (text + "zz: " + "[" * 100_000 + "\n").encode(),
        deep,
        False,
    )
    block = "".join(f"{'  ' * i}k{i}:\n" for i in range(40)) + f"{'  ' * 40}leaf: 1\n"
    yield Case("deep-nesting", "block-40", (text + block).encode(), deep, False)
    chain = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 40))
    yield Case("deep-nesting", "alias-chain-40", (chain + text).encode(), deep, False)
    yield Case(
        "deep-nesting",
        "alias-chain-in-name",
        (chain + text.replace("name: ", "name: *a39 #", 1)).encode(),
        deep,
        False,
    )
    yield Case("deep-nesting", "self-reference", (text + "zz: &r [*r]\n").encode(), deep, False)
    yield Case(
        "deep-nesting", "self-reference-map", (text + "zz: &m {k: *m}\n").encode(), deep, False
    )
    # Alias bombs: a few hundred bytes that mean billions of values.
    lol = 'l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
        f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)
    )
    many = "more than 100,000 values"
    yield Case("alias-bomb", "billion-laughs", (text + lol).encode(), many, False)
    yield Case(
        "alias-bomb",
        "billion-laughs-in-name",
        (lol + text.replace("name: ", "name: *l9 #", 1)).encode(),
        many,
        False,
    )
    wide = "w: &w [" + ",".join(["0"] * 1000) + "]\nww: [" + ",".join(["*w"] * 200) + "]\n"
    yield Case("alias-bomb", "wide-200k", (text + wide).encode(), many, False)
    maps = "m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}\n" + "".join(
        f"m{i}: &m{i} {{a: *m{i - 1}, b: *m{i - 1}, c: *m{i - 1}, d: *m{i - 1}, "
        f"e: *m{i - 1}, f: *m{i - 1}, g: *m{i - 1}, h: *m{i - 1}}}\n"
        for i in range(1, 9)
    )
    yield Case("alias-bomb", "mapping-laughs", (text + maps).encode(), many, False)
    # Size: refused before it is read (a 50 MB recipe used to parse for minutes).
    too_large = "larger than"
    pad = MAX_RECIPE_BYTES + 1 - len(text.encode()) - 3
    yield Case("oversized", "1MB+1", (text + "# " + "x" * pad + "\n").encode(), too_large, False)
    yield Case(
        "oversized",
        "5MB-list",
        (text + "zz: [" + "1, " * (5 << 19) + "]\n").encode(),
        too_large,
        False,
    )
    yield Case("oversized", "8MB-comment", (text + "#" * (8 << 20)).encode(), too_large, False)
    # Under 1 MB, but more values than PyYAML parses in a second (500,000 took 15 s).
    written = "more than 10,000 values"
    flow = text + "zz: [" + "1," * 400_000 + "1]\n"
    yield Case("oversized", "400k-flow-list", flow.encode(), written, False)
    keys = text + "".join(f"k{i}: {i}\n" for i in range(60_000))
    yield Case("oversized", "60k-keys", keys.encode(), written, False)
    # Encodings.
    utf8 = "not UTF-8 text"
    accented = "# recette: modèle quantifié\n" + text
    yield Case("encoding", "utf-16-bom", accented.encode("utf-16"), utf8, False)
    yield Case(
        "encoding", "utf-16-be-bom", codecs.BOM_UTF16_BE + accented.encode("utf-16-be"), utf8, False
    )
    yield Case("encoding", "utf-16-le-no-bom", accented.encode("utf-16-le"), utf8, False)
    yield Case("encoding", "utf-32", accented.encode("utf-32"), utf8, False)
    yield Case("encoding", "latin-1", accented.encode("latin-1"), utf8, False)
    yield Case("encoding", "cp1252", ("# “quoted”\n" + text).encode("cp1252"), utf8, False)
    yield Case("encoding", "overlong", text.encode() + b"# \xc0\xaf\n", utf8, False)
    yield Case("encoding", "truncated-sequence", text.encode() + b"# \xe2\x82\n", utf8, False)
    for i in range(3):
        noise = b"\xff" + rng.randbytes(256 + 256 * i)
        yield Case("encoding", f"random-bytes-{i}", noise, utf8, False)
    # Not a mapping at the top.
    mapping = "must be a mapping"
    for label, raw in (
        ("list", "- version: 1\n- name: x\n"),
        ("string", "just a string\n"),
        ("int", "42\n"),
        ("null", "~\n"),
        ("empty", ""),
        ("comment-only", "# nothing here\n"),
        ("document-marker-only", "---\n"),
        ("flow-list", "[]\n"),
    ):
        yield Case("top-level", label, raw.encode(), mapping, False)
    yield Case("top-level", "empty-mapping", b"{}\n", "version")
    # YAML that does not parse, or parses into something no recipe holds.
    invalid = "not valid YAML"
    for label, raw in (
        ("unclosed-flow", "version: 1\nstages: [unclosed\n"),
        ("tab-indent", "version: 1\n\tname: x\n"),
        ("bad-indent", "model:\n  source: x\n source: y\n"),
        ("two-documents", text + "---\n" + text),
        ("undefined-alias", text + "zz: *nowhere\n"),
        ("python-tag", text + "zz: !!python/object/apply:os.system ['true']\n"),
        ("control-char", text.replace("name: ", "name: \x01", 1)),
        ("unhashable-key", text + "? [a, b]\n: 1\n"),
        ("5000-digit-int", text + "zz: " + "9" * 5000 + "\n"),
        ("impossible-date", text.replace("name: ", "name: 2024-13-45 #", 1)),
    ):
        yield Case("yaml-syntax", label, raw.encode(), invalid, False)
    for label, replacement in (
        ("date", "name: 2024-01-01 #"),
        ("binary", "name: !!binary aGVsbG8= #"),
        ("set", "name: !!set {a, b} #"),
        ("timestamp", "name: 2024-01-01T10:00:00Z #"),
    ):
        yield Case(
            "yaml-type", f"name={label}", text.replace("name: ", replacement, 1).encode(), "name"
        )


def mutations(base: dict, *, seed: int = 0, within: str | None = None) -> Iterator[Case]:
    """Every schema- and file-level mutation of `base` (a valid recipe), the same for a seed.

    `within` (a top-level key) keeps only the cases whose error names a field under it: for a
    second base that differs from the first only there, the rest would be repeats."""
    rng = random.Random(seed)
    every = itertools.chain(
        _version_mutations(base),
        _name_mutations(base, rng),
        _leaf_mutations(base),
        _structure_mutations(base, rng),
        _discriminator_mutations(base),
        _empty_list_mutations(base),
        _cross_field_mutations(base),
        _key_type_mutations(base),
        _duplicate_key_mutations(base),
        _file_mutations(base, rng),
    )
    for case in every:
        if within is None or (case.is_field and re.match(rf"{within}\b", case.expect)):
            yield case


# -------------------------------------------------------------------- checks after the schema


def pre_model_mutations(base: dict, scratch: Path) -> Iterator[Case]:
    """Recipes the schema accepts and `compress check` must still refuse, before any model
    loads. `scratch` is a directory for the files some of them point at."""
    scratch.mkdir(parents=True, exist_ok=True)
    a_file = scratch / "a-file.txt"
    a_file.write_text("not a directory\n")
    latin1 = scratch / "latin1.txt"
    latin1.write_bytes(("Texte de calibration, modèle quantifié. " * 300).encode("latin-1"))
    short = scratch / "short.txt"
    short.write_text("Too short.\n")
    missing = scratch / "missing.txt"

    def case(name: str, expect: str, change: Callable[[dict], None]) -> Case:
        data = copy.deepcopy(base)
        change(data)
        return Case("pre-model", name, dump(data), expect, pre_model=True)

    def put(loc: Loc, value: Any) -> Callable[[dict], None]:
        def change(data: dict) -> None:
            target: Any = data
            for part in loc[:-1]:
                target = target[part]
            target[loc[-1]] = value

        return change

    yield case("output.dir-is-a-file", "output.dir", put(("output", "dir"), str(a_file)))
    yield case("output.dir-dev-null", "output.dir", put(("output", "dir"), "/dev/null"))
    yield case(
        "output.dir-under-a-file", "output.dir", put(("output", "dir"), str(a_file / "runs"))
    )
    yield case(
        "output.dir-in-proc", "output.dir", put(("output", "dir"), "/proc/compress-fuzz/runs")
    )
    yield case(
        "source-package-traversal", "model.source", put(("model", "source"), "package:../../x")
    )
    yield case(
        "source-package-escape",
        "model.source",
        put(("model", "source"), "package:json/../../../../etc/passwd"),
    )
    yield case(
        "source-missing-dir", "model.source", put(("model", "source"), str(scratch / "none"))
    )
    yield case(
        "source-hub-offline", "model.source", put(("model", "source"), "no-such-org/no-such-model")
    )
    yield case("source-not-a-model", "model.source", put(("model", "source"), str(scratch)))
    yield case(
        "calibration-missing", "calibration.path", put(("calibration", "path"), str(missing))
    )
    yield case("calibration-latin-1", "calibration.path", put(("calibration", "path"), str(latin1)))
    yield case("calibration-too-short", "calibration", put(("calibration", "path"), str(short)))
    yield case(
        "calibration-too-few-tokens",
        "calibration",
        put(("calibration", "num_samples"), 4096),
    )
    yield case("calibration-bad-hf-spec", "calibration.path", put(("calibration", "path"), "hf:x"))
    yield case(
        "calibration-cuda-absent", "calibration.device", put(("calibration", "device"), "cuda:7")
    )
    if base["eval"].get("quality"):
        yield case(
            "quality-missing", "eval.quality.path", put(("eval", "quality", "path"), str(missing))
        )
        yield case(
            "quality-latin-1", "eval.quality.path", put(("eval", "quality", "path"), str(latin1))
        )
        yield case(
            "quality-too-short", "eval.quality", put(("eval", "quality", "path"), str(short))
        )
        yield case("quality-one-window", "eval.quality", put(("eval", "quality", "seq_len"), 8192))
    quantize = next(i for i, s in enumerate(base["stages"]) if s["type"] == "quantize")
    for group in (48, 256, 8192):
        yield case(
            f"group_size-{group}-does-not-divide",
            f"stages[{quantize}].group_size",
            put(("stages", quantize, "group_size"), group),
        )
    gated = next(i for i, t in enumerate(base["eval"]["tasks"]) if t["name"] == "gsm8k")
    yield case(
        "limit-one-item", f"eval.tasks[{gated}].limit", put(("eval", "tasks", gated, "limit"), 1)
    )
    yield case(
        "data-dir-missing", "eval.data_dir", put(("eval", "data_dir"), str(scratch / "no-data"))
    )

    def rename_task(data: dict) -> None:
        data["eval"]["tasks"][0]["name"] = "mmlu_typo"
        data["gate"]["budgets"]["mmlu_typo"] = data["gate"]["budgets"].pop("mmlu")

    # `~user/...` for a user this machine does not have: Path.expanduser raises RuntimeError.
    nobody = "~no-such-user-fuzz/x"
    yield case("source-unknown-home", "model.source", put(("model", "source"), nobody))
    yield case("calibration-unknown-home", "calibration.path", put(("calibration", "path"), nobody))
    yield case("data-dir-unknown-home", "eval.data_dir", put(("eval", "data_dir"), nobody))
    if base["eval"].get("quality"):
        yield case(
            "quality-unknown-home", "eval.quality.path", put(("eval", "quality", "path"), nobody)
        )
    yield case("unknown-task", "eval.tasks", rename_task)
    yield case(
        "unknown-metric", "eval.tasks", put(("eval", "tasks", 0, "metric"), "no_such_metric")
    )
