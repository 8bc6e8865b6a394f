"""Training: a plain Llama-style model, the embedded torch backend, checkpoints, held-out eval, run records."""

from training.run_record import RunRecord, RunStore

__all__ = ["RunRecord", "RunStore"]
