"""HTML → text with datatrove's Trafilatura, where a failed page is quarantined instead of vanishing."""

from __future__ import annotations

import contextlib
import re
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.utils.typeshelper import StatHints
from mixlab.curation.readers import QUARANTINE_PREFIX, quarantine_document, quarantine_writer

EXTRACT_TIMEOUT_S = 10.0  # a page that takes longer is quarantined as `extract_timeout`
MAX_HTML_DEPTH = 200  # libxml2 (under trafilatura and lxml) stops a tree at 256 levels and loses what is below
CLOSE_LOOKBACK = 64  # open tags a closing tag is matched against (a stray one is left alone)
_TAG = re.compile(rb"<(/?)([A-Za-z][A-Za-z0-9:-]*)[^>]*?(/?)>")
_VOID = {b"area", b"base", b"br", b"col", b"embed", b"hr", b"img", b"input", b"link", b"meta", b"param", b"source",
         b"track", b"wbr"}


def flatten_deep_html(html: str, max_depth: int = MAX_HTML_DEPTH, keep_run: int = 16) -> str | None:
    """`html` with its excess nesting removed (the text stays), or None when it is not nested deeper than
    `max_depth`. A page of 100,000 nested divs extracts to nothing otherwise: the parser drops everything
    below its depth limit.

    Two rules, in one linear pass over the tags (time and memory proportional to the page): of a run of
    opening tags with no text between them, only the last `keep_run` are kept (wrappers go, the page's own
    structure stays), and no tag is kept deeper than `max_depth`. A closing tag goes with its opening tag.
    """
    data = html.encode("utf-8", "surrogatepass")
    matches = [m for m in _TAG.finditer(data) if m.group(2).lower() not in _VOID and not m.group(3)]
    dropped = bytearray(len(matches))
    stack: list[int] = []  # open tags, innermost last
    run: list[int] = []
    depth = deepest = kept_depth = 0
    previous_end = 0

    def flush() -> None:
        nonlocal kept_depth
        for n, index in enumerate(run):
            if n < len(run) - keep_run or kept_depth >= max_depth:
                dropped[index] = 1
            else:
                kept_depth += 1
        run.clear()

    for index, match in enumerate(matches):
        if data[previous_end:match.start()].strip() or match.group(1):
            flush()
        previous_end = match.end()
        name = match.group(2).lower()
        if not match.group(1):
            stack.append(index)
            run.append(index)
            depth += 1
            deepest = max(deepest, depth)
            continue
        top = range(len(stack) - 1, max(-1, len(stack) - 1 - CLOSE_LOOKBACK), -1)  # bounded: no quadratic page
        opened = next((i for i in top if matches[stack[i]].group(2).lower() == name), None)
        if opened is None:
            continue
        dropped[index] = dropped[stack[opened]]
        for popped in stack[opened:]:
            kept_depth -= 0 if dropped[popped] else 1
        depth -= len(stack) - opened
        del stack[opened:]
    flush()
    if deepest <= max_depth:
        return None
    pieces, last = [], 0
    for index, match in enumerate(matches):
        if dropped[index]:
            pieces.append(data[last:match.start()])
            last = match.end()
    pieces.append(data[last:])
    return b"".join(pieces).decode("utf-8", "surrogatepass")


class QuarantiningTrafilatura(Trafilatura):
    """datatrove's Trafilatura step, but every input is accounted for.

    The stock extractor skips a page that times out or raises and counts it under a stat that is not a
    drop. Here such a page is written to quarantine and counted as `dropped_quarantine_<why>`; a page
    that extracts to nothing is an ordinary drop (`dropped_empty_extraction`).

    A page that extracts to nothing because it is nested deeper than the parser goes is flattened
    (`flatten_deep_html`) and extracted again, within the same timeout; that it was is counted as
    `flattened_deep_html` in the step's stats.

    `deduplicate` defaults to False: trafilatura's paragraph cache makes a page's text depend on the pages
    the same worker saw before it, so the output would change with the number of tasks.
    """

    name = "⛏ Trafilatura (quarantining)"

    def __init__(self, quarantine_folder: DataFolderLike, timeout: float = EXTRACT_TIMEOUT_S, deduplicate: bool = False,
                 favour_precision: bool = True, **kwargs: Any):
        super().__init__(favour_precision=favour_precision, timeout=timeout, deduplicate=deduplicate, **kwargs)
        self.quarantine = quarantine_writer(quarantine_folder, "extract")
        self.exclusion_writer = None  # set by `attach_drop_samples`: pages that extracted to nothing, as examples

    def _quarantine(self, doc, reason: str, error: str, rank: int) -> None:
        self.stat_update(StatHints.dropped, f"dropped_{QUARANTINE_PREFIX}{reason}")
        self.quarantine.write(quarantine_document(doc.id, doc.text, reason, "extract", error=error,
                                                  source=doc.metadata.get("source")), rank)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with (ExtractorSandbox(timeout=self.timeout, warmup_text="") as extractor, self.quarantine,
              self.exclusion_writer or contextlib.nullcontext()):
            for doc in data:
                self.stat_update(StatHints.total)
                with self.track_time():
                    try:
                        text = extractor.process_document(doc.text, self.extract)
                        if not (text and text.strip()) and (flat := flatten_deep_html(doc.text)) is not None:
                            text = extractor.process_document(flat, self.extract)
                            self.stat_update("flattened_deep_html")
                    except TimeoutError as err:
                        self._quarantine(doc, "extract_timeout", str(err), rank)
                        continue
                    except EOFError as err:
                        self._quarantine(doc, "extract_crashed", str(err), rank)
                        continue
                    except Exception as err:  # noqa: BLE001 - any extractor failure is quarantined, never fatal
                        self._quarantine(doc, "extract_error", repr(err), rank)
                        continue
                if text and text.strip():
                    doc.text = text
                    self.stat_update(StatHints.forwarded)
                    self.update_doc_stats(doc)
                    yield doc
                else:
                    self.stat_update(StatHints.dropped, "dropped_empty_extraction")
                    if self.exclusion_writer is not None:
                        doc.metadata["filter_reason"] = "empty_extraction"
                        self.exclusion_writer.write(doc, rank)
