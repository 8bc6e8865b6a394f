"""PII redaction: e-mail addresses, IP addresses and phone numbers replaced by placeholders, counted.

E-mail and IP patterns are datatrove's (`PIIFormatter`), with its public-IP check: private and loopback
addresses (127.0.0.1, 10.x, 192.168.x) are not personal and stay. datatrove has no phone rule; ours asks
for phone-like grouping and enough digits, and rejects what reads as an IP address, so that versions
(3.11.2), dates (2002-08-22) and times are left alone. Documents are always kept; the step's stats count
the redactions per type (`pii_email`, `pii_ip`, `pii_phone`) and the documents that had any (`docs_with_pii`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters.pii import PIIFormatter, public_ip_validator

_DATATROVE = PIIFormatter()
EMAIL_PATTERN: re.Pattern = _DATATROVE.emails_replacer.regex
# datatrove's IP pattern, bounded so that it does not match inside longer dotted numbers (1.2.3.4.5)
IP_PATTERN = re.compile(rf"(?<![\w.])(?:{_DATATROVE.ip_replacer.regex.pattern})(?![\w]|\.\d)")
# +CC (optional), then 2-5 groups of digits split by one space, '-', '.' or a parenthesised area code
PHONE_PATTERN = re.compile(
    r"(?<![\w.+/-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\d{1,4}[ .-])(?:\d{2,4}[ .-]){0,3}\d{3,4}(?![\w]|[.-]\w)"
)
_DOTTED_NANP = re.compile(r"^(?:\d\.)?\d{3}\.\d{3}\.\d{4}$")
_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")


def is_phone_number(candidate: str, min_digits: int = 10, min_digits_international: int = 8) -> bool:
    """Phone-like grouping is necessary, not enough: 10-15 digits (E.164's limit), 8+ after a `+`; not a
    date, not an IP address (dotted or dashed), one kind of separator after an area code, and dots only in
    the 3.3.4 form or after a `+` (other dotted numbers are versions)."""
    digits = sum(ch.isdigit() for ch in candidate)
    if digits > 15 or digits < (min_digits_international if candidate.startswith("+") else min_digits):
        return False
    if _DATE.match(candidate):
        return False
    try:
        ipaddress.ip_address(candidate)
        return False
    except ValueError:
        pass
    body = candidate.split(")", 1)[-1] if "(" in candidate else candidate.lstrip("+")
    separators = set(re.findall(r"[ .-]", body.strip(" .-")))
    if len(separators) > 1:
        return False
    groups = re.findall(r"\d+", candidate)
    if len(groups) == 4 and all(len(g) <= 3 and int(g) <= 255 for g in groups):
        return False  # an IP address written with another separator (host names: 80-24-132-206)
    if separators == {"."} and not candidate.startswith("+") and not _DOTTED_NANP.match(candidate):
        return False  # dotted numbers are versions (6.00.2600.0000) unless in the 3.3.4 phone form
    return True


@dataclass
class PiiSettings:
    emails: bool = True
    ips: bool = True
    phones: bool = True
    only_public_ips: bool = True  # datatrove's default: private/loopback addresses are not PII
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP_ADDRESS>"
    phone_placeholder: str = "<PHONE_NUMBER>"
    phone_min_digits: int = 10


class PiiRedaction(BaseFilter):
    """Replaces e-mails, then phone numbers, then IP addresses (phones first so that a redacted IP
    placeholder is never read as a phone), and never drops a document."""

    name = "📞 PII redaction"

    manifest_counts = ("pii_", "docs_with_pii")  # redactions per type go into the manifest's step counts

    def __init__(self, settings: PiiSettings | None = None, **overrides: Any):
        super().__init__()
        self.settings = replace(settings or PiiSettings(), **overrides)
        s = self.settings
        self.rules: list[tuple[str, re.Pattern, Callable[[str], bool] | None, str]] = []
        if s.emails:
            self.rules.append(("email", EMAIL_PATTERN, None, s.email_placeholder))
        if s.phones:
            self.rules.append(("phone", PHONE_PATTERN, lambda m: is_phone_number(m, s.phone_min_digits), s.phone_placeholder))
        if s.ips:
            self.rules.append(("ip", IP_PATTERN, lambda m: public_ip_validator(m, s.only_public_ips), s.ip_placeholder))

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """The redacted text and how many of each type were replaced."""
        counts: dict[str, int] = {}
        for kind, pattern, valid, placeholder in self.rules:
            pieces, last, found = [], 0, 0
            for match in pattern.finditer(text):
                if valid is not None and not valid(match.group(0)):
                    continue
                pieces += [text[last:match.start()], placeholder]
                last, found = match.end(), found + 1
            if found:
                text = "".join(pieces) + text[last:]
            counts[kind] = found
        return text, counts

    def filter(self, doc: Document) -> bool:
        doc.text, counts = self.redact(doc.text)
        for kind, n in counts.items():
            if n:
                self.stat_update(f"pii_{kind}", value=n)
                self.stat_update(f"docs_with_pii_{kind}")
        if any(counts.values()):
            self.stat_update("docs_with_pii")
        return True
