"""Ablation specs: a base run and the variants to compare with it, expanded into one run document per proxy.

A spec is a base run config document (the `mixlab.run/1` sections: data, mixture, model, train, eval, ...) plus
either axes (`mode="grid"`: every combination) or an explicit list of variants (`mode="list"`), each crossed with
the seeds. An axis sets one field of the run document (`train.lr`, `model.n_layers`, `mixture`, `plan.max_epochs`)
to each of its values; a value may be a whole section, e.g. a schedule, under a label (`{"code-heavy": {...}}`).
A field `curation.<key>` (`curation.web.language_threshold`, `curation.dedup`) is a curation setting: such a variant
trains on its own curated variant of the base's dataset, which re-curates only the sources it changes
(`ablations.curation_variants`). The field `tokenizer` takes the names of token datasets of the base's data
(`mixlab tokenize --tokenizer NAME=PATH` writes `<data.curated>/tokenized/<NAME>/`): such a variant trains and is
scored on that token dataset (same documents, same held-out split, another vocabulary), so its losses differ in
units and only bits per byte compares across the axis. Every variant is named by what differs from the base
(`lr=0.002`, `mixture=code-heavy`), so run ids say what they test and a rerun of the spec finds the same runs again.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mixlab.pipelines.run_config import set_fields

SPEC_FORMAT = "mixlab.ablation/1"
CURATION_PREFIX = "curation."  # an axis or list field `curation.<key>` is a curation setting, not a run field
TOKENIZER_FIELD = "tokenizer"  # an axis or list field naming a token dataset <data.curated>/tokenized/<name>
MODES = ("grid", "list")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._=+-]+")


class AblationSpecError(ValueError):
    """A spec that cannot be expanded; the message names the axis or variant and what to change."""


@dataclass(frozen=True)
class Axis:
    """One field of the run document and the values it takes. `values` is a list, or a mapping label -> value
    for values that are documents (a schedule, a model section): the label names the variant."""

    field: str
    values: Sequence[Any] | Mapping[str, Any]

    def __post_init__(self) -> None:
        if not self.field or any(not part for part in self.field.split(".")):
            raise AblationSpecError(f"axis field {self.field!r}: expected a dotted path such as train.lr")
        if isinstance(self.values, str) or not isinstance(self.values, Sequence | Mapping) or not self.values:
            raise AblationSpecError(f"axis {self.field!r}: give a non-empty list of values (or label: value)")
        labels = [label for label, _ in self.labelled()]
        if len(set(labels)) != len(labels):
            raise AblationSpecError(f"axis {self.field!r}: values repeat: {labels}")

    def labelled(self) -> list[tuple[str, Any]]:
        if isinstance(self.values, Mapping):
            return [(str(label), value) for label, value in self.values.items()]
        return [(_label(value, self.field), value) for value in self.values]

    @property
    def short(self) -> str:
        """The axis in a variant name: the last part of the field (`lr`, `n_layers`, `mixture`)."""
        return self.field.split(".")[-1]


@dataclass(frozen=True)
class AblationVariant:
    """One proxy run of the spec: its name, the fields it sets on the base, its seed, and its run id."""

    name: str
    fields: Mapping[str, Any]  # field path -> value, in axis order
    labels: Mapping[str, str]  # field path -> the value's label (what the report's columns show)
    seed: int
    run_id: str

    @property
    def curation(self) -> dict[str, Any]:
        """The curation settings this variant changes (`curation.<key>` fields without the prefix, e.g.
        `web.language_threshold`, `dedup`): it trains on its own curated variant of the base's dataset."""
        return {path[len(CURATION_PREFIX):]: value for path, value in self.fields.items()
                if path.startswith(CURATION_PREFIX)}

    @property
    def tokenizer(self) -> str | None:
        """The token dataset this variant trains on (a name under `<data.curated>/tokenized/`), or None."""
        value = self.fields.get(TOKENIZER_FIELD)
        return None if value is None else str(value)

    def document(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """The run config document of this proxy: the base with the variant's fields, seed and run id set; a
        curation variant's `data.curated` is its curated variant's directory (built by the launcher), and it is
        scored on the base's held-out documents and tasks (`eval.curated`), which it never trains on."""
        assignments = [(path.split("."), value, f"variant {self.name!r}: {path}") for path, value in
                       self.fields.items() if not path.startswith(CURATION_PREFIX) and path != TOKENIZER_FIELD]
        assignments.append((["train", "seed"], self.seed, f"variant {self.name!r}: seed"))
        if self.tokenizer is not None:
            assignments += self._tokenizer_assignments(base)
        if self.curation:
            from mixlab.ablations.curation_variants import variant_dir

            curated = (base.get("data") or {}).get("curated")
            if not curated:
                raise AblationSpecError(f"variant {self.name!r} changes curation, but the base has no data.curated "
                                        "to curate a variant of")
            assignments.append((["data", "curated"], str(variant_dir(curated, self.curation)),
                                f"variant {self.name!r}: curation"))
            if not (base.get("eval") or {}).get("curated"):  # every variant is scored on the same held-out text
                assignments.append((["eval", "curated"], str(curated), f"variant {self.name!r}: curation"))
        document = set_fields(dict(base), assignments)
        document["run_id"] = self.run_id
        return document

    def _tokenizer_assignments(self, base: Mapping[str, Any]) -> list[tuple[list[str], Any, str]]:
        """data.curated -> the named token dataset. The model's vocabulary then comes from that tokenizer, and
        the run is scored on that dataset's own held-out split: a fixed vocab_size or eval dataset would belong
        to another tokenizer, so they are refused."""
        # where `mixlab tokenize` writes each token dataset
        from mixlab.pipelines.tokenize import CANDIDATES_DIR

        where = f"variant {self.name!r}: {TOKENIZER_FIELD}={self.tokenizer}"
        curated = (base.get("data") or {}).get("curated")
        if not curated:
            raise AblationSpecError(f"{where}: the base has no data.curated whose token datasets to choose from")
        if self.curation:
            raise AblationSpecError(f"{where}: a variant cannot change both the tokenizer and curation (a curation "
                                    "variant is tokenized with the base's tokenizer); put them in separate variants")
        if (base.get("model") or {}).get("vocab_size") is not None:
            raise AblationSpecError(f"{where}: the base sets model.vocab_size; leave it out so that each tokenizer's "
                                    "vocabulary sizes its model")
        if (base.get("eval") or {}).get("curated"):
            raise AblationSpecError(f"{where}: the base scores on eval.curated, a dataset of one tokenizer; leave it "
                                    "out so that each variant is scored on its own token dataset's held-out split")
        if not self.tokenizer or _NAME_CHARS.search(self.tokenizer) or self.tokenizer in (".", ".."):
            raise AblationSpecError(f"{where}: name a token dataset under {curated}/{CANDIDATES_DIR}/ (the NAME of "
                                    "`mixlab tokenize --tokenizer NAME=PATH`)")
        return [(["data", "curated"], str(Path(curated) / CANDIDATES_DIR / self.tokenizer), where)]


@dataclass
class AblationSpec:
    """A base run and the variants along axes (grid) or listed (list), each trained once per seed."""

    name: str
    base: dict[str, Any]
    axes: tuple[Axis, ...] = ()
    variants: tuple[Mapping[str, Any], ...] = ()  # mode "list": each {field: value} (optional "name")
    seeds: tuple[int, ...] = (0,)
    mode: str = "grid"
    include_base: bool = True  # the base itself is a variant (what every difference is measured against)
    description: str = ""
    raw_dir: str | None = None  # curation axes: the raw corpus the base was curated from (default: as curation recorded)

    def __post_init__(self) -> None:
        if not self.name or _NAME_CHARS.search(self.name):
            raise AblationSpecError(f"spec name {self.name!r}: use letters, digits, '.', '_', '-' (it prefixes run ids)")
        if self.mode not in MODES:
            raise AblationSpecError(f"spec {self.name!r}: mode {self.mode!r}; choose one of {list(MODES)}")
        self.axes = tuple(a if isinstance(a, Axis) else Axis(**a) for a in self.axes)
        self.variants = tuple(dict(v) for v in self.variants)
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise AblationSpecError(f"spec {self.name!r}: seeds {list(self.seeds)} must be distinct and at least one")
        if self.mode == "grid" and self.variants:
            raise AblationSpecError(f"spec {self.name!r}: variants are listed, so set mode: list (grid uses axes)")
        if self.mode == "list" and self.axes:
            raise AblationSpecError(f"spec {self.name!r}: mode list takes variants, not axes")
        for settings in self._curation_settings():
            from mixlab.ablations.curation_variants import CurationSettings, CurationSettingsError

            try:
                CurationSettings.parse(settings)
            except CurationSettingsError as err:
                raise AblationSpecError(f"spec {self.name!r}: {err}") from err
        if any(a.field == "train.seed" for a in self.axes):
            raise AblationSpecError(f"spec {self.name!r}: seeds are the spec's `seeds` (they set train.seed), not an axis")

    def _curation_settings(self) -> list[dict[str, Any]]:
        """Every curation field of an axis value or listed variant, one setting at a time (checked early)."""
        out = [{a.field[len(CURATION_PREFIX):]: v} for a in self.axes if a.field.startswith(CURATION_PREFIX)
               for _, v in a.labelled()]
        out += [{k[len(CURATION_PREFIX):]: v} for listed in self.variants for k, v in listed.items()
                if k.startswith(CURATION_PREFIX)]
        return out

    # ---- expansion ---------------------------------------------------------------------------------------
    def expand(self) -> list[AblationVariant]:
        """Every proxy run, base first, then variants in axis (or list) order, each for every seed."""
        combos: list[tuple[dict[str, Any], dict[str, str], str | None]] = []
        if self.include_base:
            combos.append(({}, {}, "base"))
        if self.mode == "grid":
            for picked in itertools.product(*(axis.labelled() for axis in self.axes)) if self.axes else ():
                fields = {axis.field: value for axis, (_, value) in zip(self.axes, picked, strict=True)}
                labels = {axis.field: label for axis, (label, _) in zip(self.axes, picked, strict=True)}
                combos.append((fields, labels, None))
        else:
            for i, listed in enumerate(self.variants):
                listed = dict(listed)
                name = listed.pop("name", None)
                if not listed:
                    raise AblationSpecError(f"spec {self.name!r}: variant {i} sets no field")
                # a document value (a whole schedule) is labelled by the variant's name, which it then needs
                labels = {k: _label(v, k) if name is None or _plain(v) else str(name) for k, v in listed.items()}
                combos.append((listed, labels, name))
        variants, seen = [], {}
        for fields, labels, name in combos:
            name = name or "-".join(f"{path.split('.')[-1]}={labels[path]}" for path in fields)
            name = _NAME_CHARS.sub("_", name)
            if name in seen:
                raise AblationSpecError(f"spec {self.name!r}: two variants are both named {name!r} ({seen[name]} and "
                                        f"{fields}); give list variants a `name`")
            seen[name] = fields
            for seed in self.seeds:
                run_id = f"{self.name}-{name.replace('=', '_')}-s{seed}"  # run ids are plain folder names
                variants.append(AblationVariant(name, fields, labels, seed, run_id))
        if not variants:
            raise AblationSpecError(f"spec {self.name!r} expands to no run: add axes or variants, or include_base")
        return variants

    def documents(self) -> dict[str, dict[str, Any]]:
        """run id -> run config document, for every proxy of the spec."""
        return {v.run_id: v.document(self.base) for v in self.expand()}

    # ---- serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": SPEC_FORMAT, "name": self.name, "base": self.base, "mode": self.mode,
                                "seeds": list(self.seeds), "include_base": self.include_base}
        if self.axes:
            data["axes"] = [{"field": a.field, "values": dict(a.values) if isinstance(a.values, Mapping)
                             else list(a.values)} for a in self.axes]
        if self.variants:
            data["variants"] = [dict(v) for v in self.variants]
        if self.description:
            data["description"] = self.description
        if self.raw_dir:
            data["raw_dir"] = self.raw_dir
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "ablation spec") -> AblationSpec:
        fmt = data.get("format", SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise AblationSpecError(f"{where}: format {fmt!r}; this mixlab reads {SPEC_FORMAT!r}")
        known = {"format", "name", "base", "axes", "variants", "seeds", "mode", "include_base", "description",
                 "raw_dir"}
        unknown = sorted(set(data) - known)
        if unknown or "name" not in data or "base" not in data:
            raise AblationSpecError(f"{where}: expected name, base and axes or variants"
                                    + (f"; unknown keys {unknown}" if unknown else ""))
        try:
            return cls(name=str(data["name"]), base=dict(data["base"]),
                       axes=tuple(Axis(**a) for a in data.get("axes") or ()),
                       variants=tuple(data.get("variants") or ()), seeds=tuple(data.get("seeds") or (0,)),
                       mode=str(data.get("mode") or ("list" if data.get("variants") else "grid")),
                       include_base=bool(data.get("include_base", True)), description=str(data.get("description", "")),
                       raw_dir=str(data["raw_dir"]) if data.get("raw_dir") else None)
        except (TypeError, AblationSpecError) as err:
            raise AblationSpecError(f"{where}: {err}") from err

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> AblationSpec:
        path = Path(path)
        if not path.is_file():
            raise AblationSpecError(f"{path}: no such ablation spec")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise AblationSpecError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(data, Mapping):
            raise AblationSpecError(f"{path}: expected a mapping with name, base and axes or variants")
        return cls.from_dict(data, where=str(path))


def _plain(value: Any) -> bool:
    return isinstance(value, bool | int | float | str) or value is None


def _label(value: Any, field_path: str) -> str:
    """A short label of a plain value in a variant name; documents need an explicit label."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, int | str):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    raise AblationSpecError(f"axis {field_path!r}: value {value!r} is a document; give the values as "
                            "{label: value} so the variant has a name")
