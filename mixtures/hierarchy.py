"""Hierarchical mixture weights: a tree of groups whose products are the flat per-leaf weights.

Mixtures are discussed as trees ("web 0.75: en 0.88, multilingual 0.12 split by tokens; code 0.15; math 0.10"),
but the sampler draws from leaves. A `MixtureNode` is one group: its weight in the parent, and children that are
either explicit weights (numbers or sub-groups) or a list of leaves shared by a rule: "by_tokens" (natural shares,
from token counts known before training) or "uniform". Flattening multiplies down the tree exactly; the token
counts are only needed for "by_tokens" groups.

This module is the bottom layer of `mixlab.mixtures.schedule`: it holds `ScheduleError` so both can raise it
without importing each other in a circle (`schedule.ScheduleError` is the same class).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

WEIGHT_SUM_TOLERANCE = 1e-3
RULES = ("weights", "by_tokens", "uniform")


class ScheduleError(ValueError):
    """A schedule that cannot be used as written; the message says which stage and what to change."""


Weight = Union[float, "MixtureNode"]


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScheduleError(f"{where}: weights must be numbers, got {value!r} (write 0.5, not \"0.5\" or a word)")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ScheduleError(f"{where}: weights must be finite and non-negative, got {value}")
    return value


@dataclass(frozen=True)
class MixtureNode:
    """A group of the mixture tree: `weight` in its parent, and `children` shared by `rule`.

    children: `{leaf_or_label: weight | MixtureNode}` with rule "weights" (the default), or a list of leaves
    with rule "by_tokens" (shares proportional to each leaf's tokens) or "uniform" (equal shares).
    """

    weight: float
    children: Mapping[str, Weight] | Sequence[str]
    rule: str = "weights"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _number(self.weight, "mixture node"))
        if self.rule not in RULES:
            raise ScheduleError(f"mixture node: unknown rule {self.rule!r}; use one of {list(RULES)}")
        if isinstance(self.children, Mapping):
            if self.rule != "weights":
                raise ScheduleError(
                    f"mixture node: rule {self.rule!r} shares a list of leaves; give children as a list "
                    "(or use rule 'weights' with explicit child weights)"
                )
            children = {str(k): parse_weight(v, f"child {k!r}") for k, v in self.children.items()}
        elif isinstance(self.children, Sequence) and not isinstance(self.children, str):
            if self.rule == "weights":
                raise ScheduleError(
                    f"mixture node: children {list(self.children)} have no weights; set rule 'by_tokens' or "
                    "'uniform', or give a mapping {leaf: weight}"
                )
            children = tuple(str(c) for c in self.children)
            if len(set(children)) != len(children):
                raise ScheduleError(f"mixture node: children repeat a leaf: {list(children)}")
        else:
            raise ScheduleError(f"mixture node: children must be a mapping or a list of leaves, got {self.children!r}")
        if not children:
            raise ScheduleError("mixture node: needs at least one child")
        object.__setattr__(self, "children", children)

    def to_dict(self) -> dict[str, Any]:
        children: Any = (
            list(self.children) if not isinstance(self.children, Mapping)
            else {k: weight_to_data(v) for k, v in self.children.items()}
        )
        data: dict[str, Any] = {"weight": self.weight, "children": children}
        if self.rule != "weights":
            data["rule"] = self.rule
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MixtureNode:
        unknown = set(data) - {"weight", "children", "rule"}
        if unknown or "weight" not in data or "children" not in data:
            raise ScheduleError(
                f"mixture node {dict(data)!r}: expected {{weight, children, rule?}}"
                + (f"; unknown keys {sorted(unknown)}" if unknown else "")
            )
        return cls(data["weight"], data["children"], data.get("rule", "weights"))


def parse_weight(value: Any, where: str) -> Weight:
    """A float, or a `MixtureNode` (given as one or as its dict form `{weight, children, rule}`)."""
    if isinstance(value, MixtureNode):
        return value
    if isinstance(value, Mapping):
        try:
            return MixtureNode.from_dict(value)
        except ScheduleError as err:
            raise ScheduleError(f"{where}: {err}") from err
    return _number(value, where)


def weight_to_data(value: Weight) -> Any:
    return value.to_dict() if isinstance(value, MixtureNode) else value


def parse_weights(weights: Any, where: str) -> dict[str, Weight]:
    """Validated stage weights: every value a finite non-negative number or a node, some weight positive."""
    if not isinstance(weights, Mapping):
        raise ScheduleError(f"{where}: weights must be a mapping of source: weight, got {weights!r}")
    parsed: dict[str, Weight] = {}
    for key, value in weights.items():
        try:
            parsed[str(key)] = parse_weight(value, f"{where}: weight of {key!r}")
        except ScheduleError as err:
            message = str(err)
            raise ScheduleError(message if message.startswith(where) else f"{where}: leaf {key!r}: {message}") from err
    if not parsed or sum(_top_weight(v) for v in parsed.values()) <= 0:
        raise ScheduleError(f"{where}: needs at least one source with a positive weight, got {dict(weights)}")
    return parsed


def _top_weight(value: Weight) -> float:
    return value.weight if isinstance(value, MixtureNode) else value


def is_flat(weights: Mapping[str, Weight]) -> bool:
    return not any(isinstance(v, MixtureNode) for v in weights.values())


def leaves(weights: Mapping[str, Weight]) -> list[str]:
    """Every leaf of the tree, in order of appearance (labels of groups are not leaves)."""
    found: list[str] = []
    for key, value in weights.items():
        if not isinstance(value, MixtureNode):
            found.append(key)
        elif isinstance(value.children, Mapping):
            found.extend(leaves(value.children))
        else:
            found.extend(value.children)
    return list(dict.fromkeys(found))


def sum_problems(weights: Mapping[str, Weight], where: str, path: str = "") -> list[str]:
    """Levels of explicit weights that do not sum to 1 (within WEIGHT_SUM_TOLERANCE)."""
    problems = []
    total = sum(_top_weight(v) for v in weights.values())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        parts = " + ".join(f"{k}={_top_weight(v):g}" for k, v in weights.items())
        level = f" under {path!r}" if path else ""
        problems.append(
            f"{where}: weights{level} sum to {total:.6g}, not 1 ({parts}); fix them or set normalize=True "
            "on the schedule to have them normalised"
        )
    for key, value in weights.items():
        if isinstance(value, MixtureNode) and isinstance(value.children, Mapping):
            problems.extend(sum_problems(value.children, where, f"{path}/{key}" if path else key))
    return problems


def _child_shares(
    node: MixtureNode, tokens_by_leaf: Mapping[str, int] | None, where: str
) -> list[tuple[str, float, MixtureNode | None]]:
    """Each child of `node` with its share of the node (normalised within the group) and its sub-group, if any."""
    if isinstance(node.children, Mapping):
        total = sum(_top_weight(v) for v in node.children.values())
        if total <= 0:
            raise ScheduleError(f"{where}: all children have weight 0; give one a positive weight")
        # dividing by exactly 1.0 is skipped so that products stay exact; other sums are normalised in the group
        return [
            (k, _top_weight(v) if total == 1.0 else _top_weight(v) / total, v if isinstance(v, MixtureNode) else None)
            for k, v in node.children.items()
        ]
    if node.rule == "uniform":
        return [(leaf, 1.0 / len(node.children), None) for leaf in node.children]
    if tokens_by_leaf is None:
        raise ScheduleError(f"{where}: rule 'by_tokens' needs token counts; pass tokens_by_leaf")
    missing = [leaf for leaf in node.children if leaf not in tokens_by_leaf]
    if missing:
        raise ScheduleError(
            f"{where}: rule 'by_tokens' has no token count for {missing}; tokenize them or list only known leaves"
        )
    counts = {leaf: int(tokens_by_leaf[leaf]) for leaf in node.children}
    total = sum(counts.values())
    if total <= 0:
        raise ScheduleError(f"{where}: rule 'by_tokens' over {list(counts)} but they hold no tokens")
    return [(leaf, n / total, None) for leaf, n in counts.items()]


def flatten_weights(
    weights: Mapping[str, Weight], tokens_by_leaf: Mapping[str, int] | None, where: str
) -> dict[str, float]:
    """Flat `{leaf: weight}`: each leaf's weight is the product of the (normalised) shares on its path.

    The top level keeps its weights as written (the schedule normalises them, or requires they sum to 1);
    a leaf reached along two paths gets the sum of both.
    """
    flat: dict[str, float] = {}

    def visit(node: MixtureNode, factor: float, here: str) -> None:
        for key, share, sub in _child_shares(node, tokens_by_leaf, here):
            if sub is not None:
                visit(sub, factor * share, f"{here}/{key}")
            else:
                flat[key] = flat.get(key, 0.0) + factor * share

    for key, value in weights.items():
        if isinstance(value, MixtureNode):
            visit(value, value.weight, f"{where}: group {key!r}")
        else:
            flat[key] = flat.get(key, 0.0) + value
    return flat


def explain_lines(
    weights: Mapping[str, Weight], tokens_by_leaf: Mapping[str, int] | None, where: str, indent: int = 1
) -> list[str]:
    """The tree as text: each group with its share, each leaf with its share and its flat weight."""
    lines: list[str] = []

    def visit(key: str, node: MixtureNode, share: float, factor: float, depth: int, here: str) -> None:
        rule = "" if node.rule == "weights" else f" ({node.rule})"
        lines.append(f"{'  ' * depth}{key + rule:<32s} {share:<10.6g}")
        for child, child_share, sub in _child_shares(node, tokens_by_leaf, here):
            if sub is not None:
                visit(child, sub, child_share, factor * child_share, depth + 1, f"{here}/{child}")
            else:
                count = f" ({tokens_by_leaf[child]:,d} tokens)" if node.rule == "by_tokens" and tokens_by_leaf else ""
                lines.append(f"{'  ' * (depth + 1)}{child + count:<32s} {child_share:<10.6g} -> {factor * child_share:.6g}")

    for key, value in weights.items():
        if isinstance(value, MixtureNode):
            visit(key, value, value.weight, value.weight, indent, f"{where}: group {key!r}")
        else:
            lines.append(f"{'  ' * indent}{key:<32s} {value:<10.6g} -> {value:.6g}")
    return lines
