"""Score a model on cloze tasks: no choices shown, each candidate continuation's log-likelihood compared.

An item's score for a choice is the sum of the log-probabilities of the choice's tokens given the context,
divided by the choice's length in characters, so that long continuations are not penalised for having more
tokens (the normalisation of the playbook's cloze formulation). The item is right when the correct choice scores
strictly highest; its margin is score(correct) - max score(distractors), a smooth signal that moves before
accuracy does at proxy scale.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mixlab.ablations.tasks.builders import (
    DEFAULT_MAX_ITEMS,
    build_into,
    build_lock,
    dataset_fingerprint,
    tokenized_manifest,
)
from mixlab.ablations.tasks.items import TASKS_DIR, ClozeTask, TaskFileError, load_tasks, read_index

logger = logging.getLogger("mixlab.tasks")


@dataclass
class _Batch:
    """Padded (context + choice) sequences and, per row, which target positions are the choice's tokens."""

    inputs: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64
    mask: torch.Tensor  # [B, T] bool: target positions that belong to the continuation
    pairs: np.ndarray  # [B] index of each row's (item, choice) pair


class ClozeEvaluator:
    """Tasks tokenized once, scored in batches at every eval.

    Tokenization: the context and each continuation are tokenized separately and their ids concatenated, so that
    the scored tokens are exactly the continuation's own tokens, the same for every context (tokenizing the joined
    text could merge a token across the boundary and score part of the context). The builders put the boundary
    before a space or newline, where mixlab's pre-tokenizer splits anyway. `prefix_token` (the EOS id with
    `for_curated`: training documents start after one) goes before every context. A context is cut from the left
    so that prefix + context + continuation fit in `max_seq_len` + 1 tokens; a continuation longer than that
    keeps its first tokens and is normalised by the characters they cover.
    """

    def __init__(self, tasks: Sequence[ClozeTask], tokenizer: Any, max_seq_len: int, batch_size: int = 16,
                 prefix_token: int | None = None):
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len!r} must be a whole number >= 2")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a whole number >= 1")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        empty = [t.name for t in tasks if not t.items]
        if empty:
            raise ValueError(f"tasks {empty} have no items; build them again or leave them out")
        self.tasks = list(tasks)
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.prefix_token = prefix_token
        self.truncated_continuations = 0  # pairs whose continuation alone did not fit
        self._tokenize()

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def for_curated(cls, curated_dir: str | Path, max_seq_len: int, max_items: int = DEFAULT_MAX_ITEMS,
                    batch_size: int = 16, seed: int = 0, tasks_dir: str | Path | None = None) -> ClozeEvaluator:
        """The tasks of a curated dataset (built from its held-out documents into `<curated>/tasks/` when that
        folder has none, or when they were built from another split, seed or a smaller `max_items`), with the
        dataset's tokenizer."""
        from mixlab.curation import load_tokenizer

        manifest = tokenized_manifest(curated_dir)
        folder = Path(tasks_dir) if tasks_dir is not None else manifest.resolve(TASKS_DIR)
        with build_lock(folder):
            reason = _stale_reason(folder, dataset_fingerprint(manifest), seed, max_items)
            if reason is None:
                tasks = load_tasks(folder)
            else:
                logger.info("building cloze tasks in %s: %s", folder, reason)
                tasks = build_into(manifest, folder, max_items, seed)
        tasks = [t.head(max_items) for t in tasks]
        tokenizer = load_tokenizer(manifest.resolve(manifest.tokenizer.path))
        eos = tokenizer.token_to_id(manifest.tokenizer.eos_token)
        if not tasks:
            logger.warning("%s: no cloze task could be built from the held-out documents (see %s)",
                           manifest.root, folder / "tasks.json")
        return cls(tasks, tokenizer, max_seq_len, batch_size=batch_size, prefix_token=eos)

    def select(self, names: Iterable[str]) -> ClozeEvaluator:
        """An evaluator of the named tasks only (an unknown name is an error listing the known ones)."""
        wanted = list(names)
        known = [t.name for t in self.tasks]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(f"no cloze task {unknown}; this dataset's tasks are {known}")
        return ClozeEvaluator([t for t in self.tasks if t.name in wanted], self.tokenizer, self.max_seq_len,
                              batch_size=self.batch_size, prefix_token=self.prefix_token)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def _tokenize(self) -> None:
        """Every (item, choice) pair as one token sequence, sorted by length into padded batches."""
        contexts = [item.context for task in self.tasks for item in task.items]
        choices = [choice for task in self.tasks for item in task.items for choice in item.choices]
        context_ids = [e.ids for e in self.tokenizer.encode_batch(contexts, add_special_tokens=False)]
        choice_encodings = self.tokenizer.encode_batch(choices, add_special_tokens=False)
        prefix = [] if self.prefix_token is None else [self.prefix_token]
        budget = self.max_seq_len + 1  # inputs are the first T tokens, targets the last T
        sequences: list[list[int]] = []
        n_scored: list[int] = []
        chars: list[int] = []
        self._owners: list[tuple[int, int, int]] = []  # (task, item, choice) of each pair
        k = 0  # pair index
        items = iter(context_ids)
        for t, task in enumerate(self.tasks):
            for i, item in enumerate(task.items):
                head = prefix + next(items)
                for c, choice in enumerate(item.choices):
                    encoding = choice_encodings[k]
                    k += 1
                    ids, length = encoding.ids, len(choice)
                    if not ids:
                        raise TaskFileError(f"task {task.name!r} item {i}: choice {choice!r} has no tokens")
                    if len(ids) > budget - 1:  # keep one token before it; score the part that fits
                        self.truncated_continuations += 1
                        ids = ids[: budget - 1]
                        length = max(1, encoding.offsets[len(ids) - 1][1])
                    context = head[-(budget - len(ids)):] if head else []
                    if not context:
                        raise ValueError(f"task {task.name!r} item {i}: an empty context needs a prefix_token")
                    sequences.append(context + ids)
                    n_scored.append(len(ids))
                    chars.append(length)
                    self._owners.append((t, i, c))
        self._chars = np.asarray(chars, dtype=np.float64)
        order = sorted(range(len(sequences)), key=lambda p: -len(sequences[p]))  # little padding per batch
        self._batches = []
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = len(sequences[rows[0]]) - 1
            inputs = torch.zeros(len(rows), width, dtype=torch.long)
            targets = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for r, p in enumerate(rows):
                seq = torch.tensor(sequences[p], dtype=torch.long)
                n = len(seq) - 1
                inputs[r, :n], targets[r, :n] = seq[:-1], seq[1:]
                mask[r, n - n_scored[p]:n] = True  # right padding: causal attention never looks at it
            self._batches.append(_Batch(inputs, targets, mask, np.asarray(rows)))

    # ---- scoring ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def pair_logprobs(self, model: torch.nn.Module, device: torch.device | str | None = None) -> np.ndarray:
        """Sum of the continuation's token log-probabilities for every (item, choice) pair, in pair order."""
        device = torch.device(device) if device is not None else next(model.parameters()).device
        was_training = model.training
        model.eval()
        totals = np.zeros(len(self._owners), dtype=np.float64)
        try:
            for batch in self._batches:
                out = model(batch.inputs.to(device))
                logits = out[0] if isinstance(out, tuple) else out
                mask = batch.mask.to(device)
                picked = logits[mask].float()  # only the continuation's positions: [N, V]
                logp = F.log_softmax(picked, dim=-1).gather(1, batch.targets.to(device)[mask].unsqueeze(1)).squeeze(1)
                rows = torch.arange(mask.shape[0], device=device).unsqueeze(1).expand_as(mask)[mask]
                per_row = torch.zeros(mask.shape[0], dtype=torch.float64, device=device)
                per_row.index_add_(0, rows, logp.double())
                totals[batch.pairs] = per_row.cpu().numpy()
        finally:
            model.train(was_training)
        return totals

    def evaluate(self, model: torch.nn.Module, device: torch.device | str | None = None) -> list[dict[str, Any]]:
        """One row per task: accuracy, margin (mean of score(correct) - max score(distractors), score = log-prob
        per character), items and chance. `device=None` uses the model's own device."""
        scores = self.pair_logprobs(model, device) / self._chars
        rows = []
        k = 0
        for task in self.tasks:
            right, margins = 0, []
            for item in task.items:
                item_scores = scores[k:k + len(item.choices)]
                k += len(item.choices)
                others = np.delete(item_scores, item.answer)
                margin = float(item_scores[item.answer] - others.max())
                margins.append(margin)
                right += margin > 0
            rows.append({"task": task.name, "accuracy": right / len(task.items), "margin": float(np.mean(margins)),
                         "items": len(task.items), "chance": task.chance, "source": task.source})
        return rows


def _stale_reason(folder: Path, fingerprint: str, seed: int, max_items: int) -> str | None:
    """Why the tasks in `folder` cannot serve (None: they can)."""
    try:
        index = read_index(folder)
    except TaskFileError:
        return "no task index yet"
    if index.get("dataset") != fingerprint:
        return "built from other token shards (the dataset or its held-out split changed)"
    if index.get("seed") != seed:
        return f"built with seed {index.get('seed')!r}, not {seed}"
    built_max = index.get("max_items")
    if not isinstance(built_max, int) or built_max < max_items:
        return f"built with max_items {built_max!r} < {max_items}"
    return None
