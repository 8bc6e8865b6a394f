"""Downstream cloze tasks built from a curated dataset's held-out documents, scored at every proxy eval.

`build_tasks(curated_dir)` writes `<curated>/tasks/*.jsonl` and `tasks.json`; `load_tasks(dir)` reads them back;
`ClozeEvaluator.for_curated(curated_dir, max_seq_len)` loads (or first builds) them with the dataset's tokenizer
and `.evaluate(model)` returns one row per task: accuracy, margin, items, chance.
"""

from mixlab.ablations.tasks.builders import DEFAULT_MAX_ITEMS, MIN_ITEMS, build_tasks, held_out_split
from mixlab.ablations.tasks.cloze import ClozeEvaluator
from mixlab.ablations.tasks.items import INDEX_NAME, ClozeItem, ClozeTask, TaskFileError, load_tasks

__all__ = [
    "DEFAULT_MAX_ITEMS",
    "INDEX_NAME",
    "MIN_ITEMS",
    "ClozeEvaluator",
    "ClozeItem",
    "ClozeTask",
    "TaskFileError",
    "build_tasks",
    "held_out_split",
    "load_tasks",
]
