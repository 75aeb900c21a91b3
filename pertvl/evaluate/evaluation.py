"""What an evaluation declares to take part in `pertvl eval`, `pertvl ablate`, `pertvl demo` and the
reports: a row of pertvl.evaluate.catalog (`Evaluation`) and a Result type that carries its schema,
JSON, Markdown, flat metrics and headline. Imports nothing heavy (the CLI parser is built from it)."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["Evaluation", "Finetune", "JsonResult", "MetricInfo", "Result", "Suite", "add_bootstrap_arguments", "from_json",
           "non_negative", "to_json"]


class Suite(enum.Enum):
    """The pipelines an evaluation is part of by default."""

    DEMO = "demo"  # `pertvl demo`: a stage eval-NAME on the test split, a section in the report
    ABLATE = "ablate"  # `pertvl ablate`: every run is evaluated, its metrics are table columns


@dataclass(frozen=True)
class MetricInfo:
    """How the comparison table shows one flat metric: its column label, shown ×100 (`percent`) or with
    three decimals, sort `order` within its evaluation, `chance` level, whether it is a `summary`
    column, and the flat keys (low, high) of its 95 % CI bounds."""

    label: str
    percent: bool = True
    order: tuple = ()
    chance: float | None = None
    summary: bool = False
    ci: tuple[str, str] | None = None


@runtime_checkable
class Result(Protocol):
    """The output of an evaluation (a dataclass in each evaluation module)."""

    schema: str  # "pertvl-NAME/VERSION", the JSON's "schema"
    info: dict[str, Any]  # provenance; `pertvl eval` adds the encoder, version, command, inputs

    def to_json(self) -> dict[str, Any]: ...

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Result: ...

    def markdown(self, name: str) -> str:
        """NAME.md: a titled table."""

    def figures(self, out_dir: Path, name: str) -> dict[str, Path]:
        """Extra files beside NAME.json / NAME.md ({"png": path}); {} for none."""

    def metrics(self) -> dict[str, float | None]:
        """Flat "KEY/metric" -> value (KEY = the evaluation's key); the comparison table's cells."""

    @classmethod
    def metric_info(cls, key: str) -> MetricInfo:
        """Label, unit and order of a flat metric key this result type writes."""

    def headline(self) -> str:
        """One line for the console ("structure accuracy 61.0% (chance 12.5%) over 40 images")."""


class JsonResult:
    """A Result dataclass whose JSON is its fields (`to_json` below), read back when its "schema" is one
    of SCHEMAS ("not a pertvl WHAT result" otherwise); no figures unless it says."""

    SCHEMAS: tuple[str, ...] = ()
    WHAT = ""

    def to_json(self) -> dict[str, Any]:
        return to_json(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Any:
        if not isinstance(d, Mapping) or d.get("schema") not in cls.SCHEMAS:
            raise ValueError(f"not a pertvl {cls.WHAT} result: schema "
                             f"{d.get('schema') if isinstance(d, Mapping) else d!r}")
        return from_json(cls, d)

    def figures(self, out_dir: Path, name: str) -> dict[str, Path]:
        return {}


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: `pertvl eval NAME` with its help texts and own arguments; run(encoder, data,
    options) -> Result. `key` is the file stem and metric prefix (default: name with "_"). `shards`:
    the data are shard samples (--shards/--split/--limit added; a `load` returning None means "read
    the shards"), else the evaluation's own `load(options)`. `text_only`: --text-model is accepted."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Any, Any, argparse.Namespace], Result]
    result_type: type
    schemas: tuple[str, ...]
    title: str
    key: str = ""
    shards: bool = True
    load: Callable[[argparse.Namespace], Any] | None = None
    text_only: bool = False
    suites: frozenset[Suite] = frozenset()

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.name.replace("-", "_"))

    def options(self) -> set[str]:
        """The option strings its own arguments define ("--bootstrap", ...)."""
        p = argparse.ArgumentParser(add_help=False)
        self.add_arguments(p)
        return {s for a in p._actions for s in a.option_strings}


@dataclass(frozen=True)
class Finetune:
    """A downstream fine-tune (`pertvl finetune NAME`) whose KEY.json the comparison table reads like an
    evaluation's result."""

    name: str
    key: str
    title: str
    result_type: type
    schemas: tuple[str, ...]


def non_negative(text: str) -> int:
    """argparse type: an integer >= 0 (bootstrap resamples)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def add_bootstrap_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", type=non_negative, default=1000,
                   help="bootstrap resamples for the 95%% CIs, 0 to skip (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def add_chexpert_image_arguments(p: Any) -> None:
    """--blank, --frontal-only / --all-views and --image-size of a CheXpert CSV's cells and images."""
    from pertvl.cli import positive_int

    p.add_argument("--blank", choices=["zero", "mask"], default="zero",
                   help="blank label cells: negatives, or left out of the loss and the scores (default zero)")
    views = p.add_mutually_exclusive_group()
    views.add_argument("--frontal-only", dest="frontal_only", action="store_true", default=True,
                       help="use frontal views only (default)")
    views.add_argument("--all-views", dest="frontal_only", action="store_false", help="use frontal and lateral views")
    p.add_argument("--image-size", type=positive_int,
                   help="input side in px (default: the export's, else the run's training size, else 224)")


def to_json(obj: Any) -> Any:
    """A result dataclass as JSON-ready data: dataclasses as dicts ("schema" first, then the fields in
    their order; a field with repr=False, per-item detail, is left out), tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = sorted((f.name for f in dataclasses.fields(obj) if f.repr), key=lambda n: n != "schema")
        return {n: to_json(getattr(obj, n)) for n in names}
    if isinstance(obj, Mapping):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    return obj


def from_json(tp: Any, data: Any) -> Any:
    """`data` (parsed JSON) as type `tp`: a dataclass (a field with a default may be absent), X | None,
    tuple[...], list[...], dict[str, X], or a plain value."""
    if data is None:
        return None
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {f.name: from_json(hints[f.name], data[f.name]) for f in dataclasses.fields(tp)
                  if f.repr and f.init and (f.name in data or _required(f))}
        return tp(**kwargs)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return from_json(next(a for a in args if a is not type(None)), data)
    if origin is tuple:
        return tuple(from_json(a, v) for a, v in zip(args, data, strict=True))
    if origin is list:
        return [from_json(args[0], v) for v in data]
    if origin is dict:
        return {k: from_json(args[1], v) for k, v in data.items()}
    return tp(data) if tp in (int, float, str) else data


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
