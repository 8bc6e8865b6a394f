"""Multilingual curation on real pages: splitters equal to datatrove's, FineWeb-2 thresholds, the recipe."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from datatrove.data import Document
from datatrove.utils.word_tokenizers import load_word_tokenizer
from mixlab.curation.accounting import step_stats
from mixlab.curation.lid import derive_language_threshold, language_scores
from mixlab.curation.multilingual import (
    DEFAULT_TAIL,
    LANGUAGE_COUNT_FIELDS,
    LanguageStatsStep,
    derive_stop_words,
    derive_thresholds,
    document_metrics,
    language_statistics,
    multilingual_filters,
    statistics_from_counts,
)
from mixlab.curation.text import (
    ScriptRunTokenizer,
    SpacySentencizerTokenizer,
    WarmSpacyTokenizer,
    datatrove_assignment,
    offline_word_tokenizer,
)
from mixlab.pipelines.multilingual import (
    LANGUAGE_SOURCES,
    MULTILINGUAL_LANGUAGES,
    curate_languages,
    extracted_texts,
    language_documents,
    multilingual_pipeline,
)

SAMPLE_DOCS = 30
EQUALITY_DOCS = SAMPLE_DOCS
SPACY_LANGUAGES = ("en", "de", "fr", "es", "ru", "zh", "he")  # datatrove's spaCy assignment works offline


@pytest.fixture(scope="module")
def samples() -> dict[str, list[str]]:
    """Extracted text of real offline documents per language (LibreOffice help; Hebrew dialogues)."""
    return {lang: extracted_texts(language_documents(lang, SAMPLE_DOCS + 4), LANGUAGE_SOURCES[lang].html)
            for lang in MULTILINGUAL_LANGUAGES}


def test_the_corpus_covers_latin_cyrillic_cjk_and_right_to_left(samples: dict[str, list[str]]) -> None:
    for lang, texts in samples.items():
        assert len(texts) >= SAMPLE_DOCS, lang
    assert any(re.search(r"[\u3040-\u30ff]", t) for t in samples["ja"])  # kana
    assert any(re.search(r"[\u4e00-\u9fff]", t) for t in samples["zh"])
    assert any(re.search(r"[\u0590-\u05ff]", t) for t in samples["he"])  # Hebrew letters
    assert any(re.search(r"[\u0400-\u04ff]", t) for t in samples["ru"])


def test_splitter_choice_follows_datatrove_assignment() -> None:
    assert datatrove_assignment("zh") == ("SpaCyTokenizer", "xx")  # multi-language, not spacy.blank("zh")
    assert datatrove_assignment("ar") == ("SpaCyTokenizer", "xx")
    for lang in SPACY_LANGUAGES:
        splitter = offline_word_tokenizer(lang)
        assert isinstance(splitter, SpacySentencizerTokenizer), lang
        assert splitter.spacy_code == datatrove_assignment(lang)[1]
    assert isinstance(offline_word_tokenizer("ja"), ScriptRunTokenizer)
    with pytest.raises(ValueError, match="tokenizer_assignment"):
        offline_word_tokenizer("not-a-language")


@pytest.mark.parametrize("lang", SPACY_LANGUAGES)
def test_words_sentences_and_spans_equal_datatrove(samples: dict[str, list[str]], lang: str) -> None:
    ours, theirs = offline_word_tokenizer(lang), load_word_tokenizer(lang)
    texts = samples[lang][:EQUALITY_DOCS]
    for text in texts:
        assert ours.word_tokenize(text) == theirs.word_tokenize(text)
        assert ours.sent_tokenize(text) == theirs.sent_tokenize(text)
        assert ours.span_tokenize(text) == theirs.span_tokenize(text)
    assert sum(len(ours.sent_tokenize(t)) for t in texts) > len(texts)  # real multi-sentence pages


def test_arabic_script_text_splits_as_datatrove_does() -> None:
    """No Arabic pages offline: the Persian and Urdu dialogues are Arabic script, which datatrove's `ar`
    assignment (spaCy `xx`) splits; ours must split them the same way."""
    from mixlab.pipelines.corpus import CHATTERBOT_WHEEL, Downloads, default_cache_dir

    root = Downloads(default_cache_dir()).wheel(*CHATTERBOT_WHEEL) / "chatterbot_corpus" / "data"
    texts = [p.read_text(encoding="utf-8") for folder in ("persian", "urdu") for p in sorted((root / folder).glob("*.yml"))]
    assert texts and any(re.search(r"[\u0600-\u06ff]", t) for t in texts)
    ours, theirs = offline_word_tokenizer("ar"), load_word_tokenizer("ar")
    for text in texts[:6]:
        assert ours.word_tokenize(text) == theirs.word_tokenize(text)
        assert ours.sent_tokenize(text) == theirs.sent_tokenize(text)


def test_warm_tokenizer_regex_sentences_are_not_datatrove_sentences(samples: dict[str, list[str]]) -> None:
    """Why the sentencizer: the legacy WarmSpacyTokenizer (unchanged, same words) splits sentences by regex,
    which differs from datatrove's sentencizer on real pages."""
    legacy, ours = WarmSpacyTokenizer("en"), offline_word_tokenizer("en")
    texts = samples["en"][:EQUALITY_DOCS]
    assert all(legacy.word_tokenize(t) == ours.word_tokenize(t) for t in texts)
    assert any(legacy.sent_tokenize(t) != ours.sent_tokenize(t) for t in texts)


def test_japanese_needs_a_download_in_datatrove_and_the_regex_splitter_is_lossless(
        samples: dict[str, list[str]]) -> None:
    with pytest.raises(ImportError, match="(?i)sudachi"):
        load_word_tokenizer("ja").word_tokenize("東京です。")
    words_of = offline_word_tokenizer("ja")
    seen: set[str] = set()
    for text in samples["ja"][:EQUALITY_DOCS]:
        words = words_of.word_tokenize(text)
        seen.update(words)
        assert "".join(words) == re.sub(r"\s+", "", text)  # every character is in exactly one word
        sentences = words_of.sent_tokenize(text)
        assert "".join(sentences).replace(" ", "") == re.sub(r"\s+", "", text)
        assert all(text[a:b] == s for (a, b), s in zip(words_of.span_tokenize(text), sentences, strict=True))
    assert {"の", "を", "は"} <= seen  # particles come out on their own, not glued to the kanji before them


def test_thresholds_are_quantiles_of_each_language(samples: dict[str, list[str]]) -> None:
    derived = {lang: derive_thresholds(samples[lang][:SAMPLE_DOCS], lang) for lang in ("en", "de", "ru")}
    assert derived["de"].max_avg_word_length > derived["en"].max_avg_word_length  # German compounds
    for lang, th in derived.items():
        words_of = offline_word_tokenizer(lang)
        metrics = [document_metrics(t, words_of) for t in samples[lang][:SAMPLE_DOCS]]
        too_long = sum(m["avg_word_length"] > th.max_avg_word_length for m in metrics)
        too_short = sum(m["avg_word_length"] < th.min_avg_word_length for m in metrics)
        assert too_long <= DEFAULT_TAIL * len(metrics) + 1 and too_short <= DEFAULT_TAIL * len(metrics) + 1
        assert th.sample_docs == SAMPLE_DOCS and "quantile" in th.method
        docs = [Document(text=t, id=str(i)) for i, t in enumerate(samples[lang][:SAMPLE_DOCS])]
        for step in multilingual_filters(th, words_of):
            docs = list(step.run(iter(docs), rank=0, world_size=1))
            per_rule = {k: v.total for k, v in step.stats.stats.items()
                        if k.startswith("dropped_") and k != "dropped_gopher_enough_stop_words"}
            assert all(n <= DEFAULT_TAIL * SAMPLE_DOCS + 1 for n in per_rule.values()), per_rule
        assert 0.5 * SAMPLE_DOCS <= len(docs) < SAMPLE_DOCS  # each rule drops its tail, not the language
    with pytest.raises(ValueError, match="tail"):
        derive_thresholds(samples["en"], "en", tail=0.7)
    with pytest.raises(ValueError, match="at least"):
        derive_thresholds(samples["en"][:3], "en")


def test_stop_words_are_widespread_and_not_english(samples: dict[str, list[str]]) -> None:
    for lang in ("de", "ru", "en"):
        words_of = offline_word_tokenizer(lang)
        word_sets = [set(words_of.word_tokenize(t)) for t in samples[lang]]
        stop_words = derive_stop_words([list(s) for s in word_sets], lang)
        assert len(stop_words) >= 5, lang
        assert all(sum(w in s for s in word_sets) >= 0.3 * len(word_sets) for w in stop_words)
        if lang == "ru":
            assert not any(re.search(r"[A-Za-z]", w) for w in stop_words)
        if lang == "de":
            assert {"der", "die", "und"} & set(stop_words) and "the" not in stop_words
        if lang == "en":
            assert "the" in stop_words


def test_language_id_threshold_comes_from_the_score_distribution(samples: dict[str, list[str]]) -> None:
    cuts = {}
    for lang in ("en", "de", "ja", "he"):
        scores = language_scores(samples[lang], lang)
        assert len(scores) >= 0.5 * len(samples[lang]), lang  # lid.176 knows the language
        cuts[lang] = derive_language_threshold(scores)
        kept = sum(s >= cuts[lang] for s in scores)
        assert kept >= 0.6 * len(scores)
        assert 0.3 <= cuts[lang] <= 0.9
    assert len(set(cuts.values())) > 1  # not one global cut
    with pytest.raises(ValueError, match="empty"):
        derive_language_threshold([])
    with pytest.raises(ValueError, match="probabilities"):
        derive_language_threshold([0.5, 3.0])


def test_statistics_per_language(samples: dict[str, list[str]]) -> None:
    stats = {lang: language_statistics(samples[lang][:10], lang).summary() for lang in ("en", "zh", "ja")}
    for lang, s in stats.items():
        assert s["docs"] == 10 and s["words"] > 0 and s["sentences"] >= 10, lang
    # the xx splitter keeps a Chinese clause as one word: far fewer, longer "words" than English
    assert stats["zh"]["mean_word_length"] > stats["ja"]["mean_word_length"]
    step = LanguageStatsStep("en")
    docs = [Document(text=t, id=str(i), metadata={"language": "de"}) for i, t in enumerate(samples["de"][:5])]
    docs.append(Document(text=samples["en"][0], id="en", metadata={}))  # no language: the default one
    assert len(list(step.run(iter(docs)))) == 6
    assert step.statistics["de"].docs == 5 and step.stats["lang_de_words"].total == step.statistics["de"].words
    # the stats keys are what the manifest keeps (manifest_counts): the statistics come back from them whole
    counts = step_stats("language_stats_step", step.stats.stats, step.manifest_counts).counts
    assert set(counts) == {f"lang_{lang}_{f}" for lang in ("de", "en") for f in LANGUAGE_COUNT_FIELDS}
    rebuilt = statistics_from_counts(counts)
    assert {lang: s.summary() for lang, s in rebuilt.items()} == {
        lang: s.summary() for lang, s in step.statistics.items()}
    assert rebuilt["de"].summary() == language_statistics(samples["de"][:5], "de").summary()


def test_recipe_runs_per_language_and_is_counted(tmp_path: Path) -> None:
    from mixlab.curation.stages import SourceLayout

    raw, curated = tmp_path / "raw", tmp_path / "curated"
    console = io.StringIO()
    manifest = curate_languages(raw, curated, ("ja", "he"), docs_per_language=40, console=console)
    assert manifest.check() == []
    printed = console.getvalue()
    for lang in ("ja", "he"):
        entry = manifest.source(f"multi-{lang}")
        names = [s.name for s in entry.steps]
        assert names[0] == "read" and names[-1] == "minhash_dedup"
        assert 0 < entry.docs < 40
        assert set(entry.languages) == {lang}
        assert list(SourceLayout(f"multi-{lang}", Path(), curated).output.glob("*.parquet"))
        # the per-language statistics are in the manifest, counted by the step itself
        step = entry.steps[names.index("language_stats_step")]
        stats = statistics_from_counts(step.counts)
        assert set(stats) == {lang} and stats[lang].docs == step.docs_in == step.kept
        assert stats[lang].words > stats[lang].docs and stats[lang].sentences >= stats[lang].docs
        # recomputed on the written shards (MinHash may have dropped some after the step): never more
        kept = language_statistics(shard_texts(curated, f"multi-{lang}"), lang)
        assert kept.docs == entry.docs
        assert kept.words <= stats[lang].words and (kept.words == stats[lang].words) == (kept.docs == stats[lang].docs)
        summary = stats[lang].summary()
        assert f"{lang:4s} {summary['docs']:6,d} docs" in printed
        assert f"{summary['mean_words_per_doc']:8.1f} words/doc" in printed
    raw, curated = tmp_path / "raw2", tmp_path / "curated2"
    config = multilingual_pipeline(raw, curated, "zh").config
    assert config["splitter"] == "SpacySentencizerTokenizer" and config["splitter_code"] == "xx"


def shard_texts(curated: Path, source: str) -> list[str]:
    import pyarrow.parquet as pq
    from mixlab.curation.stages import SourceLayout

    return [t for path in sorted(SourceLayout(source, Path(), curated).output.glob("*.parquet"))
            for t in pq.read_table(path, columns=["text"]).column(0).to_pylist()]
