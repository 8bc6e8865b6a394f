"""A lighter math recipe for the engine tests that interrupt a curation many times: the full recipe without
MinHash (still several stages chained: filters and decontamination, then exact dedup), so each trial costs
seconds of engine start-up fewer. Used through `mixlab curate --recipe math=engine_recipes:math_without_minhash`
with this folder on PYTHONPATH."""

from __future__ import annotations

from pathlib import Path

from mixlab.curation import SourcePipelines
from mixlab.pipelines.math import MathRecipe, math_pipeline


def math_without_minhash(raw_dir: str | Path, curated_dir: str | Path, tasks: int = 2) -> SourcePipelines:
    return math_pipeline(raw_dir, curated_dir, "math", tasks, MathRecipe(minhash=None))
