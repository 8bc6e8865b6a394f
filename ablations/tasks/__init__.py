"""Downstream cloze tasks built from a curated dataset's held-out documents, scored at every proxy eval.

`build_tasks(curated_dir)` writes `<curated>/tasks/*.jsonl` and `tasks.json`; `load_tasks(dir)` reads them back;
`ClozeEvaluator.for_curated(curated_dir, max_seq_len)` loads (or first builds) them with the dataset's tokenizer
and `.evaluate(model)` returns one row per task: accuracy, margin, items, chance.
"""

from __future__ import annotations

from mixlab.curation.lazy_exports import lazy_exports

# imported on first use (curation/lazy_exports.py): module -> the names it provides
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "mixlab.ablations.tasks.builders": ("DEFAULT_MAX_ITEMS", "MIN_ITEMS", "build_tasks", "held_out_split",),
    "mixlab.ablations.tasks.cloze": ("ClozeEvaluator",),
    "mixlab.ablations.tasks.items": ("INDEX_NAME", "ClozeItem", "ClozeTask", "TaskFileError", "load_tasks",),
})
