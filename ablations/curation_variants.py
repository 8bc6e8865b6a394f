"""Curation variants for ablations: the base dataset with some sources curated under other settings.

An ablation may vary curation (a filter threshold, MinHash dedup on or off, a quality threshold) instead of the
mixture or the model. Each variant is a curated *and* tokenized directory of its own, so proxies train on it like
on any dataset, but only the sources whose recipe the settings change are curated again: every other source is
taken from the base unchanged (hard links to its Parquet and token shards, its manifest entry as it is), and the
changed sources are tokenized with the base's own tokenizer and validation split, so that losses stay comparable
with the base's. The datatrove fingerprint of `pipelines/curate.py` makes a second call with the same settings a
no-op: its stages see an unchanged recipe, raw data and task count, and nothing runs.

Settings are dotted keys, `<selector>.<field path>: value`, validated against the recipe dataclasses
(`WebRecipe`, `CodeRecipe`, `MathRecipe`, `ChatRecipe` and the settings they hold). The selector is a source name
(`web-en`, `math`) or a recipe kind (`web`, `code`, `math`, `chat`: every source of that kind); `dedup: false`
alone turns MinHash dedup off for every source, `<selector>.dedup: false` for some. More specific keys win:
`dedup` < kind < source.

    web.language_threshold: 0.8                   # every web source
    web-en.gopher.max_non_alpha_words_ratio: 0.7  # one source
    math.quality.min_words: 30
    chat.dedup: false
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from mixlab.ablations.outputs import exclusive_lock
from mixlab.curation import (
    DOCS_SUFFIX,
    ManifestError,
    MinhashSettings,
    ShardManifest,
    SourceEntry,
    TokenizeConfig,
    held_out_leakage,
    record_leakage,
    split_source,
    tokenize_manifest,
)
from mixlab.pipelines.chat import ChatRecipe, chat_pipeline
from mixlab.pipelines.code import CodeRecipe, code_pipeline
from mixlab.pipelines.curate import FINGERPRINT, RecipeBuilder, curate
from mixlab.pipelines.math import MathRecipe, math_pipeline
from mixlab.pipelines.web import WebRecipe, web_pipeline

log = logging.getLogger("mixlab.curation_variants")

VARIANTS_DIR = "curated-variants"
VARIANT_JSON = "variant.json"
DEDUP = "dedup"
HASH_CHARS = 12
RECIPE_CLASSES: dict[str, type] = {"web": WebRecipe, "code": CodeRecipe, "math": MathRecipe, "chat": ChatRecipe}
# fields that make a source what it is, not how strictly it is filtered: a web source's language is its name's
FIXED_FIELDS = {("web", ("language",)), ("web", ("gopher", "language"))}
UNIT_INTERVAL_WORDS = ("threshold", "ratio", "fraction")  # such fields are shares or scores: in [0, 1]
AT_LEAST_ONE = {"n_grams", "num_buckets", "hashes_per_bucket"}  # MinHash shapes: 0 would crash datatrove
CONFIG_EXTRAS = ("output", "parquet_schema")  # what assemble_stages adds to a recipe's recorded config
TOKEN_SHARD_SUFFIXES = ("", ".index", ".metadata", DOCS_SUFFIX)


class CurationSettingsError(ValueError):
    """A curation setting that names no source, kind or field, or a value of the wrong type or range."""


# ---- settings ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurationSetting:
    """One validated setting: `selector` None means every source (only `dedup`)."""

    key: str
    selector: str | None
    path: tuple[str, ...]
    value: Any

    @property
    def rank(self) -> int:
        """Precedence: every source < a kind < one source (applied in this order, so the specific one wins)."""
        if self.selector is None:
            return 0
        return 1 if self.selector in RECIPE_CLASSES else 2


def _kind_of_name(source: str) -> str | None:
    """The recipe kind `recipe_for` gives a source name (web-<lang>, code*, math*, chat*), or None."""
    if source.startswith("web-"):
        return "web"
    for kind in ("code", "math", "chat"):
        if source.startswith(kind):
            return kind
    return None


def _hint_dataclass(hint: Any) -> type | None:
    """The dataclass a field holds (`GopherSettings | None` -> GopherSettings), or None for a plain field."""
    if is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and is_dataclass(inner[0]):
            return inner[0]
    return None


def field_paths(kind: str) -> list[str]:
    """Every settable dotted field of a recipe kind (plus `dedup`), for error messages and docs."""
    paths = [DEDUP]

    def walk(cls: type, prefix: tuple[str, ...]) -> None:
        hints = typing.get_type_hints(cls)
        for spec in fields(cls):
            path = (*prefix, spec.name)
            if (kind, path) in FIXED_FIELDS:
                continue
            inner = _hint_dataclass(hints[spec.name])
            if inner is not None:
                walk(inner, path)
            else:
                paths.append(".".join(path))

    walk(RECIPE_CLASSES[kind], ())
    return paths


def _checked_value(value: Any, hint: Any, key: str) -> Any:
    """`value` as the field's type wants it (ints accepted for floats, tuples for lists), or a clear error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _checked_value(value, inner[0], key)
    ok, result, expected = False, value, getattr(hint, "__name__", str(hint))
    if hint is bool:
        ok, expected = isinstance(value, bool), "true or false"
    elif hint is int:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif hint is float:
        ok, expected = isinstance(value, int | float) and not isinstance(value, bool), "a number"
        result = float(value) if ok else value
    elif hint is str:
        ok, expected = isinstance(value, str), "a string"
    elif origin is list:
        item = args[0] if args else Any
        expected = f"a list of {getattr(item, '__name__', item)}"
        if isinstance(value, list | tuple):
            result = [_checked_value(v, item, key) for v in value]
            ok = True
    if not ok:
        raise CurationSettingsError(f"curation setting {key!r}: {value!r} is not {expected}")
    if isinstance(result, int | float) and not isinstance(result, bool):
        name = key.rsplit(".", 1)[-1]
        if result < 0 or (name in AT_LEAST_ONE and result < 1):
            raise CurationSettingsError(f"curation setting {key!r}: {result!r} must be "
                                        f"{'at least 1' if name in AT_LEAST_ONE else '0 or more'}")
        if any(word in name for word in UNIT_INTERVAL_WORDS) and result > 1:
            raise CurationSettingsError(f"curation setting {key!r}: {result!r} is a share or score, in [0, 1]")
    return result


def _field_hint(kind: str, path: tuple[str, ...], key: str) -> Any:
    """The type hint of a dotted field of a recipe kind; an unknown field names the valid ones."""
    if path == (DEDUP,):
        return bool
    valid = field_paths(kind)
    if (kind, path) in FIXED_FIELDS:
        raise CurationSettingsError(f"curation setting {key!r}: {'.'.join(path)} is fixed by the source's name "
                                    f"(web-<language>), not a curation setting; settable fields of {kind}: {valid}")
    cls: type | None = RECIPE_CLASSES[kind]
    for depth, name in enumerate(path):
        known = {f.name for f in fields(cls)} if cls is not None else set()
        if name not in known:
            raise CurationSettingsError(f"curation setting {key!r}: {kind} recipes have no field "
                                        f"{'.'.join(path[: depth + 1])!r}; settable fields of {kind}: {valid}")
        hint = typing.get_type_hints(cls)[name]
        inner = _hint_dataclass(hint)
        if depth == len(path) - 1:
            if inner is not None:
                raise CurationSettingsError(f"curation setting {key!r}: {'.'.join(path)} is a group of settings; "
                                            f"set its fields one by one ({'.'.join(path)}.<field>); settable "
                                            f"fields of {kind}: {valid}")
            return hint
        cls = inner
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class CurationSettings:
    """Validated curation settings, in a canonical order (what the variant's hash is taken of)."""

    items: tuple[CurationSetting, ...] = ()

    @classmethod
    def parse(cls, settings: Mapping[str, Any] | CurationSettings,
              sources: Mapping[str, str] | None = None) -> CurationSettings:
        """Check every key and value. `sources` maps the base's source names to their kinds; without it a
        selector may be any name `recipe_for` accepts (web-<lang>, code*, math*, chat*) or a kind."""
        if isinstance(settings, CurationSettings):
            settings = settings.to_dict()
        if not isinstance(settings, Mapping):
            raise CurationSettingsError(f"curation settings must be a mapping of dotted keys to values, got "
                                        f"{type(settings).__name__}: {settings!r}")
        items = []
        for raw_key, value in settings.items():
            if not isinstance(raw_key, str) or not raw_key.strip():
                raise CurationSettingsError(f"curation setting key {raw_key!r} is not a dotted name like "
                                            "'web.language_threshold'")
            key = raw_key.strip()
            selector, path = _split_key(key, sources)
            kinds = _selected_kinds(selector, sources, key)
            checked = value
            for kind in kinds:
                checked = _checked_value(value, _field_hint(kind, path, key), key)
            items.append(CurationSetting(key, selector, path, checked))
        return cls(tuple(sorted(items, key=lambda s: (s.rank, s.key))))

    def to_dict(self) -> dict[str, Any]:
        return {item.key: item.value for item in self.items}

    def digest(self) -> str:
        """A short hash of the settings: the variant's folder name (same settings, same folder)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_CHARS]

    def for_source(self, source: str, kind: str) -> list[CurationSetting]:
        """The settings that apply to one source, least specific first."""
        return [s for s in self.items if s.selector is None or s.selector in (source, kind)]

    def recipe(self, source: str, kind: str, base: Any) -> Any:
        """`base` (a recipe dataclass) with this source's settings applied; its own checks (e.g. Gopher's
        stop-word rule) run on the result."""
        applied = self.for_source(source, kind)
        dedup_off = [s.key for s in applied if s.path == (DEDUP,) and s.value is False]
        minhash = [s.key for s in applied if s.path[0] == "minhash"]
        if dedup_off and minhash:
            raise CurationSettingsError(f"{source}: {minhash} set MinHash settings but {dedup_off} turn dedup off "
                                        "for this source; drop one of them")
        recipe = base
        for setting in applied:
            try:
                if setting.path == (DEDUP,):
                    if not setting.value:  # every dedup the recipe has: MinHash and exact
                        recipe = replace(recipe, minhash=None, **({"exact": None} if hasattr(recipe, "exact") else {}))
                    elif recipe.minhash is None:
                        recipe = replace(recipe, minhash=MinhashSettings())
                else:
                    recipe = _set_path(recipe, setting.path, setting.value)
            except (TypeError, ValueError) as err:
                raise CurationSettingsError(f"curation setting {setting.key!r} for {source}: {err}") from err
        return recipe


def _split_key(key: str, sources: Mapping[str, str] | None) -> tuple[str | None, tuple[str, ...]]:
    """(selector, field path) of a key; the longest known selector wins (source names may hold dots)."""
    if key == DEDUP:
        return None, (DEDUP,)
    known = set(RECIPE_CLASSES) | set(sources or {})
    if sources is None:
        head = key.split(".", 1)[0]
        if _kind_of_name(head) is not None:
            known.add(head)
    matches = [s for s in known if key == s or key.startswith(f"{s}.")]
    if not matches:
        names = sorted(sources) if sources is not None else ["web-<lang>", "code-*", "math*", "chat*"]
        raise CurationSettingsError(f"curation setting {key!r}: {key.split('.', 1)[0]!r} is no source or recipe "
                                    f"kind; a key is '<selector>.<field>' (or '{DEDUP}') with selector one of the "
                                    f"kinds {sorted(RECIPE_CLASSES)} or the sources {names}")
    selector = max(matches, key=len)
    rest = key[len(selector) + 1:]
    if not rest:
        kind = selector if selector in RECIPE_CLASSES else _source_kind(selector, sources)
        listed = field_paths(kind) if kind in RECIPE_CLASSES else []
        raise CurationSettingsError(f"curation setting {key!r}: name a field, '{selector}.<field>'; settable "
                                    f"fields: {listed}")
    return selector, tuple(rest.split("."))


def _source_kind(source: str, sources: Mapping[str, str] | None) -> str | None:
    return sources[source] if sources is not None and source in sources else _kind_of_name(source)


def _selected_kinds(selector: str | None, sources: Mapping[str, str] | None, key: str) -> list[str]:
    """The recipe kinds a selector reaches (all four for the global `dedup`)."""
    if selector is None:
        return list(RECIPE_CLASSES)
    if selector in RECIPE_CLASSES:
        return [selector]
    kind = _source_kind(selector, sources)
    if kind not in RECIPE_CLASSES:
        raise CurationSettingsError(f"curation setting {key!r}: source {selector!r} is of kind {kind!r}, which has "
                                    f"no built-in recipe; curation variants change {sorted(RECIPE_CLASSES)} recipes")
    return [kind]


def _set_path(obj: Any, path: tuple[str, ...], value: Any) -> Any:
    """A copy of a (nested) dataclass with one field changed; `replace` re-runs each level's __post_init__."""
    if len(path) == 1:
        return replace(obj, **{path[0]: value})
    child = getattr(obj, path[0])
    if child is None:
        hint = _hint_dataclass(typing.get_type_hints(type(obj))[path[0]])
        child = hint()
    return replace(obj, **{path[0]: _set_path(child, path[1:], value)})


def curation_label(settings: Mapping[str, Any] | CurationSettings) -> str:
    """A short name for a variant, e.g. `web-en.language_threshold=0.8-math.dedup=off` (a hash when long)."""
    parsed = settings if isinstance(settings, CurationSettings) else CurationSettings.parse(settings)
    if not parsed.items:
        return "base-curation"
    parts = []
    for item in parsed.items:
        value = item.value
        text = ("on" if value else "off") if isinstance(value, bool) else "none" if value is None else \
            f"{value:g}" if isinstance(value, float) else str(value) if isinstance(value, int | str) else \
            hashlib.sha256(json.dumps(value).encode()).hexdigest()[:6]
        where = ".".join([item.selector] if item.selector else [])
        parts.append(f"{where + '.' if where else ''}{item.path[-1]}={text}")
    label = re.sub(r"[^A-Za-z0-9._=-]", "_", "-".join(parts))
    return label if len(label) <= 48 else f"curation-{parsed.digest()[:8]}"


# ---- recipes of the base and of the variant --------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples and lists alike): what two recipe configs are compared by."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _from_plain(cls: type, data: Mapping[str, Any]) -> Any:
    """A recipe dataclass from its recorded `asdict` form (nested settings included)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for spec in fields(cls):
        if spec.name not in data:
            continue
        value, inner = data[spec.name], _hint_dataclass(hints[spec.name])
        values[spec.name] = _from_plain(inner, value) if inner is not None and isinstance(value, Mapping) else value
    return cls(**values)


def _default_recipe(source: str, kind: str) -> Any:
    if kind == "web":
        return WebRecipe(language=source.removeprefix("web-").split("-")[0])
    return RECIPE_CLASSES[kind]()


def base_recipe(base_curated: Path, source: str, kind: str) -> Any:
    """The recipe the base curated `source` with, read from its `logs/<source>/fingerprint.json`; the default
    recipe when the base has none recorded (then a warning says so)."""
    path = base_curated / "logs" / source / FINGERPRINT
    try:
        config = json.loads(path.read_text())["config"]
        return _from_plain(RECIPE_CLASSES[kind], {k: v for k, v in config.items() if k not in CONFIG_EXTRAS})
    except FileNotFoundError:
        log.warning("%s: no recorded recipe for %s; assuming the default %s recipe", path, source, kind)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        log.warning("%s: cannot read the recorded recipe of %s (%s); assuming the default %s recipe",
                    path, source, err, kind)
    return _default_recipe(source, kind)


def _builder(source: str, kind: str, recipe: Any) -> RecipeBuilder:
    if kind == "web":
        return lambda raw, cur, tasks: web_pipeline(raw, cur, language=recipe.language, source=source, tasks=tasks,
                                                    recipe=recipe)
    pipeline = {"code": code_pipeline, "math": math_pipeline, "chat": chat_pipeline}[kind]
    return lambda raw, cur, tasks: pipeline(raw, cur, source=source, tasks=tasks, recipe=recipe)


@dataclass
class VariantPlan:
    """Which sources a variant curates again (with which recipe) and which it reuses from the base."""

    settings: CurationSettings
    recipes: dict[str, Any]  # changed source -> its variant recipe
    reused: list[str]

    @property
    def digest(self) -> str:
        return self.settings.digest()


def plan_variant(base_curated: str | Path, settings: Mapping[str, Any] | CurationSettings) -> VariantPlan:
    """Validate `settings` against the base's sources and find the sources whose recipe they change; a setting
    equal to what the base used changes nothing, and that source is reused."""
    base_curated = Path(base_curated)
    base = ShardManifest.load(base_curated)
    kinds = {name: entry.kind for name, entry in base.sources.items()}
    parsed = CurationSettings.parse(settings, kinds)
    recipes, reused = {}, []
    for name, kind in sorted(kinds.items()):
        applied = parsed.for_source(name, kind)
        if not applied or kind not in RECIPE_CLASSES:
            reused.append(name)
            continue
        before = base_recipe(base_curated, name, kind)
        after = parsed.recipe(name, kind, before)
        if _plain(asdict(after)) == _plain(asdict(before)):
            reused.append(name)
        else:
            recipes[name] = after
    return VariantPlan(parsed, recipes, reused)


# ---- where the raw data is -------------------------------------------------------------------------
RAW_PATH = re.compile(r"path='([^']+)'")


def recorded_raw_dir(base_curated: str | Path, source: str) -> Path | None:
    """The raw root the base curated `source` from: datatrove's `logs/<source>/filter/executor.json` records the
    reader's folder (`<raw>/<source>`). None when it is not recorded."""
    path = Path(base_curated) / "logs" / source / "filter" / "executor.json"
    try:
        folder = json.loads(path.read_text())["pipeline"][0]["data_folder"]
    except (OSError, KeyError, IndexError, TypeError, ValueError):
        return None
    match = RAW_PATH.search(folder) if isinstance(folder, str) else None
    if match is None or Path(match.group(1)).name != source:
        return None
    return Path(match.group(1)).parent


def _raw_root(base_curated: Path, sources: list[str], raw_dir: str | Path | None) -> Path:
    """The raw root for the sources to curate: the argument, else the one the base recorded for all of them."""
    if raw_dir is not None:
        return Path(raw_dir)
    found = {source: recorded_raw_dir(base_curated, source) for source in sources}
    missing = [s for s, root in found.items() if root is None]
    if missing:
        raise FileNotFoundError(f"{base_curated}: the raw data of {missing} is not recorded (no "
                                f"logs/<source>/filter/executor.json naming it); pass raw_dir=<the raw/ folder the "
                                "base was curated from>")
    roots = sorted({str(root) for root in found.values()})
    if len(roots) > 1:
        raise ValueError(f"{base_curated}: the sources {sources} were curated from different raw folders {roots}; "
                         "pass raw_dir=")
    root = Path(roots[0])
    absent = [s for s in sources if not (root / s).is_dir()]
    if absent:
        raise FileNotFoundError(f"{root}: the raw folder the base was curated from has no {absent} any more; "
                                "pass raw_dir=<the raw/ folder>, or rebuild it with `mixlab corpus fetch`")
    return root


# ---- reusing the base's files ----------------------------------------------------------------------
def _source_files(entry: SourceEntry) -> list[str]:
    """Every file of a source the manifest names or implies: curated shards, token shards and their companions."""
    files = [shard.path for shard in entry.shards]
    files += [f"{shard.path}{suffix}" for shard in entry.token_shards for suffix in TOKEN_SHARD_SUFFIXES]
    return files


def _records(entry: SourceEntry) -> list[dict[str, Any]]:
    return [asdict(s) for s in [*entry.shards, *entry.token_shards]]


def _same_file(a: Path, b: Path) -> bool:
    """True when `b` is `a` (a hard link) or an identical copy of it (size and modification time, as copy2 keeps)."""
    if not a.is_file() or not b.is_file():
        return False
    if os.path.samefile(a, b):
        return True
    sa, sb = a.stat(), b.stat()
    return sa.st_size == sb.st_size and sa.st_mtime_ns == sb.st_mtime_ns


def _place(source: Path, target: Path) -> None:
    """`target` becomes a hard link to `source` (a copy across file systems), replaced atomically. Everything that
    rewrites these files (curate, tokenize) removes them first, so a link never lets one dataset change the other."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.placing")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def _in_sync(base: ShardManifest, variant: ShardManifest, name: str) -> bool:
    entry = variant.sources.get(name)
    if entry is None or _records(entry) != _records(base.sources[name]):
        return False
    return all(_same_file(base.resolve(rel), variant.resolve(rel)) for rel in _source_files(entry))


def _clear_source(variant: ShardManifest, name: str) -> None:
    """Remove a source's files from the variant (never following a link out of it)."""
    for folder in (f"data/{name}", f"tokens/{name}", f"logs/{name}", f"work/{name}", f"quarantine/{name}"):
        shutil.rmtree(variant.resolve(folder), ignore_errors=True)


def _reuse_source(base: ShardManifest, variant: ShardManifest, name: str) -> None:
    """The base's files and entry of `name`, in the variant."""
    entry = base.sources[name]
    for record in [*entry.shards, *entry.token_shards]:
        if problem := base.check_file(record, owner=name, checksum=False):
            raise ManifestError(f"base dataset {base.root}: {problem}")
    _clear_source(variant, name)
    for rel in _source_files(entry):
        origin = base.resolve(rel)
        if origin.is_file():
            _place(origin, variant.resolve(rel))
        elif not rel.endswith(DOCS_SUFFIX):
            raise ManifestError(f"{origin}: listed by the base manifest {base.root / 'manifest.json'} but missing; "
                                "re-run `mixlab tokenize` on the base")
    variant.sources[name] = copy.deepcopy(entry)


def _sync_tokenizer(base: ShardManifest, variant: ShardManifest) -> bool:
    """Copy the base's tokenizer folder (copied, not linked: training a tokenizer rewrites its file in place) and
    record it; returns whether anything changed."""
    info = base.tokenizer
    assert info is not None
    if variant.tokenizer == info and variant.check_file(variant.tokenizer) is None:
        return False
    if problem := base.check_file(info):
        raise ManifestError(f"base dataset {base.root}: {problem}")
    folder = base.resolve(info.path).parent
    target = variant.resolve(Path(info.path).parent.as_posix())
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for item in folder.iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)
    variant.tokenizer = copy.deepcopy(info)
    return True


# ---- the variant ---------------------------------------------------------------------------------
def variant_dir(base_curated: str | Path, settings: Mapping[str, Any] | CurationSettings,
                out_root: str | Path | None = None) -> Path:
    """Where `curated_variant` puts the variant of these settings (nothing is checked or written)."""
    base_curated = Path(base_curated)
    digest = CurationSettings.parse(settings).digest()
    return Path(out_root or base_curated.parent) / VARIANTS_DIR / digest


def _split_config(base: ShardManifest, given: TokenizeConfig | None) -> TokenizeConfig:
    """The validation split the base's tokenizer was trained without (what its token shards hold out)."""
    held_out = base.tokenizer.held_out if base.tokenizer else None
    if given is not None:
        if held_out is not None and given.val_settings() != held_out:
            raise ValueError(f"{base.root}: its tokenizer was trained without the validation split {held_out}, not "
                             f"{given.val_settings()}; leave tokenize_config unset to use the base's")
        return given
    if held_out is None:
        raise ValueError(f"{base.root / 'manifest.json'}: the tokenizer records no validation split (held_out), so "
                         "the base's split is unknown; pass tokenize_config=TokenizeConfig(val_fraction=...) as the "
                         "base was tokenized")
    return TokenizeConfig(**held_out)


def curated_variant(
    base_curated: str | Path,
    settings: Mapping[str, Any] | CurationSettings,
    raw_dir: str | Path | None = None,
    out_root: str | Path | None = None,
    tasks: int = 2,
    workers: int = 2,
    *,
    tokenize_config: TokenizeConfig | None = None,
    console: TextIO | None = None,
) -> Path:
    """A curated and tokenized dataset: the base, with the sources these settings change curated again.

    Returns `<out_root or base.parent>/curated-variants/<hash of the settings>/`, holding a `variant.json`
    (settings, base, hash, which sources were curated and which reused). Sources the settings leave as the
    base had them are hard links to the base's shards and token shards with its manifest entries; changed ones
    are curated from `raw_dir` (default: the raw folder the base's logs record) and tokenized with the base's
    tokenizer and validation split. Calling again with the same settings runs nothing.
    """
    base_curated = Path(base_curated)
    base = ShardManifest.load(base_curated)
    if base.tokenizer is None or not any(e.token_shards for e in base.sources.values()):
        raise ManifestError(f"{base_curated / 'manifest.json'}: the base is not tokenized; run `mixlab tokenize "
                            f"--curated {base_curated}` first, so that variants share its tokenizer")
    plan = plan_variant(base_curated, settings)
    split = _split_config(base, tokenize_config)
    out = Path(out_root or base_curated.parent) / VARIANTS_DIR / plan.digest
    if out.resolve() == base_curated.resolve() or base_curated.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"{out}: the variant folder would hold the base {base_curated}; choose another out_root")
    raw_root = _raw_root(base_curated, sorted(plan.recipes), raw_dir) if plan.recipes else None
    record = {"hash": plan.digest, "label": curation_label(plan.settings), "settings": plan.settings.to_dict(),
              "base": str(base_curated.resolve()), "curated": sorted(plan.recipes), "reused": plan.reused,
              "tasks": tasks}
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out / ".variant.lock"):  # two proxies may ask for the same variant at once
        previous = json.loads((out / VARIANT_JSON).read_text()) if (out / VARIANT_JSON).exists() else None
        if previous is not None and previous.get("base") != record["base"]:
            raise ValueError(f"{out / VARIANT_JSON}: this folder is a variant of {previous.get('base')}, not of "
                             f"{record['base']}; pass another out_root (or remove {out})")
        _build(base, out, plan, raw_root, split, tasks, workers, console)
        if previous != record:
            (out / VARIANT_JSON).write_text(json.dumps(record, indent=2) + "\n")
    manifest = ShardManifest.load(out)
    problems = manifest.check() + [p for name, entry in manifest.sources.items()
                                   for s in [*entry.shards, *entry.token_shards]
                                   if (p := manifest.check_file(s, owner=name, checksum=False))]
    if problems:
        raise ManifestError(f"{out}: the variant does not add up:\n" + "\n".join(problems))
    return out


def _build(base: ShardManifest, out: Path, plan: VariantPlan, raw_root: Path | None, split: TokenizeConfig,
           tasks: int, workers: int, console: TextIO | None) -> None:
    """Bring `out` in line with the plan: reused sources linked, changed ones curated and tokenized."""
    try:
        variant = ShardManifest.load(out)
    except ManifestError:
        if (out / "manifest.json").exists():
            log.warning("%s: unreadable variant manifest, building the variant again", out / "manifest.json")
        variant = ShardManifest()
        variant.root = out
    before = variant.to_dict()
    touched = _sync_tokenizer(base, variant)
    if touched:  # token shards of another tokenizer are stale
        for name in plan.recipes:
            if name in variant.sources:
                variant.sources[name].token_shards, variant.sources[name].tokens = [], {}
    for name in plan.reused:
        if not _in_sync(base, variant, name):
            _reuse_source(base, variant, name)
            touched = True
    for name in sorted(set(variant.sources) - set(base.sources)):
        _clear_source(variant, name)
        del variant.sources[name]
        touched = True
    for name in plan.recipes:
        if not (out / "logs" / name / FINGERPRINT).exists():  # never curated here: it may hold the base's links
            _clear_source(variant, name)
            variant.sources.pop(name, None)
    leakage = {name: variant.sources[name].metadata_summary.get("held_out_leakage")
               for name in plan.recipes if name in variant.sources}
    if variant.to_dict() != before or not (out / "manifest.json").exists():
        variant.save(out)

    if plan.recipes:
        assert raw_root is not None
        builders = {name: _builder(name, base.sources[name].kind, recipe) for name, recipe in plan.recipes.items()}
        curate(raw_root, out, sources=sorted(plan.recipes), tasks=tasks, workers=workers, recipes=builders,
               console=console)
        variant = ShardManifest.load(out)
    stale = sorted(name for name in plan.recipes if not variant.sources[name].token_shards)
    empty = [name for name in stale if not variant.sources[name].shards]
    for name in empty:
        log.warning("%s: the variant's filters keep no document of %s; it has no token shards", out, name)
    # the base's validation documents stay held out (and are the only ones): nothing a variant trains on is in
    # the base's held-out split, on which every variant of an ablation is scored (`eval.curated`)
    held_out = {name: split_source(base, name, split).val_ids for name in plan.recipes}
    if to_tokenize := [name for name in stale if name not in empty]:
        variant = tokenize_manifest(out, None, config=split, sources=to_tokenize, show_progress=False,
                                    held_out_ids=held_out)
        touched = True
    if touched:
        record_leakage(variant, held_out_leakage(variant, split, held_out_ids=held_out))
    else:  # curate rebuilt the entries it found unchanged: give them back the leakage counts they had
        restored = False
        for name, counts in leakage.items():
            entry = variant.sources.get(name)
            if counts is not None and entry is not None and entry.token_shards \
                    and entry.metadata_summary.get("held_out_leakage") != counts:
                entry.metadata_summary["held_out_leakage"] = counts
                restored = True
        if restored:
            variant.save(out)


__all__ = [
    "CurationSetting",
    "CurationSettings",
    "CurationSettingsError",
    "VariantPlan",
    "base_recipe",
    "curated_variant",
    "curation_label",
    "field_paths",
    "plan_variant",
    "recorded_raw_dir",
    "variant_dir",
]
