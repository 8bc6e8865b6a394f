"""Mixtures: which data the model sees when.

A `MixtureSchedule` of stages (bounded by fraction, tokens, steps or a start step; each with its own sequence
length and optional curriculum) weights leaves: curated sources or `Selection`s over their document metadata,
flat or as a `MixtureNode` tree. `plan_mixture` checks it against the tokens available before any training, a
deterministic, resumable `MixtureSampler` draws batches by it, and a `MixturePolicy` (DoReMi, ODM, ADO, rules)
can move the weights from eval feedback during the run; `search` fits (mixture, loss) tables of proxy runs and
searches the simplex for the best mixture (RegMix, Olmix). nanotron's `data_stages` go both ways.
"""

from __future__ import annotations

from mixlab.curation.lazy_exports import lazy_exports

# imported on first use (curation/lazy_exports.py): module -> the names it provides
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "mixlab.mixtures.hierarchy": ("MixtureNode",),
    "mixlab.mixtures.nanotron": ("NanotronImport", "nanotron_source_name", "read_nanotron_config",
                                 "to_nanotron_config", "to_nanotron_data_stages",),
    "mixlab.mixtures.planner": ("DEFAULT_MAX_EPOCHS", "LeafPlan", "MixturePlan", "PlanError", "PlanLimits",
                                "StagePlan", "plan_for_manifest", "plan_mixture",),
    "mixlab.mixtures.policies": ("ADOPolicy", "DoReMiPolicy", "MixturePolicy", "OnlineDataMixing", "PolicyDecision",
                                 "PolicyError", "PolicyHistory", "RulePolicy", "ShiftWeight", "fit_power_law",
                                 "policy_from_dict",),
    "mixlab.mixtures.sampler": ("SAMPLER_STATE_VERSION", "MixtureSampler", "SampledBatch", "SamplerStateError",
                                "val_windows",),
    "mixlab.mixtures.schedule": ("Curriculum", "MixtureSchedule", "ResolvedSchedule", "ResolvedStage",
                                 "ScheduleError", "Stage",),
    "mixlab.mixtures.search": ("LightGBMRegressor", "LinearRegressor", "LogLinearRegressor", "MixtureRegression",
                               "MixtureSearchError", "SearchResult", "fit_mixture_regression", "sample_mixtures",
                               "search_simplex", "weight_caps",),
    "mixlab.mixtures.selection": ("LongDocUpsample", "Selection", "SelectionError", "SelectionView", "leaf_problems",
                                  "leaf_token_counts", "open_schedule_sources",),
})
