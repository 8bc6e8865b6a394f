"""HTML → text with datatrove's Trafilatura, where a failed page is quarantined instead of vanishing."""

from __future__ import annotations

from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.utils.typeshelper import StatHints
from mixlab.curation.readers import QUARANTINE_PREFIX, quarantine_document, quarantine_writer

EXTRACT_TIMEOUT_S = 10.0  # a page that takes longer is quarantined as `extract_timeout`


class QuarantiningTrafilatura(Trafilatura):
    """datatrove's Trafilatura step, but every input is accounted for.

    The stock extractor skips a page that times out or raises and counts it under a stat that is not a
    drop. Here such a page is written to quarantine and counted as `dropped_quarantine_<why>`; a page
    that extracts to nothing is an ordinary drop (`dropped_empty_extraction`).

    `deduplicate` defaults to False: trafilatura's paragraph cache makes a page's text depend on the pages
    the same worker saw before it, so the output would change with the number of tasks.
    """

    name = "⛏ Trafilatura (quarantining)"

    def __init__(self, quarantine_folder: DataFolderLike, timeout: float = EXTRACT_TIMEOUT_S, deduplicate: bool = False,
                 favour_precision: bool = True, **kwargs: Any):
        super().__init__(favour_precision=favour_precision, timeout=timeout, deduplicate=deduplicate, **kwargs)
        self.quarantine = quarantine_writer(quarantine_folder, "extract")

    def _quarantine(self, doc, reason: str, error: str, rank: int) -> None:
        self.stat_update(StatHints.dropped, f"dropped_{QUARANTINE_PREFIX}{reason}")
        self.quarantine.write(quarantine_document(doc.id, doc.text, reason, "extract", error=error,
                                                  source=doc.metadata.get("source")), rank)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with ExtractorSandbox(timeout=self.timeout, warmup_text="") as extractor, self.quarantine:
            for doc in data:
                self.stat_update(StatHints.total)
                with self.track_time():
                    try:
                        text = extractor.process_document(doc.text, self.extract)
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
