"""Recipe: real preference pairs derived from curated dialogues (no wheel ships a preference dataset).

Two derivations, both deterministic for a seed:
- worked answers (GSM8K dialogues of the `chat-reasoning` source): chosen is the true reasoning and answer,
  rejected the same reasoning whose final result is changed to a wrong number, so the pair differs exactly
  where correctness lives;
- dialogues: chosen is a dialogue's own reply, rejected the reply of another dialogue of the same source and
  language (an off-topic answer), the prompt the turns before it.

Written in the preference JSONL format (`training.posttrain.preferences`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from mixlab.training.posttrain import (
    Dialogue,
    PreferenceRecord,
    read_curated_dialogues,
    read_dialogues_jsonl,
    write_preferences,
)

_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?!.*\d)", re.S)


def corrupt_number(value: str, rng: np.random.Generator) -> str:
    """A different number near `value` (an off-by-some error, the kind a model makes)."""
    number = float(value.replace(",", ""))
    delta = int(rng.choice([-10, -2, -1, 1, 2, 10]))
    wrong = number + delta if number.is_integer() else round(number * (1 + delta / 20), 2)
    return str(int(wrong)) if float(wrong).is_integer() else str(wrong)


def worked_answer_pair(dialogue: Dialogue, rng: np.random.Generator) -> PreferenceRecord | None:
    reply = dialogue.messages[-1]
    if reply.get("role") != "assistant" or not reply.get("reasoning"):
        return None
    match = _LAST_NUMBER.search(reply["content"])
    if match is None:
        return None
    wrong = corrupt_number(match.group(0), rng)
    rejected = {"content": reply["content"][:match.start()] + wrong + reply["content"][match.end():],
                "reasoning": _replace_last(reply["reasoning"], match.group(0), wrong)}
    chosen = {"content": reply["content"], "reasoning": reply["reasoning"]}
    return PreferenceRecord(f"{dialogue.id}/wrong-answer", dialogue.source, dialogue.messages[:-1], (chosen, rejected))


def _replace_last(text: str, old: str, new: str) -> str:
    at = text.rfind(old)
    return text if at < 0 else text[:at] + new + text[at + len(old):]


def other_reply_pairs(dialogues: Sequence[Dialogue], rng: np.random.Generator) -> list[PreferenceRecord]:
    """Each dialogue's last reply against the last reply of another dialogue of its source and language."""
    by_source: dict[tuple[str, str | None], list[Dialogue]] = defaultdict(list)
    for d in dialogues:
        if len(d.messages) >= 2 and d.messages[-1].get("role") == "assistant":
            by_source[d.source, d.language].append(d)
    pairs = []
    for group in by_source.values():
        if len(group) < 2:
            continue
        order = rng.permutation(len(group))
        for i, d in enumerate(group):
            other = group[order[i]] if order[i] != i else group[(i + 1) % len(group)]
            if other.messages[-1]["content"] == d.messages[-1]["content"]:
                continue  # the same reply (a duplicate answer): no preference
            pairs.append(PreferenceRecord(f"{d.id}/other-reply", d.source, d.messages[:-1],
                                          ({"content": d.messages[-1]["content"]},
                                           {"content": other.messages[-1]["content"]})))
    return pairs


def derive_preference_pairs(data: str | Path, out: str | Path, seed: int = 0,
                            max_pairs: int | None = None) -> tuple[Path, dict[str, int]]:
    """Pairs from a curated directory's chat sources (or a dialogue JSONL) into `out`; returns (path, counts)."""
    path = Path(data)
    dialogues = (read_curated_dialogues(path) if path.is_dir() else read_dialogues_jsonl(path)).dialogues
    rng = np.random.default_rng(seed)
    worked = [p for d in dialogues if (p := worked_answer_pair(d, rng)) is not None]
    plain = other_reply_pairs([d for d in dialogues if not d.messages[-1].get("reasoning")], rng)
    pairs = worked + plain
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
    if not pairs:
        raise ValueError(f"{data}: no preference pair could be derived (no dialogue with a reply to contrast)")
    return write_preferences(pairs, out), {"worked_answer": len(worked), "other_reply": len(plain),
                                           "written": len(pairs)}
