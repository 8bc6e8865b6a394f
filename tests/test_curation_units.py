"""Small, fast checks of curation's settings, accounting rules and errors (no corpus needed)."""

from __future__ import annotations

from curation.manifest import SourceEntry, StepStats


def test_accounting_compares_the_last_step_with_the_shards_even_when_there_are_none() -> None:
    lost = SourceEntry(name="math", kind="math", docs=0, steps=[StepStats("read", 5, 5), StepStats("dedup", 5, 4, {"dup": 1})])
    assert lost.check_accounting() == ["math: last step kept 4 but shards hold 0 docs"]
    empty = SourceEntry(name="math", kind="math", docs=0, steps=[StepStats("read", 3, 0, {"quarantine_bad": 3})])
    assert empty.check_accounting() == []
    assert SourceEntry(name="new", kind="web").check_accounting() == []  # no steps: nothing to compare
