"""The error a curation setting that cannot work raises (curation sits below training, so it has its own)."""

from __future__ import annotations


class CurationConfigError(ValueError):
    """A curation step, reader or classifier setting that cannot work; the message says what to change.

    `fields` names the settings (or command-line flags) that fix it, as training's ConfigError does, so the CLI
    prints them."""

    def __init__(self, message: str, fields: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.fields = tuple(fields)
