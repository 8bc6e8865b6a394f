"""Post-training on the pre-training backends: the chat template, SFT (assistant-only loss, best-fit-decreasing
packing with document masking), preference losses (DPO, IPO, KTO, ORPO, APO-zero, APO-down) with cached
reference log-probabilities, on-policy distillation (reverse KL to a teacher), and their evaluation.
The recipe that wires them to runs is `mixlab.pipelines.posttrain` (`mixlab train --stage ...`)."""

from __future__ import annotations

from mixlab.curation.lazy_exports import lazy_exports

# imported on first use (curation/lazy_exports.py): module -> the names it provides
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "mixlab.curation.chat_template": ("CHAT_TEMPLATE_FILE", "ChatFormatError", "ChatTemplate",),
    "mixlab.training.posttrain.dialogues": ("Dialogue", "DialogueSet", "final_number", "gsm8k_dialogue", "held_out",
                                            "parse_dialogue_text", "read_curated_dialogues", "read_dialogues_jsonl",
                                            "split_worked_answer",),
    "mixlab.training.posttrain.distill": ("DistillConfig", "DistillObjective", "PromptSampler",),
    "mixlab.training.posttrain.evaluate": ("ChatEvaluator", "PreferenceEvaluator", "gsm8k_exact_match",),
    "mixlab.training.posttrain.generation": ("generate",),
    "mixlab.training.posttrain.losses": ("PAIRED_LOSSES", "PREFERENCE_LOSSES", "sequence_logps",),
    "mixlab.training.posttrain.objectives": ("PreferenceConfig", "PreferenceObjective",),
    "mixlab.training.posttrain.packing": ("EncodedSet", "PackedBatch", "PackedSFTSampler", "SFTExample",
                                          "best_fit_decreasing", "encode_dialogues", "pack_row",),
    "mixlab.training.posttrain.preferences": ("PreferenceExample", "PreferenceRecord", "PreferenceSampler",
                                              "cached_reference_logps", "encode_preferences", "read_preferences",
                                              "reference_logps", "write_preferences",),
})
