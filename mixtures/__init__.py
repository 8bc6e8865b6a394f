"""Mixtures: which data the model sees when.

A `MixtureSchedule` of stages (bounded by fraction, tokens, steps or a start step; each with its own sequence
length and optional curriculum) weights leaves: curated sources or `Selection`s over their document metadata,
flat or as a `MixtureNode` tree. `plan_mixture` checks it against the tokens available before any training, a
deterministic, resumable `MixtureSampler` draws batches by it, and a `MixturePolicy` (DoReMi, ODM, ADO, rules)
can move the weights from eval feedback during the run; `search` fits (mixture, loss) tables of proxy runs and
searches the simplex for the best mixture (RegMix, Olmix). nanotron's `data_stages` go both ways.
"""

from mixlab.mixtures.hierarchy import MixtureNode
from mixlab.mixtures.nanotron import (
    NanotronImport,
    nanotron_source_name,
    read_nanotron_config,
    to_nanotron_config,
    to_nanotron_data_stages,
)
from mixlab.mixtures.planner import (
    DEFAULT_MAX_EPOCHS,
    LeafPlan,
    MixturePlan,
    PlanError,
    PlanLimits,
    StagePlan,
    plan_for_manifest,
    plan_mixture,
)
from mixlab.mixtures.policies import (
    ADOPolicy,
    DoReMiPolicy,
    MixturePolicy,
    OnlineDataMixing,
    PolicyDecision,
    PolicyError,
    PolicyHistory,
    RulePolicy,
    ShiftWeight,
    fit_power_law,
    policy_from_dict,
)
from mixlab.mixtures.sampler import (
    SAMPLER_STATE_VERSION,
    MixtureSampler,
    SampledBatch,
    SamplerStateError,
    val_windows,
)
from mixlab.mixtures.schedule import (
    Curriculum,
    MixtureSchedule,
    ResolvedSchedule,
    ResolvedStage,
    ScheduleError,
    Stage,
)
from mixlab.mixtures.search import (
    LightGBMRegressor,
    LinearRegressor,
    LogLinearRegressor,
    MixtureRegression,
    MixtureSearchError,
    SearchResult,
    fit_mixture_regression,
    sample_mixtures,
    search_simplex,
    weight_caps,
)
from mixlab.mixtures.selection import (
    LongDocUpsample,
    Selection,
    SelectionError,
    SelectionView,
    leaf_problems,
    leaf_token_counts,
    open_schedule_sources,
)

__all__ = [
    "LightGBMRegressor",
    "LinearRegressor",
    "LogLinearRegressor",
    "MixtureRegression",
    "MixtureSearchError",
    "SearchResult",
    "fit_mixture_regression",
    "sample_mixtures",
    "search_simplex",
    "weight_caps",
    "ADOPolicy",
    "Curriculum",
    "DEFAULT_MAX_EPOCHS",
    "DoReMiPolicy",
    "LeafPlan",
    "LongDocUpsample",
    "MixtureNode",
    "MixturePlan",
    "MixturePolicy",
    "MixtureSampler",
    "MixtureSchedule",
    "NanotronImport",
    "OnlineDataMixing",
    "PlanError",
    "PlanLimits",
    "PolicyDecision",
    "PolicyError",
    "PolicyHistory",
    "ResolvedSchedule",
    "ResolvedStage",
    "RulePolicy",
    "SAMPLER_STATE_VERSION",
    "SampledBatch",
    "SamplerStateError",
    "ScheduleError",
    "Selection",
    "SelectionError",
    "SelectionView",
    "ShiftWeight",
    "Stage",
    "StagePlan",
    "fit_power_law",
    "leaf_problems",
    "leaf_token_counts",
    "nanotron_source_name",
    "open_schedule_sources",
    "plan_for_manifest",
    "plan_mixture",
    "policy_from_dict",
    "read_nanotron_config",
    "to_nanotron_config",
    "to_nanotron_data_stages",
    "val_windows",
]
