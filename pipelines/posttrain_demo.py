"""The demo-scale post-training recipe: the demo's pre-trained model -> SFT -> DPO, with a report.

1. Dialogues: the chatterbot-corpus conversations (seven languages) and GSM8K worked answers (the `chat-reasoning`
   source, its exact-match share left out), fetched and curated by the chat recipe into `chat-curated/`, with
   its manifest like every curated directory.
2. SFT from the demo's run: assistant turns only, packed best-fit decreasing with document masking; GSM8K
   dialogues train SmolLM3's think mode (their reasoning inside <think>), the others the no-think mode.
3. Pairs derived from the same dialogues (`mixlab pairs`), then DPO from the SFT run.
4. `reports/posttrain/report.md` with a figure: held-out assistant-token loss before and after SFT per source,
   the SFT and DPO loss curves, DPO's reward accuracy and margin, GSM8K exact match for each model, the
   ablation tasks on each checkpoint. Near-zero scores are reported as they are: the models are tiny.

Runs `mixlab demo` first when its run is missing. Every step is idempotent: a rerun resumes or skips.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixlab.pipelines.posttrain import PostTrainConfig, build_posttrain, posttrain
from mixlab.training import RunRecord, latest_checkpoint, load_model


@dataclass
class PostTrainDemoConfig:
    workdir: Path = Path("demo-output")
    max_mb: float = 2.0  # raw dialogue text per source
    sft_steps: int = 150
    dpo_steps: int = 60
    batch_size: int = 8
    seq_len: int = 256
    max_pairs: int = 3000
    gsm8k_problems: int = 64


def _chat_data(config: PostTrainDemoConfig) -> Path:
    from mixlab.pipelines.corpus import fetch_corpus
    from mixlab.pipelines.curate import curate

    work = Path(config.workdir)
    fetch_corpus(work / "chat-raw-work", sources=["chat", "chat-reasoning"], max_mb=config.max_mb)
    out = work / "chat-curated"
    curate(work / "chat-raw-work" / "raw", out, sources=["chat", "chat-reasoning"])
    return out


def run_posttrain_demo(config: PostTrainDemoConfig) -> Path:
    """Every step above; returns the report's path."""
    from mixlab.pipelines.demo import DemoConfig, run_demo
    from mixlab.pipelines.preference_pairs import derive_preference_pairs

    work = Path(config.workdir)
    demo = DemoConfig(workdir=work)
    base = work / "runs" / demo.run_id
    if not (base / "run.json").exists() or RunRecord.load(base).status != "completed":
        run_demo(demo)
    data = _chat_data(config)
    runs = str(work / "runs")
    sft_config = PostTrainConfig(stage="sft", init_from=str(base), data=str(data), runs_dir=runs,
                                 run_id=f"{demo.run_id}-sft", steps=config.sft_steps, batch_size=config.batch_size,
                                 seq_len=config.seq_len, eval_every=max(1, config.sft_steps // 3),
                                 checkpoint_every=max(1, config.sft_steps // 3), gsm8k_problems=config.gsm8k_problems)
    before = _held_out(sft_config, base)
    sft = posttrain(sft_config)
    pairs, counts = derive_preference_pairs(data, work / "pairs.jsonl", max_pairs=config.max_pairs)
    dpo = posttrain(PostTrainConfig(stage="dpo", init_from=str(sft.path), data=str(pairs), runs_dir=runs,
                                    run_id=f"{demo.run_id}-dpo", steps=config.dpo_steps, batch_size=config.batch_size,
                                    seq_len=config.seq_len, eval_every=max(1, config.dpo_steps // 3),
                                    checkpoint_every=max(1, config.dpo_steps // 3),
                                    gsm8k_problems=config.gsm8k_problems))
    return write_report(work / "reports" / "posttrain", base, before, sft, dpo, counts)


def _held_out(config: PostTrainConfig, run_dir: Path) -> list[dict[str, Any]]:
    """The SFT evaluator's rows for a model (the parent, before SFT)."""
    model, _ = load_model(latest_checkpoint(run_dir / "checkpoints"))
    return build_posttrain(config)["evaluator"].evaluate(model)


def _metrics(run: RunRecord) -> list[dict[str, Any]]:
    path = run.path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_report(out: Path, base: Path, before: list[dict[str, Any]], sft: RunRecord, dpo: RunRecord,
                 pair_counts: dict[str, int]) -> Path:
    """report.md and report.png: what SFT and DPO changed, in numbers a reader can check against the runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    after = sft.summary.get("posttrain", {}).get("held_out", [])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    sources = [row["source"] for row in before]
    by_after = {row["source"]: row for row in after}
    x = range(len(sources))
    axes[0].bar([i - 0.2 for i in x], [r["loss"] for r in before], 0.4, label=f"before ({base.name})")
    axes[0].bar([i + 0.2 for i in x], [by_after.get(s, {}).get("loss", float("nan")) for s in sources], 0.4,
                label=f"after SFT ({sft.run_id})")
    axes[0].set_xticks(list(x), sources)
    axes[0].set_ylabel("held-out assistant-token loss (nats)")
    axes[0].legend()
    for run, ax in ((sft, axes[1]), (dpo, axes[1])):
        rows = _metrics(run)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=run.run_id)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss")
    axes[1].legend()
    rows = _metrics(dpo)
    axes[2].plot([r["step"] for r in rows], [r.get("rewards/accuracy") for r in rows], label="reward accuracy")
    axes[2].plot([r["step"] for r in rows], [r.get("rewards/margin") for r in rows], label="reward margin")
    axes[2].set_xlabel("DPO step")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)

    def exact_match(run: RunRecord) -> str:
        em = run.summary.get("posttrain", {}).get("gsm8k_exact_match", {})
        if "skipped" in em or not em:
            return em.get("skipped", "not run")
        return (f"{em['correct']}/{em['items']} = {em['accuracy']:.1%} ({em['replies_with_a_number']} replies held a "
                f"number; {em['skipped_longer_than_context']} problems longer than the context were skipped)")

    held = dpo.summary.get("posttrain", {}).get("held_out", [{}])[0]
    lines = [
        "# Post-training report", "",
        f"Parent: `{base}` (pre-trained). SFT: `{sft.path}`. DPO: `{dpo.path}`.", "",
        "## SFT", "",
        f"{sft.config['posttrain'].get('dialogues')} dialogues ({sft.config['posttrain'].get('held_out_dialogues')} "
        f"held out), packed into rows at {sft.config['posttrain'].get('packing_efficiency', 0):.1%} efficiency.", "",
        "| source | loss before | loss after | bpb before | bpb after |", "|---|---|---|---|---|",
        *[f"| {r['source']} | {r['loss']:.4f} | {by_after.get(r['source'], {}).get('loss', float('nan')):.4f} | "
          f"{r['bpb']:.4f} | {by_after.get(r['source'], {}).get('bpb', float('nan')):.4f} |" for r in before], "",
        f"GSM8K exact match after SFT: {exact_match(sft)}", "",
        "## DPO", "",
        f"{pair_counts['written']} pairs ({pair_counts['worked_answer']} worked answers against a wrong result, "
        f"{pair_counts['other_reply']} replies against another dialogue's, then sampled).", "",
        f"Held-out pairs: {held.get('pairs')}, reward accuracy {held.get('accuracy', float('nan')):.3f}, margin "
        f"{held.get('margin', float('nan')):.4f}.", "",
        f"GSM8K exact match after DPO: {exact_match(dpo)}", "",
        "![SFT and DPO](report.png)", "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
