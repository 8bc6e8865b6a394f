"""Post-training parts on tiny inputs: each loss against values worked out by hand, the chat template's learned
tokens and think switch, best-fit-decreasing packing, the loss and attention masks of packed rows, and the
samplers' resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mixlab.training import ModelConfig, Transformer
from mixlab.training.posttrain import (
    ChatFormatError,
    ChatTemplate,
    PackedSFTSampler,
    SFTExample,
    best_fit_decreasing,
    losses,
    pack_row,
    split_worked_answer,
)
from mixlab.training.trainer import masked_targets


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---- losses, by hand --------------------------------------------------------------------------------------------
def test_dpo_by_hand():
    # beta (pc - rc) = 0.5 * 0.5, beta (pr - rr) = 0.5 * -0.5: margin 0.5
    out = losses.dpo(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5)
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-12)
    assert out.chosen_reward.item() == pytest.approx(0.25) and out.rejected_reward.item() == pytest.approx(-0.25)


def test_ipo_by_hand():
    # h = (-0.5 + 0.6) - (-1.0 + 0.8) = 0.3; target 1 / (2 * 0.25) = 2
    out = losses.ipo(t(-0.5), t(-1.0), t(-0.6), t(-0.8), beta=0.25)
    assert out.loss.item() == pytest.approx((0.3 - 2.0) ** 2, abs=1e-12)


def test_apo_zero_and_down_by_hand():
    zero = losses.apo_zero(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=1.0)  # ratios +0.5, -0.5
    assert zero.loss.item() == pytest.approx((1 - sigmoid(0.5)) + sigmoid(-0.5), abs=1e-12)
    down = losses.apo_down(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=1.0)
    assert down.loss.item() == pytest.approx(sigmoid(0.5) + (1 - sigmoid(1.0)), abs=1e-12)


def test_orpo_by_hand():
    pc, pr, lam = -0.5, -1.0, 0.1
    log_odds = (pc - math.log(1 - math.exp(pc))) - (pr - math.log(1 - math.exp(pr)))
    out = losses.orpo(t(pc), t(pr), t(0.5), lam)
    assert out.loss.item() == pytest.approx(0.5 - lam * math.log(sigmoid(log_odds)), abs=1e-12)


def test_kto_by_hand_with_and_without_a_positive_kl():
    desirable = torch.tensor([True, False])
    # rewards 0.4 and 0.1; mismatched-pair KL terms 0.2 and -0.6: mean -0.2, clamped to z = 0
    out = losses.kto(t(-1.0, -2.0), t(-1.4, -2.1), t(-3.0, -4.0), t(-3.2, -3.4), desirable, beta=1.0)
    assert out.loss.tolist() == pytest.approx([1 - sigmoid(0.4), 1 - sigmoid(-0.1)], abs=1e-12)
    # KL terms 0.3 and 0.1: z = 0.2; weights 2 and 0.5
    out = losses.kto(t(-1.0, -2.0), t(-1.4, -2.1), t(-3.0, -4.0), t(-3.3, -4.1), desirable, beta=1.0,
                     lambda_d=2.0, lambda_u=0.5)
    assert out.loss.tolist() == pytest.approx([2 * (1 - sigmoid(0.2)), 0.5 * (1 - sigmoid(0.1))], abs=1e-12)


def test_reverse_kl_by_hand_and_only_on_masked_positions():
    student = torch.tensor([[[0.0, math.log(2.0)], [5.0, -5.0]]], dtype=torch.float64)  # p_s = [1/3, 2/3]
    teacher = torch.zeros(1, 2, 2, dtype=torch.float64)  # uniform
    mask = torch.tensor([[True, False]])
    expected = (1 / 3) * math.log((1 / 3) / 0.5) + (2 / 3) * math.log((2 / 3) / 0.5)
    assert losses.reverse_kl(student, teacher, mask).item() == pytest.approx(expected, abs=1e-12)


def test_sequence_logps_sums_only_masked_targets():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]], dtype=torch.float64))
    sums, counts = losses.sequence_logps(logits, torch.tensor([[0, 1, 1]]), torch.tensor([[False, True, True]]))
    assert sums.item() == pytest.approx(math.log(0.1) + math.log(0.8)) and counts.item() == 2


# ---- the chat template ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tokenized_curated):
    from mixlab.curation.tokenizer import load_tokenizer, tokenizer_path

    return load_tokenizer(tokenizer_path(tokenized_curated))


DIALOGUE = [{"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "The answer is 5.", "reasoning": "2 plus 3 makes 5."},
            {"role": "user", "content": "And 2+4?"},
            {"role": "assistant", "content": "6"}]


def test_only_assistant_turns_are_learned_and_think_switches_the_reasoning(tokenizer):
    template = ChatTemplate()
    ids, learned = template.encode(tokenizer, DIALOGUE, think=False)
    learned_text = tokenizer.decode(ids[learned].tolist(), skip_special_tokens=False)
    assert learned_text == "The answer is 5.<|im_end|>6<|im_end|>"
    text = template.render(DIALOGUE, think=False)
    assert text.count("<think>\n\n</think>\n") == 2 and "/no_think" in text and "2 plus 3" not in text
    assert tokenizer.decode(ids.tolist(), skip_special_tokens=False) == text  # pieces encode like the whole
    ids, learned = template.encode(tokenizer, DIALOGUE, think=True)
    learned_text = tokenizer.decode(ids[learned].tolist(), skip_special_tokens=False)
    assert learned_text == "<think>\n2 plus 3 makes 5.\n</think>\nThe answer is 5.<|im_end|>6<|im_end|>"
    assert "/think" in template.render(DIALOGUE, think=True)
    for marker in ("<|im_start|>", "<think>"):  # the markers are single special tokens of the BPE
        assert tokenizer.token_to_id(marker) is not None


def test_the_jinja_template_renders_what_mixlab_renders(tokenized_curated, tmp_path):
    import shutil

    from mixlab.curation.tokenizer import tokenizer_path
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_path(tokenized_curated).parent, folder)
    template = ChatTemplate()
    assert (folder / "chat_template.json").exists()  # `mixlab tokenize` stored it with the tokenizer
    assert ChatTemplate.load(folder) == template
    auto = AutoTokenizer.from_pretrained(folder)
    for think in (False, True):
        ours = template.render(DIALOGUE, think=think)
        theirs = auto.apply_chat_template(DIALOGUE, tokenize=False, enable_thinking=think)
        assert theirs == ours
        prompt = DIALOGUE[:1]
        assert auto.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=think) \
            == template.render(prompt, think=think, add_generation_prompt=True)


def test_bad_dialogues_are_refused_by_name():
    template = ChatTemplate()
    with pytest.raises(ChatFormatError, match="d7: no assistant turn"):
        template.segments([{"role": "user", "content": "hi"}], record="d7")
    with pytest.raises(ChatFormatError, match="template marker '<\\|im_end\\|>'"):
        template.segments([{"role": "user", "content": "x<|im_end|>"}, {"role": "assistant", "content": "y"}])
    with pytest.raises(ChatFormatError, match="role one of"):
        template.segments([{"role": "robot", "content": "x"}])


def test_a_worked_answer_splits_into_reasoning_and_result():
    parts = split_worked_answer("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7")
    assert parts == {"reasoning": "She has 3 + 4 = 7 apples.", "content": "The answer is 7."}


# ---- packing and masks ------------------------------------------------------------------------------------------
def test_best_fit_decreasing_by_hand():
    # longest first; each into the fullest bin it fits: 5|3, 4|3|1, 2|2
    assert best_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 8) == [[0, 2], [1, 3, 6], [4, 5]]
    lengths = np.random.default_rng(0).integers(1, 60, 500).tolist()
    bins = best_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 64
    assert sum(lengths) / (len(bins) * 64) > 0.9  # tight
    with pytest.raises(ValueError, match="truncate"):
        best_fit_decreasing([65], 64)


def _example(name: str, ids: list[int], learned: list[bool]) -> SFTExample:
    return SFTExample(name, "chat", np.asarray(ids, dtype=np.int32), np.asarray(learned, dtype=bool))


def test_a_packed_row_learns_only_assistant_targets_of_the_same_dialogue():
    a = _example("a", [1, 2, 3, 4], [False, False, True, True])
    b = _example("b", [5, 6, 7], [False, True, True])
    tokens, mask, positions, offsets = pack_row([a, b], seq_len=9, pad_id=0)
    assert tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 0, 0, 0]
    # targets: 2 3 4 | 5 (a -> b: never) 6 7 | pad pad pad
    assert mask.tolist() == [False, True, True, False, True, True, False, False, False]
    assert positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert offsets.tolist() == [0, 4, 7, 9]


def test_packed_dialogues_do_not_attend_to_each_other():
    from mixlab.training import segment_ids_from_cu_seqlens

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                    max_seq_len=16, doc_masking=True)).eval()
    a = _example("a", [1, 2, 3, 4, 5], [False, False, True, True, True])
    b = _example("b", [9, 8, 7, 6], [False, True, True, True])
    tokens, _, positions, offsets = pack_row([a, b], seq_len=12, pad_id=0)
    packed, _ = model(torch.from_numpy(tokens[None, :-1]), position_ids=torch.from_numpy(positions[None]),
                      segment_ids=segment_ids_from_cu_seqlens([offsets], 12))
    alone, _ = model(torch.tensor([[9, 8, 7, 6]]))
    assert torch.allclose(packed[0, 5:9], alone[0], atol=1e-5)
    other = tokens.copy()
    other[:5] = [3, 3, 3, 3, 3]  # another first dialogue changes nothing in the second
    changed, _ = model(torch.from_numpy(other[None, :-1]), position_ids=torch.from_numpy(positions[None]),
                       segment_ids=segment_ids_from_cu_seqlens([offsets], 12))
    assert torch.allclose(changed[0, 5:], packed[0, 5:], atol=1e-6)


def test_the_sft_loss_is_the_mean_over_learned_targets():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                    max_seq_len=16))
    examples = [_example(f"e{i}", list(range(1 + i, 7 + i)), [False, False, False, True, True, True])
                for i in range(4)]
    batch = PackedSFTSampler(examples, seq_len=12, batch_size=2, pad_id=0).next_batch()
    tokens = torch.from_numpy(batch.tokens)
    logits, loss = model(tokens[:, :-1], masked_targets(batch, tokens))
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1),
                                                  reduction="none").view(2, 12)
    mask = torch.from_numpy(batch.loss_mask)
    assert mask.sum() == 2 * 2 * 3  # 3 learned tokens a dialogue, 2 dialogues a row
    assert loss.item() == pytest.approx((per_token * mask).sum().item() / mask.sum().item(), rel=1e-6)


def test_the_sft_sampler_resumes_where_it_stopped_and_refuses_other_data():
    examples = [_example(f"e{i}", list(range(1, 3 + i % 7)), [False] + [True] * (1 + i % 7)) for i in range(40)]
    first = PackedSFTSampler(examples, seq_len=15, batch_size=2, pad_id=0, seed=3)
    for _ in range(5):
        first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch().ids for _ in range(6)]  # crosses an epoch boundary
    again = PackedSFTSampler(examples, seq_len=15, batch_size=2, pad_id=0, seed=3)
    again.load_state_dict(state)
    assert [again.next_batch().ids for _ in range(6)] == expected
    other = PackedSFTSampler(examples[:-1], seq_len=15, batch_size=2, pad_id=0, seed=3)
    with pytest.raises(ValueError, match="same data"):
        other.load_state_dict(state)


def test_derived_pairs_differ_where_correctness_lives():
    from mixlab.pipelines.preference_pairs import other_reply_pairs, worked_answer_pair
    from mixlab.training.posttrain import Dialogue, gsm8k_dialogue

    rng = np.random.default_rng(0)
    dialogue = Dialogue("g1", gsm8k_dialogue("Tom has 3 apples and buys 4. How many?",
                                             "3 + 4 = <<3+4=7>>7\n#### 7"), "chat-reasoning")
    pair = worked_answer_pair(dialogue, rng)
    chosen, rejected = pair.completions
    assert chosen == {"content": "The answer is 7.", "reasoning": "3 + 4 = 7"}
    wrong = rejected["content"].removeprefix("The answer is ").removesuffix(".")
    assert wrong != "7" and rejected["reasoning"] == f"3 + 4 = {wrong}"
    chats = [Dialogue(f"d{i}", [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
                      "chat", language="en" if i < 3 else "de") for i in range(5)]
    pairs = other_reply_pairs(chats, rng)
    assert len(pairs) == 5
    language = {f"a{i}": c.language for i, c in enumerate(chats)}
    for p in pairs:
        assert p.completions[0] != p.completions[1]
        assert language[p.completions[0]["content"]] == language[p.completions[1]["content"]]
