"""Mid-training: continuing from a checkpoint into a longer context, with the eval's loss by position bucket
showing what the extension did."""

from __future__ import annotations

import torch
from byte_sampler import ByteSampler
from mixlab.ablations import build_report
from mixlab.training import ModelConfig, RunStore, TrainConfig, latest_checkpoint, train
from mixlab.training.evaluate import load_model, position_losses
from test_trainer import held_out, stdlib_corpora, train_split

torch.set_num_threads(1)


def test_context_extension_64_to_256_reports_loss_by_position_bucket(tmp_path):
    """A parent trained on 64-token rows, extended to 256 with a 4x RoPE theta and a fresh LR schedule: the
    child's evals carry the buckets up to 256, its first step uses the new warmup's LR, and every bucket's loss is
    below the parent's at the same positions (the late ones it never trained on included)."""
    corpora = stdlib_corpora()
    store = RunStore(tmp_path)
    parent = store.create("short", config={})
    train(parent, ModelConfig.preset("tiny", max_seq_len=256),
          TrainConfig.preset("tiny", total_steps=60, checkpoint_every=60, eval_every=60, progress_bar=False, threads=1),
          ByteSampler(train_split(corpora), 8, 64), held_out(corpora, 64))
    long_eval = held_out(corpora, 256)
    parent_model, _ = load_model(latest_checkpoint(parent.checkpoint_dir))
    before = {(lo, hi): loss for lo, hi, loss in position_losses(long_eval.evaluate(parent_model)[-1])}
    assert list(before) == [(0, 64), (64, 128), (128, 256)]

    child = store.create("long", config={})
    cfg = TrainConfig.preset("tiny", total_steps=20, seq_len=256, warmup_steps=4, log_every=1, eval_every=20,
                             checkpoint_every=20, progress_bar=False, threads=1, init_from=str(parent.path))
    train(child, ModelConfig.preset("tiny", max_seq_len=256, rope_theta=40000.0), cfg,
          ByteSampler(train_split(corpora), 8, 256), long_eval)
    assert child.metrics()[0]["lr"] < cfg.lr  # a fresh warmup, not the parent's decayed LR
    after = {(lo, hi): loss for lo, hi, loss in position_losses(child.evals()[-1])}
    assert list(after) == list(before)
    for bucket, loss in after.items():
        assert loss < before[bucket], (bucket, loss, before[bucket])

    html = build_report([parent.path, child.path], tmp_path / "report").html_path.read_text()
    table = html[html.index("Loss by position"):]
    for span in ("0-63", "64-127", "128-255"):
        assert span in table
