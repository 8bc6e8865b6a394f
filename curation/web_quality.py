"""FineWeb's web filters that datatrove cannot run offline, or runs slowly: URL blocklist, C4 quality
and bad words, FineWeb quality.

- The URL blocklist is the one datatrove's wheel ships (`assets/url_filterblacklistsv0_3_0.tar.gz`, the
  UT1 lists merged: 4.5M domains). datatrove unpacks it to disk and holds it as a Python set in every
  worker (~600 MB each). Here it is read once from the tarball into a sorted array of 64-bit hashes
  (36 MB) cached as `.npy` and memory-mapped, so every worker of a machine shares one copy.
- C4's bad words are LDNOOBW's lists, which datatrove downloads from GitHub at run time; the npm package
  `naughty-words` ships the same lists, fetched with `npm pack` into the download cache.
- Sentences (C4's "at least 5 sentences") are split with spaCy's rule-based sentencizer, as datatrove's
  spaCy tokenizer does, on the warm blank pipeline of `mixlab.curation.text`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.gopher_repetition_filter import find_duplicates
from datatrove.utils._import_utils import ASSETS_PATH
from datatrove.utils.text import TERMINAL_PUNCTUATION
from datatrove.utils.word_tokenizers import WordTokenizer
from mixlab.curation.errors import CurationConfigError
from mixlab.curation.text import WarmSpacyTokenizer, blank_nlp, import_spacy

DATATROVE_BLOCKLIST = Path(ASSETS_PATH) / "url_filterblacklistsv0_3_0.tar.gz"
BLOCKLIST_FORMAT = 1  # bump when the hashing changes: cached arrays of another format are rebuilt


def download_cache_dir() -> Path:
    """Where package data and the hashed blocklist are kept: `$MIXLAB_CACHE`, else `~/.cache/mixlab/downloads`.

    Unlike `pipelines.corpus.default_cache_dir` this ignores XDG_CACHE_HOME: `curate` points that into each
    curated work directory, and a blocklist rebuilt for every curated directory costs 10-30 s each time."""
    if explicit := os.environ.get("MIXLAB_CACHE"):
        return Path(explicit).expanduser()
    return Path.home() / ".cache" / "mixlab" / "downloads"


def _hash_names(names: list[bytes]) -> np.ndarray:
    """Sorted unique 64-bit hashes (blake2b, stable across processes, unlike `hash`)."""
    hashes = np.fromiter(
        (int.from_bytes(hashlib.blake2b(n, digest_size=8).digest(), "little") for n in names),
        dtype=np.uint64, count=len(names),
    )
    hashes.sort()
    return hashes[np.concatenate(([True], hashes[1:] != hashes[:-1]))] if hashes.size else hashes


def _hash_one(name: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little"))


def _list_lines(data: bytes) -> list[bytes]:
    """Entries of a one-per-line list: stripped, lower-cased, without blanks and `#` comments."""
    lines = (line.strip().lower() for line in data.split(b"\n"))
    return [line for line in lines if line and not line.startswith(b"#")]


class DomainBlocklist:
    """A set of domain names held as sorted 64-bit hashes (a false match needs a hash collision among 4.5M
    names: about 1 in 4e12 per lookup)."""

    def __init__(self, hashes: np.ndarray, source: str):
        self.hashes = hashes
        self.source = source

    def __len__(self) -> int:
        return int(self.hashes.size)

    def __contains__(self, domain: str) -> bool:
        if not self.hashes.size:
            return False
        key = _hash_one(domain.lower())
        i = int(np.searchsorted(self.hashes, key))
        return i < self.hashes.size and self.hashes[i] == key

    @classmethod
    def from_names(cls, names: list[str], source: str = "names") -> DomainBlocklist:
        return cls(_hash_names([n.strip().lower().encode() for n in names if n.strip()]), source)

    @classmethod
    def from_file(cls, path: str | Path) -> DomainBlocklist:
        """A user's list: one domain per line, `#` comments (a hosts file's `0.0.0.0 name` lines work too)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"UrlFilterSettings.blocklist_file: {path} does not exist; give a file with "
                                    "one domain per line")
        names = [line.split()[-1] for line in _list_lines(path.read_bytes())]
        return cls(_hash_names(names), str(path))

    @classmethod
    def datatrove_shipped(cls, cache_dir: Path | None = None) -> DomainBlocklist:
        """datatrove's shipped domain list, hashed once into `<cache>/url_blocklist/*.npy` and memory-mapped."""
        return _datatrove_blocklist(str(cache_dir or download_cache_dir() / "url_blocklist"))


@cache
def _datatrove_blocklist(cache_dir: str) -> DomainBlocklist:
    """Once per process (`cache`): the memory map is shared by every worker through the page cache."""
    if not DATATROVE_BLOCKLIST.is_file():
        raise FileNotFoundError(f"{DATATROVE_BLOCKLIST}: datatrove's URL blocklist is missing from its wheel; "
                                "reinstall datatrove or set UrlFilterSettings.blocklist='file'")
    stat = DATATROVE_BLOCKLIST.stat()
    target = Path(cache_dir) / f"datatrove-domains-v{BLOCKLIST_FORMAT}-{stat.st_size}.npy"
    if not target.is_file():
        with tarfile.open(DATATROVE_BLOCKLIST) as tar:
            member = tar.extractfile("domains")
            assert member is not None, f"{DATATROVE_BLOCKLIST} has no 'domains' file"
            hashes = _hash_names(_list_lines(member.read()))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, hashes)
        os.replace(tmp, target)
    return DomainBlocklist(np.load(target, mmap_mode="r"), f"datatrove:{DATATROVE_BLOCKLIST.name}")


@cache
def _datatrove_urls() -> frozenset[str]:
    with tarfile.open(DATATROVE_BLOCKLIST) as tar:
        member = tar.extractfile("urls")
        assert member is not None
        return frozenset(line.decode("utf-8", "replace") for line in _list_lines(member.read()))


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def _word_list(name: str) -> frozenset[str]:
    """One of datatrove's shipped URL word lists (banned_words.txt, ...), normalised as datatrove does."""
    lines = (Path(ASSETS_PATH) / name).read_text().splitlines()
    return frozenset(w for line in lines if line and not line.startswith("#") and (w := _NON_ALNUM.sub("", line.lower())))


@cache
def _suffix_extractor():
    from tldextract import TLDExtract

    return TLDExtract(suffix_list_urls=(), cache_dir=None)  # the public-suffix snapshot in the wheel: no fetch


@dataclass
class UrlFilterSettings:
    """Where the blocklist comes from and which URL rules apply (each rule is its own drop reason).

    blocklist: "datatrove" (the list datatrove's wheel ships), "file" (`blocklist_file`) or "none".
    missing_url: "keep" (local HTML trees have none; counted as `no_url` in the stats) or "drop".
    """

    blocklist: str = "datatrove"
    blocklist_file: str | None = None
    extra_domains: list[str] = field(default_factory=list)
    blocked_urls: bool = True  # datatrove's list of whole URLs (with blocklist="datatrove")
    banned_words: bool = True  # datatrove's banned_words.txt: any as a URL word
    soft_banned_words: bool = True  # soft_banned_words.txt: `soft_word_threshold` of them
    soft_word_threshold: int = 2
    banned_subwords: bool = True  # banned_subwords.txt: any as a substring of the normalised URL
    missing_url: str = "keep"

    def __post_init__(self) -> None:
        if self.blocklist not in ("datatrove", "file", "none"):
            raise CurationConfigError(f"UrlFilterSettings.blocklist={self.blocklist!r}: use 'datatrove', 'file' or "
                                      "'none'", ["blocklist"])
        if self.blocklist == "file" and not self.blocklist_file:
            raise CurationConfigError("UrlFilterSettings.blocklist='file' needs blocklist_file (one domain per line)",
                                      ["blocklist_file"])
        if self.missing_url not in ("keep", "drop"):
            raise CurationConfigError(f"UrlFilterSettings.missing_url={self.missing_url!r}: use 'keep' or 'drop'",
                                      ["missing_url"])


class UrlFilter(BaseFilter):
    """datatrove's URLFilter rules over an offline, shared blocklist.

    Drop reasons: `url_blocked_domain` (the registered domain is listed), `url_blocked_subdomain` (the
    host or a parent of it below the registered domain is), `url_blocked_url`, `url_banned_word`,
    `url_soft_banned_words`, `url_banned_subword`, `url_missing` (missing_url="drop"). The URL is read
    from `metadata["url"]`.
    """

    name = "😈 URL filter (offline)"

    def __init__(self, settings: UrlFilterSettings | None = None, **overrides: Any):
        super().__init__()
        self.settings = replace(settings or UrlFilterSettings(), **overrides)
        self._loaded = False

    def _load(self) -> None:
        """Lazily, in the worker: the blocklist is memory-mapped, the word lists are small."""
        s = self.settings
        if s.blocklist == "datatrove":
            self.blocklist = DomainBlocklist.datatrove_shipped()
        elif s.blocklist == "file":
            self.blocklist = DomainBlocklist.from_file(s.blocklist_file)
        else:
            self.blocklist = DomainBlocklist(np.empty(0, dtype=np.uint64), "none")
        self.extra_domains = frozenset(d.strip().lower() for d in s.extra_domains if d.strip())
        self.urls = _datatrove_urls() if s.blocked_urls and s.blocklist == "datatrove" else frozenset()
        self.banned = _word_list("banned_words.txt") if s.banned_words else frozenset()
        self.soft_banned = _word_list("soft_banned_words.txt") if s.soft_banned_words else frozenset()
        subwords = _word_list("banned_subwords.txt") if s.banned_subwords else frozenset()
        self.subwords = re.compile("|".join(sorted(map(re.escape, subwords)))) if subwords else None
        self._loaded = True

    def _listed(self, name: str) -> bool:
        return name in self.extra_domains or name in self.blocklist

    def _url_listed(self, url: str, host: str) -> bool:
        """The list holds `host/path` without a scheme (datatrove compares whole URLs, so never matches)."""
        path = urlsplit(url if "//" in url else f"//{url}").path.rstrip("/")
        keys = {f"{host}{path}", f"{host.removeprefix('www.')}{path}"}
        return any(key.lower() in self.urls for key in keys)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not self._loaded:
            self._load()
        url = doc.metadata.get("url")
        if not url or not isinstance(url, str):
            self.stat_update("no_url")
            return (False, "url_missing") if self.settings.missing_url == "drop" else True
        host = (urlsplit(url if "//" in url else f"//{url}").hostname or "").rstrip(".").lower()
        registered = _suffix_extractor()(host).top_domain_under_public_suffix if host else ""
        if registered and self._listed(registered):
            return False, "url_blocked_domain"
        if host and host != registered:
            parts = host.split(".")
            stop = len(parts) - len(registered.split(".")) if registered else len(parts) - 1
            if any(self._listed(".".join(parts[i:])) for i in range(stop)):
                return False, "url_blocked_subdomain"
        if self.urls and self._url_listed(url, host):
            return False, "url_blocked_url"
        words = set(_NON_ALNUM.split(url.lower()))
        if words & self.banned:
            return False, "url_banned_word"
        if self.soft_banned and len(words & self.soft_banned) >= self.settings.soft_word_threshold:
            return False, "url_soft_banned_words"
        if self.subwords is not None and self.subwords.search(_NON_ALNUM.sub("", url.lower())):
            return False, "url_banned_subword"
        return True


# ---- C4 ---------------------------------------------------------------------------------------------------

NAUGHTY_WORDS = ("naughty-words", "1.2.0")  # npm: LDNOOBW's lists as <lang>.json, the lists C4 used
CJK_THAI = ("ja", "th", "zh")  # no word separators: matched as substrings (as datatrove does)
BADWORDS_ALLOWLIST = {"ja": {"sm", "グロ", "女の子"}, "zh": {"性"}}  # common subwords (datatrove's list)


def npm_package(name: str, version: str, cache_dir: Path | None = None) -> Path:
    """Unpacked root (`package/`) of an npm package, fetched once with `npm pack` into the download cache."""
    root = Path(cache_dir or download_cache_dir()) / "npm"
    target = root / "unpacked" / f"{name.replace('/', '+')}-{version}"
    if (target / ".complete").exists():
        return target / "package"
    if shutil.which("npm") is None:
        raise FileNotFoundError(f"npm package {name}@{version}: npm is not installed (apt-get install npm)")
    packs = root / "packs"
    packs.mkdir(parents=True, exist_ok=True)
    tarball = packs / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if not tarball.is_file():
        fresh = packs / f".{os.getpid()}.tmp"  # a folder per process: two workers may fetch at once
        fresh.mkdir(exist_ok=True)
        done = subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=fresh, capture_output=True,
                              text=True, timeout=600)
        packed = fresh / tarball.name
        if done.returncode != 0 or not packed.is_file():
            raise FileNotFoundError(f"npm pack {name}@{version} failed: {done.stderr.strip()[-500:]}")
        os.replace(packed, tarball)
        shutil.rmtree(fresh, ignore_errors=True)
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / ".complete").write_text(tarball.name + "\n")
    try:
        os.replace(tmp, target)
    except OSError:  # another process unpacked it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / ".complete").exists():
            raise
    return target / "package"


def bad_words(language: str, words_file: str | Path | None = None) -> frozenset[str]:
    """LDNOOBW's bad words of a language from the `naughty-words` npm package (or a user's JSON list / text
    file with one word a line), less datatrove's allowlist of common subwords."""
    path = Path(words_file) if words_file else npm_package(*NAUGHTY_WORDS) / f"{language}.json"
    if not path.is_file():
        raise FileNotFoundError(f"C4BadWordsSettings: no bad-word list for language {language!r} ({path}); "
                                "pass words_file or skip_missing_language=True")
    raw = path.read_text(encoding="utf-8")
    words = json.loads(raw) if path.suffix == ".json" else raw.splitlines()
    return frozenset(w.strip().lower() for w in words if w.strip()) - BADWORDS_ALLOWLIST.get(language, set())


@dataclass
class C4BadWordsSettings:
    default_language: str = "en"  # for documents without metadata["language"]
    words_file: str | None = None  # None: naughty-words/<language>.json
    skip_missing_language: bool = True  # a language without a list is kept and counted (`no_badwords_list`)


class C4BadWords(BaseFilter):
    """C4's bad-words rule: a page with any listed word (flanked by non-word characters; a substring in
    ja/th/zh) is dropped as `c4_bad_words`. Lists come from a package, never a run-time download."""

    name = "⛰ C4 bad words (shipped list)"

    def __init__(self, settings: C4BadWordsSettings | None = None, **overrides: Any):
        super().__init__()
        self.settings = replace(settings or C4BadWordsSettings(), **overrides)
        self._patterns: dict[str, re.Pattern | None] = {}

    def _pattern(self, language: str) -> re.Pattern | None:
        if language not in self._patterns:
            try:
                words = bad_words(language, self.settings.words_file)
            except FileNotFoundError:
                if not self.settings.skip_missing_language:
                    raise
                words = frozenset()
            alternatives = "|".join(sorted(map(re.escape, words), key=len, reverse=True))
            self._patterns[language] = None if not words else re.compile(
                alternatives if language in CJK_THAI else rf"(?:\W|^)(?:{alternatives})(?:\W|$)")
        return self._patterns[language]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        language = doc.metadata.get("language") or self.settings.default_language
        pattern = self._pattern(language)
        if pattern is None:
            self.stat_update("no_badwords_list")
            return True
        if pattern.search(doc.text.lower()):
            return False, "c4_bad_words"
        return True


POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
C4_END_PUNCTUATION = (".", "?", "!", '"', "'")


@dataclass
class C4Settings:
    """C4's rules (datatrove's C4QualityFilter defaults); -1 or False turns a rule off."""

    language: str = "en"
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class SpacySentences:
    """spaCy's rule-based sentencizer (what datatrove's spaCy tokenizer adds) on the warm blank pipeline."""

    def __init__(self, language: str):
        import_spacy()
        from spacy.pipeline import Sentencizer

        self.language = language
        self.sentencizer = Sentencizer()

    def split(self, text: str) -> list[str]:
        nlp = blank_nlp(self.language)
        nlp.max_length = len(text) + 10
        return [s.text.strip() for s in self.sentencizer(nlp.make_doc(text)).sents if s.text.strip()]


class C4Quality(BaseFilter):
    """C4's line rules (each removed line counted as `line_<rule>`), then page rules: `c4_lorem_ipsum`,
    `c4_curly_bracket`, `c4_too_few_sentences`. Kept pages hold only the kept lines."""

    name = "⛰ C4 quality (offline)"

    def __init__(self, settings: C4Settings | None = None, **overrides: Any):
        super().__init__()
        self.settings = replace(settings or C4Settings(), **overrides)
        self.sentences = SpacySentences(self.settings.language)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        s = self.settings
        kept, sentences = [], 0
        for raw_line in doc.text.splitlines():
            line = raw_line.strip()
            words = line.split()
            if s.max_word_length != -1 and any(len(w) > s.max_word_length for w in words):
                self.stat_update("line_too_long_word")
                continue
            if s.remove_citations:
                line = CITATION.sub("", line)
            if s.filter_no_terminal_punct and (not line.endswith(C4_END_PUNCTUATION) or line.endswith("...")):
                self.stat_update("line_no_terminal_punct")
                continue
            if len(words) < s.min_words_per_line:
                self.stat_update("line_too_few_words")
                continue
            lower = line.lower()
            if s.filter_lorem_ipsum and "lorem ipsum" in lower:
                return False, "c4_lorem_ipsum"
            if s.filter_javascript and "javascript" in lower:
                self.stat_update("line_javascript")
                continue
            if s.filter_curly_bracket and "{" in line:
                return False, "c4_curly_bracket"
            if s.filter_policy and any(p in lower for p in POLICY_PHRASES):
                self.stat_update("line_policy")
                continue
            if s.min_num_sentences != -1:
                sentences += len(self.sentences.split(line))
            kept.append(line)
        if s.min_num_sentences != -1 and sentences < s.min_num_sentences:
            return False, "c4_too_few_sentences"
        doc.text = "\n".join(kept).strip()
        return True


# ---- FineWeb ----------------------------------------------------------------------------------------------


@dataclass
class FineWebSettings:
    """datatrove's FineWebQualityFilter thresholds (FineWeb's)."""

    language: str = "en"
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3
    stop_chars: tuple[str, ...] = tuple(sorted(TERMINAL_PUNCTUATION))


class FinewebQuality(BaseFilter):
    """FineWeb's quality rules with a warm word splitter: `fineweb_empty`, `fineweb_line_punct_ratio`,
    `fineweb_short_line_ratio`, `fineweb_char_dup_ratio`, `fineweb_list_ratio` (newlines per word)."""

    name = "🍷 FineWeb quality (warm)"

    def __init__(self, settings: FineWebSettings | None = None, tokenizer: WordTokenizer | None = None,
                 **overrides: Any):
        super().__init__()
        self.settings = replace(settings or FineWebSettings(), **overrides)
        self.words = tokenizer or WarmSpacyTokenizer(self.settings.language)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        s = self.settings
        lines = [line for line in doc.text.split("\n") if line.strip()]
        if not lines:
            return False, "fineweb_empty"
        punct = sum(line.endswith(s.stop_chars) for line in lines) / len(lines)
        if punct < s.line_punct_thr and not (punct == 0 and s.line_punct_exclude_zero):
            return False, "fineweb_line_punct_ratio"
        if sum(len(line) <= s.short_line_length for line in lines) / len(lines) > s.short_line_thr:
            return False, "fineweb_short_line_ratio"
        chars = len(doc.text.replace("\n", ""))
        if find_duplicates(lines)[1] / max(chars, 1) > s.char_duplicates_ratio:
            return False, "fineweb_char_dup_ratio"
        words = self.words.word_tokenize(doc.text)
        if doc.text.count("\n") / max(len(words), 1) > s.new_line_ratio:
            return False, "fineweb_list_ratio"
        return True
