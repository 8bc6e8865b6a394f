"""Post-training on the pre-training backends: the chat template, SFT (assistant-only loss, best-fit-decreasing
packing with document masking), preference losses (DPO, IPO, KTO, ORPO, APO-zero, APO-down) with cached
reference log-probabilities, on-policy distillation (reverse KL to a teacher), and their evaluation.
The recipe that wires them to runs is `mixlab.pipelines.posttrain` (`mixlab train --stage ...`)."""

from mixlab.curation.chat_template import CHAT_TEMPLATE_FILE, ChatFormatError, ChatTemplate
from mixlab.training.posttrain.dialogues import (
    Dialogue,
    DialogueSet,
    final_number,
    gsm8k_dialogue,
    held_out,
    parse_dialogue_text,
    read_curated_dialogues,
    read_dialogues_jsonl,
    split_worked_answer,
)
from mixlab.training.posttrain.distill import DistillConfig, DistillObjective, PromptSampler
from mixlab.training.posttrain.evaluate import ChatEvaluator, PreferenceEvaluator, gsm8k_exact_match
from mixlab.training.posttrain.generation import generate
from mixlab.training.posttrain.losses import PAIRED_LOSSES, PREFERENCE_LOSSES, sequence_logps
from mixlab.training.posttrain.objectives import PreferenceConfig, PreferenceObjective
from mixlab.training.posttrain.packing import (
    EncodedSet,
    PackedBatch,
    PackedSFTSampler,
    SFTExample,
    best_fit_decreasing,
    encode_dialogues,
    pack_row,
)
from mixlab.training.posttrain.preferences import (
    PreferenceExample,
    PreferenceRecord,
    PreferenceSampler,
    cached_reference_logps,
    encode_preferences,
    read_preferences,
    reference_logps,
    write_preferences,
)

__all__ = [
    "CHAT_TEMPLATE_FILE",
    "PAIRED_LOSSES",
    "PREFERENCE_LOSSES",
    "ChatEvaluator",
    "ChatFormatError",
    "ChatTemplate",
    "Dialogue",
    "DialogueSet",
    "DistillConfig",
    "DistillObjective",
    "EncodedSet",
    "PackedBatch",
    "PackedSFTSampler",
    "PreferenceConfig",
    "PreferenceEvaluator",
    "PreferenceExample",
    "PreferenceObjective",
    "PreferenceRecord",
    "PreferenceSampler",
    "PromptSampler",
    "SFTExample",
    "best_fit_decreasing",
    "cached_reference_logps",
    "encode_dialogues",
    "encode_preferences",
    "final_number",
    "generate",
    "gsm8k_dialogue",
    "gsm8k_exact_match",
    "held_out",
    "pack_row",
    "parse_dialogue_text",
    "read_curated_dialogues",
    "read_dialogues_jsonl",
    "read_preferences",
    "reference_logps",
    "sequence_logps",
    "split_worked_answer",
    "write_preferences",
]
