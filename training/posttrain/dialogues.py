"""Dialogues for post-training: read from a JSONL file or from a curated chat source (its Parquet shards).

JSONL, one dialogue per line:
    {"id": "d1", "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "...",
     "reasoning": "optional chain of thought"}], "think": false, "source": "chat"}
`think` (optional) fixes the dialogue's reasoning mode; `source` defaults to the file's stem.

Curated chat shards hold dialogues as text, one `User:` / `Assistant:` line per turn (lines without a prefix
continue the turn above), the format `mixlab corpus fetch` writes and the chat recipe checks. A GSM8K worked
answer (`... #### 42`) becomes reasoning plus the final answer, so the same dialogue trains both modes.

A record that cannot be read is skipped and counted by reason (`DialogueSet.rejected`), never silently lost.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLE_PREFIXES = {"User:": "user", "Assistant:": "assistant", "System:": "system"}
_WORKED_ANSWER = re.compile(r"^(?P<steps>.*?)\s*####\s*(?P<final>-?[\d,]+(?:\.\d+)?)\s*$", re.S)
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations


@dataclass
class Dialogue:
    id: str
    messages: list[dict[str, str]]
    source: str
    think: bool | None = None
    language: str | None = None


@dataclass
class DialogueSet:
    dialogues: list[Dialogue] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)  # reason -> records skipped
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one record it happened to ("file:line")

    def reject(self, reason: str, where: str) -> None:
        self.rejected[reason] += 1
        self.examples.setdefault(reason, where)

    def extend(self, other: DialogueSet) -> None:
        self.dialogues += other.dialogues
        self.rejected.update(other.rejected)
        for reason, where in other.examples.items():
            self.examples.setdefault(reason, where)


def parse_dialogue_text(text: str) -> list[dict[str, str]]:
    """`User: ...` / `Assistant: ...` lines as messages; an unprefixed line continues the turn above."""
    messages: list[dict[str, str]] = []
    for line in text.splitlines():
        prefix = next((p for p in ROLE_PREFIXES if line.startswith(p)), None)
        if prefix is not None:
            messages.append({"role": ROLE_PREFIXES[prefix], "content": line[len(prefix):].strip()})
        elif messages:
            messages[-1]["content"] += "\n" + line
        elif line.strip():
            raise ValueError("text before the first User:/Assistant: line")
    for message in messages:
        message["content"] = message["content"].strip()
    return messages


def split_worked_answer(answer: str) -> dict[str, str] | None:
    """A GSM8K answer ("steps ... #### 42") as {"reasoning": the steps, "content": "The answer is 42."}."""
    match = _WORKED_ANSWER.match(answer.strip())
    if match is None:
        return None
    steps = _CALCULATOR.sub("", match.group("steps")).strip()
    return {"reasoning": steps, "content": f"The answer is {final_number(answer)}."}


def final_number(answer: str) -> str | None:
    """The final number of a GSM8K answer, or of a model's reply ("... The answer is 42."), commas removed."""
    match = _WORKED_ANSWER.match(answer.strip())
    if match is not None:
        return match.group("final").replace(",", "")
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", answer)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def gsm8k_dialogue(question: str, answer: str) -> list[dict[str, str]]:
    parts = split_worked_answer(answer) or {"content": answer.strip()}
    return [{"role": "user", "content": question.strip()}, {"role": "assistant", **parts}]


def held_out(dialogue_id: str, fraction: float, purpose: str = "held-out") -> bool:
    """Whether a record belongs to the held-out split: a hash of its id, so the split never moves. Each purpose
    (a training run's evaluation, the GSM8K exact-match problems) hashes with its own salt: the splits are
    independent, so one never empties the other."""
    digest = int(hashlib.sha1(f"{purpose}|{dialogue_id}".encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def _messages_from_record(record: Any) -> tuple[list[dict[str, str]], bool | None]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError("not an object with a 'messages' list")
    think = record.get("think")
    if think is not None and not isinstance(think, bool):
        raise ValueError("'think' must be true, false or absent")
    return [dict(m) if isinstance(m, dict) else m for m in record["messages"]], think


def read_dialogues_jsonl(path: str | Path, source: str | None = None) -> DialogueSet:
    """Dialogues of a JSONL file (format above); unreadable lines are counted in `rejected`."""
    path = Path(path)
    out = DialogueSet()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dialogue file here (JSONL, one {{\"messages\": [...]}} per line)")
    with open(path, encoding="utf-8", errors="replace") as handle:
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
                messages, think = _messages_from_record(record)
            except (json.JSONDecodeError, ValueError) as err:
                out.reject("unreadable", f"{where} ({err})")
                continue
            out.dialogues.append(Dialogue(str(record.get("id", f"{path.stem}/{n}")), messages,
                                          str(record.get("source") or source or path.stem), think,
                                          record.get("language")))
    return out


def read_curated_dialogues(curated_dir: str | Path, sources: list[str] | None = None) -> DialogueSet:
    """Dialogues of the curated chat sources (kind "chat", or the names given) of a curated directory."""
    import pyarrow.parquet as pq
    from mixlab.curation import ShardManifest

    manifest = ShardManifest.load(curated_dir)
    names = sources or [name for name, entry in manifest.sources.items() if entry.kind == "chat"]
    if not names:
        raise ValueError(f"{curated_dir}: no chat source in the manifest (kinds: "
                         f"{sorted({e.kind for e in manifest.sources.values()})}); curate one with the chat recipe")
    out = DialogueSet()
    for name in names:
        for shard in manifest.source(name).shards:
            path = manifest.resolve(shard.path)
            table = pq.read_table(path, columns=["text", "id", "metadata"])
            for row in table.to_pylist():
                where = f"{path}#{row['id']}"
                try:
                    messages = parse_dialogue_text(row["text"] or "")
                except ValueError as err:
                    out.reject("unreadable", f"{where} ({err})")
                    continue
                if messages and messages[-1]["role"] == "assistant" and \
                        (worked := split_worked_answer(messages[-1]["content"])) is not None:
                    messages[-1] = {"role": "assistant", **worked}
                meta = row.get("metadata") or {}
                out.dialogues.append(Dialogue(row["id"], messages, name,
                                              language=meta.get("language") or meta.get("lang_hint")))
    return out

