"""The chat template: how a dialogue becomes tokens, and which of them the model learns from.

ChatML by default (`<|im_start|>role\\ncontent<|im_end|>\\n`), with SmolLM3's reasoning switch: the system turn
ends with `/think` or `/no_think`; in no-think mode every assistant turn opens with an empty think block (part of
the prompt, never learned), in think mode an assistant message's `reasoning` is written inside `<think>...</think>`
before its answer (learned). The template is stored with the tokenizer (`chat_template.json`, and a Jinja
rendering in tokenizer_config.json for transformers; `mixlab tokenize` writes it); its markers are special
tokens the BPE reserves from the start, so post-training never changes the vocabulary.

Only assistant turns carry loss: their content, reasoning and end marker. Role headers, system and user turns
and the empty think block are context.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

CHAT_TEMPLATE_FILE = "chat_template.json"
ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A dialogue the template cannot render; the message names the record and the fix."""


@dataclass(frozen=True)
class ChatTemplate:
    """A ChatML-style template. Change the markers for another family; set think_start=None for none."""

    name: str = "chatml"
    turn_start: str = "<|im_start|>"
    turn_end: str = "<|im_end|>"
    separator: str = "\n"  # after each turn's end marker
    think_start: str | None = "<think>"
    think_end: str | None = "</think>"
    think_flag: str = "/think"
    no_think_flag: str = "/no_think"
    default_system: str = "You are a helpful assistant."
    think_by_default: bool = False

    # ---- what the tokenizer must hold ----------------------------------------------------------------
    def special_tokens(self) -> tuple[str, ...]:
        markers = (self.turn_start, self.turn_end, self.think_start, self.think_end)
        return tuple(m for m in markers if m)

    @property
    def has_think(self) -> bool:
        return bool(self.think_start and self.think_end)

    # ---- rendering -------------------------------------------------------------------------------------
    def segments(self, messages: Sequence[Mapping[str, Any]], *, think: bool | None = None,
                 add_generation_prompt: bool = False, record: str = "dialogue") -> list[tuple[str, bool]]:
        """The dialogue as (text, learned) pieces in order; joined they are `render`'s text."""
        think = self.think_by_default if think is None else think
        if think and not self.has_think:
            raise ChatFormatError(f"{record}: think mode asked for, but template {self.name!r} has no think markers")
        checked = self._check(messages, record, need_assistant=not add_generation_prompt)
        out: list[tuple[str, bool]] = []
        system = next((m["content"] for m in checked if m["role"] == "system"), self.default_system)
        if self.has_think:  # the reasoning switch lives in the system turn, as in SmolLM3
            system = f"{system}\n{self.think_flag if think else self.no_think_flag}".lstrip("\n")
        if system:
            out.append((self._header("system") + system + self.turn_end + self.separator, False))
        for message in checked:
            role = message["role"]
            if role == "system":
                continue
            if role == "user":
                out.append((self._header("user") + message["content"] + self.turn_end + self.separator, False))
                continue
            out.append((self._header("assistant") + self._empty_think(think), False))
            body = message["content"]
            if think and message.get("reasoning"):
                body = f"{self.think_start}\n{message['reasoning']}\n{self.think_end}\n{body}"
            out.append((body + self.turn_end, True))
            out.append((self.separator, False))
        if add_generation_prompt:
            out.append((self._header("assistant") + self._empty_think(think), False))
        return out

    def render(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        return "".join(text for text, _ in self.segments(messages, **kwargs))

    def encode(self, tokenizer: Any, messages: Sequence[Mapping[str, Any]], **kwargs: Any
               ) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int32, learned bool) of a dialogue. Each piece is encoded on its own: pieces meet at special
        tokens or newlines, so the ids equal those of the joined text for a byte-level BPE."""
        ids: list[int] = []
        learned: list[bool] = []
        for text, trains in self.segments(messages, **kwargs):
            piece = tokenizer.encode(text, add_special_tokens=False).ids
            ids += piece
            learned += [trains] * len(piece)
        return np.asarray(ids, dtype=np.int32), np.asarray(learned, dtype=bool)

    def _header(self, role: str) -> str:
        return f"{self.turn_start}{role}\n"

    def _empty_think(self, think: bool) -> str:
        return f"{self.think_start}\n\n{self.think_end}\n" if self.has_think and not think else ""

    def _check(self, messages: Sequence[Mapping[str, Any]], record: str,
               need_assistant: bool = True) -> list[Mapping[str, Any]]:
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            raise ChatFormatError(f"{record}: 'messages' must be a non-empty list of {{role, content}} objects")
        markers = self.special_tokens()
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or message.get("role") not in ROLES:
                raise ChatFormatError(f"{record}: message {i} must be an object with role one of {ROLES} "
                                      f"(got {message!r:.80})")
            for key in ("content", "reasoning"):
                value = message.get(key, "" if key == "reasoning" else None)
                if value is None or not isinstance(value, str):
                    raise ChatFormatError(f"{record}: message {i} ({message['role']}) needs a string {key!r}")
                if found := next((m for m in markers if m in value), None):
                    raise ChatFormatError(f"{record}: message {i} contains the template marker {found!r}; remove it "
                                          "from the data (it would be read as a turn boundary)")
        if any(m["role"] == "system" for m in messages[1:]):
            raise ChatFormatError(f"{record}: a system message may only come first")
        if need_assistant and not any(m["role"] == "assistant" for m in messages):
            raise ChatFormatError(f"{record}: no assistant turn, so nothing to learn from")
        return list(messages)

    # ---- storage with the tokenizer --------------------------------------------------------------------
    def jinja(self) -> str:
        """The same rendering as a transformers chat_template (Jinja), for `apply_chat_template`; every piece of
        text is a string expression, so Jinja's whitespace control never touches it."""
        def lit(text: str) -> str:
            return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"

        default_think = "true" if self.think_by_default else "false"
        empty = lit(self._empty_think(False)) if self.has_think else ""
        parts = [
            f"{{%- set think = enable_thinking if enable_thinking is defined else {default_think} -%}}",
            "{%- if messages and messages[0].role == 'system' -%}{%- set system = messages[0].content -%}"
            f"{{%- else -%}}{{%- set system = {json.dumps(self.default_system)} -%}}{{%- endif -%}}",
        ]
        if self.has_think:
            flags = f"({json.dumps(self.think_flag)} if think else {json.dumps(self.no_think_flag)})"
            parts.append(f"{{%- set system = (system ~ '\\n' ~ {flags}) if system else {flags} -%}}")
        parts += [
            "{%- if system -%}" + lit(self._header("system")) + "{{ system }}" + lit(self.turn_end + self.separator)
            + "{%- endif -%}",
            "{%- for m in messages -%}{%- if m.role == 'user' -%}" + lit(self._header("user")) + "{{ m.content }}"
            + lit(self.turn_end + self.separator) + "{%- elif m.role == 'assistant' -%}"
            + lit(self._header("assistant")) + "{%- if not think -%}" + empty + "{%- endif -%}",
        ]
        if self.has_think:
            parts.append("{%- if think and m.reasoning -%}" + lit(f"{self.think_start}\n") + "{{ m.reasoning }}"
                         + lit(f"\n{self.think_end}\n") + "{%- endif -%}")
        parts += [
            "{{ m.content }}" + lit(self.turn_end + self.separator) + "{%- endif -%}{%- endfor -%}",
            "{%- if add_generation_prompt -%}" + lit(self._header("assistant")) + "{%- if not think -%}" + empty
            + "{%- endif -%}{%- endif -%}",
        ]
        return "".join(parts)

    def save(self, tokenizer_dir: str | Path) -> Path:
        """Store the template next to tokenizer.json (checking the tokenizer holds its markers as special tokens)
        and put its Jinja form into tokenizer_config.json. Returns the template file."""
        folder = Path(tokenizer_dir)
        self.check_tokenizer(folder)
        path = folder / CHAT_TEMPLATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")
        config_path = folder / "tokenizer_config.json"
        if config_path.exists():
            config = json.loads(config_path.read_text())
            config["chat_template"] = self.jinja()
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return path

    def check_tokenizer(self, tokenizer_dir: str | Path) -> None:
        from mixlab.curation.tokenizer import TOKENIZER_FILE

        path = Path(tokenizer_dir) / TOKENIZER_FILE
        try:
            spec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ChatFormatError(f"{path}: cannot read the tokenizer ({err}); run `mixlab tokenize` first") from err
        specials = {tok["content"] for tok in spec.get("added_tokens", []) if tok.get("special")}
        missing = [m for m in self.special_tokens() if m not in specials]
        if missing:
            raise ChatFormatError(
                f"{path}: the tokenizer lacks the special tokens {missing} of chat template {self.name!r}. Train the "
                "tokenizer with them reserved (TokenizerConfig.special_tokens, the default reserves the ChatML and "
                "think markers) before pre-training, or use a template without them (think_start=None)")

    @classmethod
    def load(cls, tokenizer_dir: str | Path) -> ChatTemplate:
        """The template stored with a tokenizer; ChatML when none was stored."""
        path = Path(tokenizer_dir) / CHAT_TEMPLATE_FILE
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ChatFormatError(f"{path}: not valid JSON ({err}); delete it to use ChatML") from err
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ChatFormatError(f"{path}: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)
