"""Ablations: compare runs and report on them (tables, plots, noise)."""

from mixlab.ablations.report import RunReport, build_report, curation_funnel, final_evals, mixture_shares

__all__ = ["RunReport", "build_report", "curation_funnel", "final_evals", "mixture_shares"]
