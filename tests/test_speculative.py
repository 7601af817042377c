"""The speculative-decoding engine, drafters, acceptance rules (strict, sampling, FLy) and Hub folders."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GenerationConfig, StaticCache
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.generation.streamers import BaseStreamer

from hf_compress import _compat
from hf_compress.assets import tiny_model
from hf_compress.cache import cache_kwargs
from hf_compress.hub import load_card
from hf_compress.speculative import (
    CachedSequence,
    FLy,
    LooseVerification,
    ModelDrafter,
    NgramDrafter,
    SpeculativeDecoding,
    SpeculativeSampling,
    StrictGreedy,
    strategy_from_dict,
    top_k_entropy,
    verify_and_advance,
)
from hf_compress.speculative.strategies import custom_generate_requirement


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "gpt2", "opt"]
PROMPTS = ["abcabcabcab hello abc", "xy", "the cat sat on the mat, the cat sat"]


def perturbed(model, scale: float, seed: int = 0):
    """A draft that agrees with ``model`` often but not always: its weights plus relative noise."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std())
    return draft


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    """(target, draft, tokenizer) where the draft's guesses are partly accepted, partly rolled back."""
    model, tok = tiny_model(request.param)
    tok.padding_side = "left"
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    for scale in (0.05, 0.1, 0.2, 0.3, 0.5):
        draft = perturbed(model, scale)
        probe = SpeculativeDecoding(draft, draft_confidence_threshold=None, num_draft_tokens=4)
        model.generate(ids, max_new_tokens=40, do_sample=False, custom_generate=probe)
        if 0 < probe.last_metrics.draft_tokens_accepted < probe.last_metrics.draft_tokens_proposed:
            return model, draft, tok
    raise AssertionError("no noise scale gives a partly right draft")


# ------------------------------------------------------------------------------------ greedy equality
@pytest.mark.compat_smoke
def test_strict_strategies_equal_greedy_generate(pair):
    model, draft, tok = pair
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    reference = model.generate(ids, max_new_tokens=40, do_sample=False)
    strategies = [
        SpeculativeDecoding(),  # n-gram drafter
        SpeculativeDecoding(draft, draft_confidence_threshold=None, num_draft_tokens=4),
        SpeculativeDecoding(draft, draft_confidence_threshold=None, num_draft_tokens=6, use_ngram=True),  # multi-level drafting
        FLy(draft, loose=False),
        FLy(loose=False),
    ]
    rolled_back = 0
    for strategy in strategies:
        out = model.generate(ids, max_new_tokens=40, do_sample=False, custom_generate=strategy)
        assert torch.equal(out, reference), type(strategy).__name__
        m = strategy.last_metrics
        # Every strategy drafted something right, so it needed fewer target forwards than tokens.
        assert m.new_tokens == 40 and m.draft_tokens_accepted > 0 and m.target_forwards < m.new_tokens, m
        rolled_back += m.draft_tokens_proposed - m.draft_tokens_accepted
    model_drafted = strategies[1].last_metrics
    # The draft is sometimes right and sometimes wrong, so both acceptance and roll-back are exercised.
    assert 0 < model_drafted.draft_tokens_accepted < model_drafted.draft_tokens_proposed
    assert rolled_back > 0


def test_batched_left_padded_equals_greedy(pair):
    model, draft, tok = pair
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()
    reference = model.generate(**enc, max_new_tokens=25, do_sample=False)
    for strategy in (SpeculativeDecoding(), FLy(draft, loose=False),
                     SpeculativeDecoding(draft, draft_confidence_threshold=None, num_draft_tokens=4)):
        out = model.generate(**enc, max_new_tokens=25, do_sample=False, custom_generate=strategy)
        assert torch.equal(out, reference), type(strategy).__name__
        assert strategy.last_metrics.rows == 3


def test_eos_and_pad_like_generate():
    model, tok = tiny_model("llama")
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    plain = model.generate(**enc, max_new_tokens=12, do_sample=False)
    # Make the second row's 3rd generated token the EOS: that row must stop there and be padded after it.
    eos = int(plain[1, enc.input_ids.shape[1] + 2])
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    reference = model.generate(**enc, **kwargs)
    strategy = SpeculativeDecoding(perturbed(model, 0.05), draft_confidence_threshold=None, num_draft_tokens=5)
    out = model.generate(**enc, **kwargs, custom_generate=strategy)
    assert torch.equal(out, reference)
    assert (out[1, enc.input_ids.shape[1] + 3 :] == 0).all()


def test_logits_processors_and_scores_like_generate():
    model, tok = tiny_model("qwen3")
    ids = tok(PROMPTS[2:], return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=20, do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2,
                  return_dict_in_generate=True, output_scores=True)
    reference = model.generate(ids, **kwargs)
    strategy = SpeculativeDecoding(perturbed(model, 0.05), draft_confidence_threshold=None, num_draft_tokens=4)
    out = model.generate(ids, **kwargs, custom_generate=strategy)
    assert torch.equal(out.sequences, reference.sequences)
    assert len(out.scores) == len(reference.scores) == 20
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(reference.scores), atol=1e-4, rtol=1e-4)
    assert out.metrics is strategy.last_metrics


@pytest.mark.compat_smoke
def test_streamer_receives_prompt_then_each_round_s_tokens():
    model, tok = tiny_model("llama")
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids

    class Recorder(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    recorder = Recorder()
    strategy = SpeculativeDecoding()
    out = model.generate(ids, max_new_tokens=15, do_sample=False, streamer=recorder, custom_generate=strategy)
    assert recorder.ended
    assert sum(recorder.chunks, []) == out[0].tolist()
    assert len(recorder.chunks) == 1 + strategy.last_metrics.target_forwards  # the prompt, then one chunk per round


def test_decode_rate_leaves_out_the_first_round():
    """An answer finished in its first round has no decode rate, however many tokens that round accepted."""
    from hf_compress.evaluation.speed import measure_generation_speed

    model, tok = tiny_model("llama")
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    # the target drafting for itself: every draft is accepted
    echo = SpeculativeDecoding(model, draft_confidence_threshold=None, num_draft_tokens=4)
    one_round = measure_generation_speed(model, tok, [ids], max_new_tokens=5, warmup=0, progress=False,
                                         custom_generate=echo)
    assert one_round["new_tokens"] == [5] and one_round["strategy_metrics"][0]["target_forwards"] == 1
    assert "decode_tokens_per_second" not in one_round
    two_rounds = measure_generation_speed(model, tok, [ids], max_new_tokens=10, warmup=0, progress=False,
                                          custom_generate=echo)
    assert two_rounds["strategy_metrics"][0]["target_forwards"] == 2 and two_rounds["decode_tokens_per_second"] > 0


def test_sampling_is_reproducible_and_respects_warpers():
    model, tok = tiny_model("llama")
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    strategy = SpeculativeDecoding(perturbed(model, 0.05), draft_confidence_threshold=None, num_draft_tokens=4)
    kwargs = dict(max_new_tokens=20, do_sample=True, top_k=1, custom_generate=strategy)
    # top_k=1 makes sampling deterministic: it must then equal greedy decoding.
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, max_new_tokens=20, do_sample=False))
    torch.manual_seed(0)
    first = model.generate(ids, max_new_tokens=20, do_sample=True, custom_generate=strategy)
    torch.manual_seed(0)
    assert torch.equal(first, model.generate(ids, max_new_tokens=20, do_sample=True, custom_generate=strategy))
    # Sampling really samples (a greedy rule would make the seeds agree) through the speculative-sampling rule.
    assert isinstance(strategy.acceptance_rule(GenerationConfig(do_sample=True)), SpeculativeSampling)
    torch.manual_seed(1)
    assert not torch.equal(first, model.generate(ids, max_new_tokens=20, do_sample=True, custom_generate=strategy))


def test_speculative_sampling_matches_target_distribution():
    # One draft position, V = 3: the emitted first token must follow p whatever the (one-hot) draft is.
    p_logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    logits = torch.stack([p_logits, p_logits]).expand(20000, 2, 3)
    drafts = torch.full((20000, 1), 1)
    verdict = SpeculativeSampling(torch.Generator().manual_seed(0)).verify(drafts, logits)
    first = torch.where(verdict.num_accepted > 0, drafts[:, 0], verdict.next_token)
    frequencies = torch.bincount(first, minlength=3).float() / 20000
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.2]), atol=0.015, rtol=0)


# ------------------------------------------------------------------------------------ FLy rule
def _logits(choices: list[int], vocab: int = 16, confident: bool = False) -> torch.Tensor:
    """Target logits whose argmax at position i is ``choices[i]``; flat (high entropy) unless confident."""
    logits = torch.zeros(1, len(choices), vocab)
    for i, c in enumerate(choices):
        logits[0, i, c] = 20.0 if confident else 1.0
    return logits


def _drafts_with_mismatches(k: int, mismatches: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    target = [3] * (k + 1)
    drafts = torch.tensor([[5 if i in mismatches else 3 for i in range(k)]])
    return drafts, torch.tensor(target)


@pytest.mark.parametrize(
    ("mismatches", "expected"),
    [
        ([0], 15),  # mismatch followed by 5 matches: accepted (window satisfied), everything kept
        ([0, 3], 0),  # window broken at position 3: cut at 0
        ([11], 11),  # inside the last 6 positions: exact match only, cut there
        ([9], 9),  # i = k - W: the official code reverts this one to exact match too
        ([8], 15),  # i = k - W - 1: the last position where the window applies
        ([], 15),
    ],
)
def test_fly_window(mismatches, expected):
    choices = torch.arange(16)  # the target picks token i at position i (15: the bonus position)
    wrong = torch.isin(torch.arange(15), torch.tensor(mismatches, dtype=torch.long))
    drafts = torch.where(wrong, (choices[:15] + 1) % 16, choices[:15])[None]
    verdict = LooseVerification().verify(drafts, _logits(choices.tolist()))
    assert verdict.num_accepted.item() == expected
    # The target's choice at the cut position (its correction), or its bonus token after a full acceptance.
    assert verdict.next_token.item() == expected


def test_fly_entropy_gate_and_ablations():
    drafts, choices = _drafts_with_mismatches(15, [0])
    confident = _logits(choices.tolist(), confident=True)
    assert top_k_entropy(confident[0, 0]) < 0.3 < top_k_entropy(_logits(choices.tolist())[0, 0])
    assert LooseVerification().verify(drafts, confident).num_accepted.item() == 0  # gate closed
    assert LooseVerification(entropy_threshold=0.0).verify(drafts, confident).num_accepted.item() == 15  # gate off
    # No window (abla_no_window): every gated-open mismatch is kept, even with a broken window.
    drafts2, choices2 = _drafts_with_mismatches(15, [0, 3])
    assert LooseVerification(use_window=False).verify(drafts2, _logits(choices2.tolist())).num_accepted.item() == 15
    assert LooseVerification(loose=False).verify(drafts, _logits(choices.tolist())).num_accepted.item() == 0


def test_fly_gate_stays_closed_when_a_logits_processor_leaves_fewer_than_top_k_tokens():
    """A token a processor banned (-inf) adds nothing to the entropy (0 · -inf was NaN, which opened the gate)."""
    logits = torch.full((1, 4, 8), -torch.inf)
    logits[..., 0], logits[..., 1] = 10.0, 0.0  # two tokens allowed; the target is sure of token 0
    assert 0.0 < float(top_k_entropy(logits[0, 0])) < 0.01
    verdict = LooseVerification(0.3, window=2).verify(torch.tensor([[1, 0, 0]]), logits)
    assert verdict.num_accepted.tolist() == [0] and verdict.next_token.tolist() == [0]


def test_fly_keeps_draft_token_when_loosely_accepted():
    model, tok = tiny_model("llama")
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    fly = FLy(perturbed(model, 0.3), num_draft_tokens=8, window=2, entropy_threshold=0.0)
    out = model.generate(ids, max_new_tokens=30, do_sample=False, custom_generate=fly)
    reference = model.generate(ids, max_new_tokens=30, do_sample=False)
    assert out.shape == reference.shape
    assert not torch.equal(out, reference)  # loosened: differs from the target's greedy text ...
    assert fly.last_metrics.draft_tokens_accepted > 0  # ... because it keeps drafts the target would not pick


def test_fly_sampling_path_runs():
    model, tok = tiny_model("gemma3")
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=True, custom_generate=FLy(perturbed(model, 0.05)))
    assert out.shape == (1, ids.shape[1] + 12)


# ------------------------------------------------------------------------------------ pieces
def test_ngram_drafter_earliest_match_and_reuse():
    drafter = NgramDrafter(max_ngram_size=2, reuse_last_proposal=True)
    ids = torch.tensor([[1, 2, 3, 9, 1, 2, 4, 1, 2]])
    assert drafter.propose(ids, None, 3).tokens.tolist() == [[3, 9, 1]]  # earliest "1 2", not the later one
    assert drafter.propose(torch.tensor([[7, 8]]), None, 3).tokens.tolist() == [[3, 9, 1]]  # no match: reused
    assert NgramDrafter().propose(torch.tensor([[7, 8]]), None, 3).tokens.shape == (1, 0)


def test_min_ngram_size_skips_one_token_matches_and_keeps_strict_output():
    model, tok = tiny_model("llama")
    # The context ends in token 5, seen once before (then followed by 6 7 8); no longer suffix recurs.
    ids = torch.tensor([[9, 5, 6, 7, 8, 3, 4, 5]])
    assert NgramDrafter(2, min_ngram_size=1).propose(ids, None, 3).tokens.tolist() == [[6, 7, 8]]
    assert NgramDrafter(2, min_ngram_size=2).propose(ids, None, 3).tokens.shape == (1, 0)
    reference = model.generate(ids, max_new_tokens=12, do_sample=False)
    proposed = {}
    for minimum in (1, 2):
        for strategy in (SpeculativeDecoding(min_ngram_size=minimum), FLy(loose=False, min_ngram_size=minimum)):
            out = model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=strategy)
            assert torch.equal(out, reference)
            assert strategy.drafter_for(model).min_ngram_size == minimum
            assert strategy_from_dict(strategy.to_dict()).min_ngram_size == minimum
            proposed[minimum, type(strategy)] = strategy.last_metrics.draft_tokens_proposed
    assert proposed[2, SpeculativeDecoding] < proposed[1, SpeculativeDecoding]
    old = SpeculativeDecoding().to_dict()
    del old["min_ngram_size"]  # a folder saved before the argument existed
    assert strategy_from_dict(old).min_ngram_size == 1
    accelerated = SpeculativeDecoding(perturbed(model, 0.1), use_ngram=True, min_ngram_size=2)
    assert accelerated.drafter_for(model).accelerator.min_ngram_size == 2  # the draft model's n-gram lookup too
    with pytest.raises(ValueError, match="min_ngram_size .3. is above max_ngram_size .2."):
        FLy(max_ngram_size=2, min_ngram_size=3)


def test_cache_lengths_after_rollback():
    model, tok = tiny_model("gemma3")  # sliding-window layers too
    sequence = CachedSequence(model, DynamicCache(config=model.config))
    prompt = torch.arange(3, 43).unsqueeze(0)  # 40 tokens: past the 32-token window
    greedy = model(prompt).logits[0, -1].argmax()
    drafts = torch.tensor([[int(greedy), 7, 7, 7]])
    step = verify_and_advance(sequence, prompt, drafts, StrictGreedy())
    accepted = int(step.verdict.num_accepted)
    assert 1 <= accepted < 4  # the greedy token is accepted and a 7 rejected: a real roll-back
    assert sequence.length == sequence.cache.get_seq_length() == 40 + accepted
    assert step.tokens.shape[1] == accepted + 1
    # The rolled-back cache continues exactly like a fresh one.
    full = torch.cat([prompt, step.tokens], dim=1)
    next_logits = sequence.feed(step.tokens[:, -1:])
    torch.testing.assert_close(next_logits[0, -1], model(full).logits[0, -1].float(), atol=1e-4, rtol=1e-4)


def test_model_drafter_resyncs_by_common_prefix():
    model, _ = tiny_model("llama")
    drafter = ModelDrafter(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    first = drafter.propose(ids, None, 4).tokens
    # Only the first drafted token is "accepted", then a different token follows: the cache is cropped back.
    second = drafter.propose(torch.cat([ids, first[:, :1], torch.tensor([[99]])], dim=1), None, 3).tokens
    fresh = ModelDrafter(model).propose(torch.cat([ids, first[:, :1], torch.tensor([[99]])], dim=1), None, 3).tokens
    assert torch.equal(second, fresh)



def _peaked_draft(seed: int = 0, noise: float = 0.0):
    """A tiny draft whose own greedy tokens get probabilities spread over (0, 1): a random tiny model gives every
    token about 1/vocab, which any confidence threshold would cut at once. With ``noise`` it is the target
    (``tiny_model("llama", seed)``) perturbed, so the target rejects some of its tokens."""
    draft, _ = tiny_model("llama", seed=seed)
    if noise:
        draft = perturbed(draft, noise)
    with torch.no_grad():
        draft.lm_head.weight.mul_(40)
    return draft


def _kept_by_threshold(draft, ids: torch.Tensor, tokens: torch.Tensor, threshold: float) -> int:
    """How many of ``tokens`` a draft with this confidence threshold keeps: up to and including the position by which
    every row has drafted a token its draft gives a probability below ``threshold`` (all of them if some row never
    has)."""
    with torch.no_grad():
        logits = draft(torch.cat([ids, tokens], dim=1)).logits[:, ids.shape[1] - 1 : -1].float()
    unsure = torch.softmax(logits, -1).amax(-1) < threshold  # (B, n)
    every_row_by = [all(bool(row[: i + 1].any()) for row in unsure) for i in range(tokens.shape[1])]
    return every_row_by.index(True) + 1 if any(every_row_by) else tokens.shape[1]


@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "ngram-accelerated"])
@pytest.mark.parametrize(("rows", "threshold"), [([0], 0.5), ([1], 0.5), ([0, 1], 0.5), ([0, 1], 0.8)],
                         ids=["row0", "row1", "batch", "batch-rows-unsure-at-different-tokens"])
def test_model_drafter_stops_after_the_first_unsure_token(accelerated, rows, threshold):
    draft = _peaked_draft()
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7], [9, 10, 11, 12, 13, 14, 15]])[rows]
    full = ModelDrafter(draft).propose(ids, None, 8).tokens
    expected = _kept_by_threshold(draft, ids, full, threshold)
    assert 1 < expected < 8  # the case under test: a cut inside the draft, not at either end
    if threshold == 0.8:  # the rows' first unsure tokens differ, and no position is unsure in both rows before the cut
        assert _kept_by_threshold(draft, ids[:1], full[:1], threshold) != _kept_by_threshold(draft, ids[1:], full[1:], threshold)
    accelerator = NgramDrafter(2, reuse_last_proposal=True) if accelerated else None
    cut = ModelDrafter(draft, accelerator, confidence_threshold=threshold).propose(ids, None, 8).tokens
    assert torch.equal(cut, full[:, :expected])
    assert ModelDrafter(draft, confidence_threshold=0.0).propose(ids, None, 8).tokens.shape[1] == 8
    assert ModelDrafter(draft, confidence_threshold=1.0).propose(ids, None, 8).tokens.shape[1] == 1


def test_a_draft_cache_started_unpadded_masks_padding_that_appears_later():
    # A cross-tokenizer drafter re-encodes each round: rows of equal length can become left-padded later on.
    draft = _peaked_draft()
    first = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    later = torch.tensor([[5, 6, 7, 8, 20, 21], [0, 0, 9, 10, 11, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    reused = ModelDrafter(draft)
    reused.propose(first, None, 3)
    assert torch.equal(reused.propose(later, mask, 3).tokens, ModelDrafter(draft).propose(later, mask, 3).tokens)


def test_finished_rows_do_not_keep_a_confidence_stopped_draft_going():
    draft = _peaked_draft()
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7], [9, 10, 11, 12, 13, 14, 15]])
    full = ModelDrafter(draft).propose(ids, None, 8).tokens
    row1_alone = _kept_by_threshold(draft, ids[1:], full[1:], 0.7)
    assert row1_alone < _kept_by_threshold(draft, ids, full, 0.7)  # row 0 alone would draft longer
    drafter = ModelDrafter(draft, confidence_threshold=0.7)
    cut = drafter.propose(ids, None, 8, active=torch.tensor([False, True])).tokens
    assert torch.equal(cut, full[:, :row1_alone])  # the finished row 0 no longer decides how long the draft runs
    assert torch.equal(ModelDrafter(draft, confidence_threshold=0.7).propose(ids, None, 8, active=torch.tensor([True, True])).tokens,
                       ModelDrafter(draft, confidence_threshold=0.7).propose(ids, None, 8).tokens)

    class Recording:  # a drafter that takes ``active``, and one written for the two-argument protocol
        def __init__(self, takes_active: bool):
            self.inner, self.seen = NgramDrafter(2), []
            if takes_active:
                self.propose = self._propose_with_active

        def reset(self):
            self.inner.reset()

        def propose(self, input_ids, attention_mask, max_tokens):
            self.seen.append(None)
            return self.inner.propose(input_ids, attention_mask, max_tokens)

        def _propose_with_active(self, input_ids, attention_mask, max_tokens, active=None):
            self.seen.append(active.tolist())
            return self.inner.propose(input_ids, attention_mask, max_tokens)

    model, tok = tiny_model("llama")
    tok.padding_side = "left"
    inputs = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    reference = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    eos = int(reference[0, inputs.input_ids.shape[1] + 2])  # row 0's third new token ends row 0 early
    reference = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    for takes_active in (True, False):
        drafter = Recording(takes_active)
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0,
                             custom_generate=SpeculativeDecoding(drafter=drafter, num_draft_tokens=3))
        assert torch.equal(out, reference)
        if takes_active:
            assert drafter.seen[0] == [True, True] and [False, True] in drafter.seen
        else:
            assert set(drafter.seen) == {None}


def test_draft_confidence_threshold_keeps_strict_output_and_drafts_less():
    model, tok = tiny_model("llama")
    tok.padding_side = "left"
    draft = _peaked_draft(noise=0.3)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    for inputs in ({"input_ids": enc.input_ids[2:]}, dict(enc)):  # one row, then a left-padded batch
        reference = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        metrics = {}
        for threshold in (None, 0.5):
            strategy = SpeculativeDecoding(draft, num_draft_tokens=6, draft_confidence_threshold=threshold)
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False, custom_generate=strategy)
            assert torch.equal(out, reference)
            metrics[threshold] = strategy.last_metrics
            assert strategy_from_dict(strategy.to_dict()).draft_confidence_threshold == threshold
        full = metrics[None]
        assert 0 < full.draft_tokens_accepted_by_rule < full.draft_tokens_proposed  # the target rejects some drafts
        assert metrics[0.5].draft_tokens_proposed < full.draft_tokens_proposed
    assert SpeculativeDecoding(draft).draft_confidence_threshold == 0.4  # transformers' assisted-generation default
    assert FLy(draft).draft_confidence_threshold is None  # FLy's window reads the drafts after a mismatch
    old = SpeculativeDecoding(draft).to_dict()
    del old["draft_confidence_threshold"]  # a folder saved before the argument existed
    assert strategy_from_dict(old).draft_confidence_threshold == 0.4
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="draft_confidence_threshold"):
            SpeculativeDecoding(draft, draft_confidence_threshold=bad)


# ------------------------------------------------------------------------------------ bad input
def test_stopping_inside_a_round_leaves_generates_cache():
    model, tok = tiny_model("llama")
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    plain = model.generate(ids, max_new_tokens=20, do_sample=False)
    eos = int(plain[0, ids.shape[1] + 3])  # the fourth new token ends the answer, inside the first round
    kwargs = dict(max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True)
    reference = model.generate(ids, **kwargs)
    strategy = SpeculativeDecoding(copy.deepcopy(model), num_draft_tokens=8, draft_confidence_threshold=None)
    out = model.generate(ids, **kwargs, custom_generate=strategy)
    assert torch.equal(out.sequences, reference.sequences)
    assert out.past_key_values.get_seq_length() == reference.past_key_values.get_seq_length() == out.sequences.shape[1] - 1
    follow = torch.cat([out.sequences, torch.tensor([[5, 6, 7]])], dim=1)  # the conversation goes on from that cache
    continued = model.generate(follow, **cache_kwargs(model, out.past_key_values), max_new_tokens=4, do_sample=False)
    assert torch.equal(continued, model.generate(follow, max_new_tokens=4, do_sample=False))


def test_the_call_hands_back_a_trimmable_cache_and_holds_no_draft_state():
    """As generate(): the returned Gemma3 cache's sliding layers stop recording their past, so decoding on trims them
    to the window again; the draft model's cache is released when the call returns, not at the next call."""
    model, tok = tiny_model("gemma3")
    window = model.config.sliding_window
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    strategy = SpeculativeDecoding(perturbed(model, 0.1), num_draft_tokens=4, draft_confidence_threshold=None)
    out = model.generate(ids, max_new_tokens=window, do_sample=False, return_dict_in_generate=True,
                         custom_generate=strategy)
    assert strategy._drafter._sequence is None
    sliding = [layer for layer in out.past_key_values.layers if getattr(layer, "sliding_window", None)]
    assert sliding and not any(layer.record_past for layer in sliding)
    model.generate(out.sequences, **cache_kwargs(model, out.past_key_values), max_new_tokens=window, do_sample=False)
    assert all(layer.keys.shape[-2] < window for layer in sliding)


def test_inputs_on_another_device_than_the_model_are_refused_with_the_move_to_make(monkeypatch):
    """generate() accepts inputs left on the CPU for a model on a GPU; the strategies say to move them instead of
    failing on a device mismatch deep in a round (a device the model is not on is simulated here)."""
    model, tok = tiny_model("llama")
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 0)))
    with pytest.raises(ValueError, match=r"inputs are on cpu but the model is on cuda:0.*inputs.to\(model.device\)"):
        model.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=SpeculativeDecoding())


def _sentencepiece_like_tokenizer(words):
    """A word-level tokenizer that marks word starts with "▁" and drops a text's leading space on decode, as
    SentencePiece tokenizers (Llama, Gemma) do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, **{f"\u2581{w}": i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>")


def test_cross_tokenizer_drafts_keep_the_space_a_sentencepiece_draft_decodes_away():
    """Decoded alone, a SentencePiece draft's new words lose the space before them ("sat on", not " sat on"); the
    target then re-encoded a text that does not continue its sequence. They are decoded with the context now."""
    from hf_compress.assets import tiny_tokenizer
    from hf_compress.speculative.drafting import CrossTokenizerDrafter, Draft

    draft_tok, target_tok = _sentencepiece_like_tokenizer(["the", "cat", "sat", "on", "mat"]), tiny_tokenizer()
    draft_model, _ = tiny_model("llama", vocab_size=len(draft_tok))
    drafter = CrossTokenizerDrafter(draft_model, target_tok, draft_tok)

    class Proposes:  # the draft model's greedy continuation, fixed: "▁sat ▁on"
        def reset(self):
            pass

        def propose(self, input_ids, attention_mask, max_tokens, active=None):
            assert draft_tok.decode(input_ids[0]) == "the cat"  # the target's text, re-encoded for the draft
            return Draft(torch.tensor([draft_tok.convert_tokens_to_ids(["\u2581sat", "\u2581on"])]))

    drafter.inner = Proposes()
    ids = target_tok("the cat", return_tensors="pt").input_ids
    proposal = drafter.propose(ids, None, 10).tokens
    assert target_tok.decode(proposal[0]) == " sat o"  # the last re-encoded token may be a cut word: dropped


def test_scores_are_kept_only_when_a_dict_output_returns_them():
    from transformers import MaxLengthCriteria, StoppingCriteriaList

    from hf_compress.speculative.engine import speculative_decode

    model, tok = tiny_model("llama")
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    for returned in (False, True):
        config = GenerationConfig(max_length=ids.shape[1] + 6, do_sample=False, output_scores=True,
                                  output_logits=True, return_dict_in_generate=returned)
        _, _, extras = speculative_decode(model, ids, NgramDrafter(), StrictGreedy(), 4, generation_config=config,
                                          stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(config.max_length)]))
        assert (extras["scores"] is not None, extras["logits"] is not None) == (returned, returned)


@pytest.mark.parametrize("target_rows, draft_rows", [(320, 256), (256, 320)], ids=["draft smaller", "draft larger"])
def test_a_draft_padded_to_another_vocabulary_size_drafts_with_the_same_tokenizer(target_rows, draft_rows):
    """Qwen2.5-0.5B (151,936 rows) drafting for the 7B (152,064): one tokenizer, embeddings padded differently. Given
    both tokenizers it drafts token ids (never a row past the target's vocabulary); without them it says to pass them."""
    model, tok = tiny_model("llama", vocab_size=target_rows)
    draft, _ = tiny_model("llama", seed=1, vocab_size=draft_rows)
    with torch.no_grad():  # the larger draft prefers its padding rows: they must never be proposed
        draft.lm_head.weight[256:] = 0.0
        draft.lm_head.weight[256:, 0] = 1e3
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    reference = model.generate(ids, max_new_tokens=12, do_sample=False)
    strategy = SpeculativeDecoding(draft, tokenizer=tok, draft_tokenizer=tok, num_draft_tokens=4)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=strategy), reference)
    assert type(strategy._drafter).__name__ == "ModelDrafter"
    with pytest.raises(ValueError, match=rf"vocabulary \({draft_rows} tokens\) differs .*Pass both `tokenizer=`"):
        model.generate(ids, max_new_tokens=2, do_sample=False, custom_generate=SpeculativeDecoding(draft))


def test_rows_stopped_without_eos_are_decoded_on_as_generate_does():
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, tok = tiny_model("llama")
    tok.padding_side = "left"
    model.generation_config.eos_token_id = None
    inputs = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    start = inputs.input_ids.shape[1]

    class FirstRowAfterThree(StoppingCriteria):  # no eos_token_id: generate() does not pad the stopped row
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            done[0] = input_ids.shape[1] >= start + 3
            return done

    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    reference = model.generate(**inputs, stopping_criteria=StoppingCriteriaList([FirstRowAfterThree()]), **kwargs)
    out = model.generate(**inputs, stopping_criteria=StoppingCriteriaList([FirstRowAfterThree()]), **kwargs,
                         custom_generate=SpeculativeDecoding(perturbed(model, 0.05), num_draft_tokens=4))
    assert torch.equal(out, reference) and not (reference[0, start + 3:] == 0).all()


def test_strict_fly_samples_from_the_target():
    assert isinstance(FLy(loose=False).acceptance_rule(GenerationConfig(do_sample=True)), SpeculativeSampling)
    assert isinstance(FLy(loose=False).acceptance_rule(GenerationConfig(do_sample=False)), StrictGreedy)
    assert isinstance(FLy().acceptance_rule(GenerationConfig(do_sample=True)), LooseVerification)


def test_stop_strings_through_a_saved_folder_and_as_a_criterion(tmp_path):
    from transformers import StopStringCriteria, StoppingCriteriaList

    model, tok = tiny_model("llama")
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:]
    stop = next(text for text in map(tok.decode, new[4:].split(1)) if text.isascii() and text.isprintable() and text.strip())
    reference = model.generate(ids, max_new_tokens=20, do_sample=False, stop_strings=[stop], tokenizer=tok)
    assert reference.shape[1] < ids.shape[1] + 20  # the stop string ends it early
    folder = SpeculativeDecoding(num_draft_tokens=5).save_pretrained(tmp_path / "strategy")
    out = model.generate(ids, max_new_tokens=20, do_sample=False, stop_strings=[stop], tokenizer=tok,
                         custom_generate=str(folder), trust_remote_code=True)
    assert torch.equal(out, reference)
    # A strategy object gets no tokenizer from transformers: the criterion is passed directly.
    out = model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=SpeculativeDecoding(num_draft_tokens=5),
                         stopping_criteria=StoppingCriteriaList([StopStringCriteria(tok, [stop])]))
    assert torch.equal(out, reference)


def test_bad_input_errors(tmp_path):
    model, tok = tiny_model("llama")
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="num_draft_tokens"):
        SpeculativeDecoding(num_draft_tokens=0)
    gpt2, _ = tiny_model("gpt2")
    gpt2.resize_token_embeddings(300)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, max_new_tokens=4, custom_generate=SpeculativeDecoding(gpt2))
    with pytest.raises(ValueError, match="both"):
        SpeculativeDecoding(gpt2, tokenizer=tok)
    with pytest.raises(ValueError, match="static cache"):
        model.generate(ids, max_new_tokens=4, custom_generate=SpeculativeDecoding(), cache_implementation="static")
    with pytest.raises(ValueError, match="static cache"):
        CachedSequence(model, StaticCache(config=model.config, max_cache_len=64))
    from transformers import QuantizedCache

    with pytest.raises(ValueError, match="Fp8QuantizedLayer layers cannot do"):  # has crop(), cannot undo its states
        model.generate(ids, max_new_tokens=4, **cache_kwargs(model, QuantizedCache(backend="fp8", config=model.config)),
                       custom_generate=SpeculativeDecoding())
    with pytest.raises(ValueError, match="beam"):
        model.generate(ids, max_new_tokens=4, num_beams=2, custom_generate=SpeculativeDecoding())
    with pytest.raises(ValueError, match="window"):
        FLy(window=0)
    meta_draft = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match="draft_model.to"):
        model.generate(ids, max_new_tokens=4, custom_generate=SpeculativeDecoding(meta_draft))
    with pytest.raises(ValueError, match="custom drafter"):
        SpeculativeDecoding(drafter=NgramDrafter()).to_dict()
    with pytest.raises(ValueError, match="Unknown decoding strategy"):
        strategy_from_dict({"method": "medusa"})


def test_cross_tokenizer_drafting_is_exact(tmp_path):
    """A draft with another vocabulary (GPT-2 tiny, byte tokenizer with 300 rows) drafts through text."""
    model, tok = tiny_model("llama")
    draft, draft_tok = tiny_model("gpt2")
    draft.resize_token_embeddings(300)
    draft_tok = copy.deepcopy(draft_tok)
    draft_tok.add_tokens(["<extra>"])  # different vocabularies, same text space
    ids = tok(PROMPTS[2:], return_tensors="pt").input_ids
    reference = model.generate(ids, max_new_tokens=20, do_sample=False)
    strategy = SpeculativeDecoding(draft, draft_confidence_threshold=None, tokenizer=tok, draft_tokenizer=draft_tok,
                                   num_draft_tokens=4)
    assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=strategy), reference)
    assert strategy.last_metrics.draft_tokens_proposed > 0
    unsure = SpeculativeDecoding(draft, tokenizer=tok, draft_tokenizer=draft_tok, num_draft_tokens=4)
    assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=unsure), reference)
    assert unsure.drafter_for(model).inner.confidence_threshold == 0.4  # the early stop reaches the inner drafter
    assert unsure.last_metrics.draft_tokens_proposed < strategy.last_metrics.draft_tokens_proposed
    # The target itself as the draft, behind another tokenizer: the text re-alignment must keep its drafts. Its
    # byte tokens >= 128 are silenced: alone they are not UTF-8, so no text round trip could carry them.
    ascii_model = copy.deepcopy(model)
    with torch.no_grad():
        ascii_model.get_output_embeddings().weight[128:] = 0
    reference = ascii_model.generate(ids, max_new_tokens=20, do_sample=False)
    assert int(reference.max()) < 128
    same = SpeculativeDecoding(ascii_model, draft_confidence_threshold=None, tokenizer=tok,
                               draft_tokenizer=_with_extra_token(tok), num_draft_tokens=4)
    assert torch.equal(ascii_model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=same), reference)
    assert same.last_metrics.acceptance_rate > 0.9, same.last_metrics


def _with_extra_token(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(["<extra>"])
    return tokenizer


# ------------------------------------------------------------------------------------ Hub folder
@pytest.mark.compat_smoke
def test_save_load_and_push_custom_generate_folder(tmp_path, fake_hub, monkeypatch):
    model, tok = tiny_model("llama")
    draft = perturbed(model, 0.05)
    draft.save_pretrained(tmp_path / "draft")
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft")  # name_or_path is what the folder records
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    reference = model.generate(ids, max_new_tokens=20, do_sample=False)
    strict = FLy(draft, loose=False, window=4)
    folder = strict.save_pretrained(tmp_path / "fly-strict")
    assert (folder / "custom_generate" / "generate.py").is_file() and (folder / "README.md").is_file()
    card = load_card(folder).data  # a strategy, not a model: no text-generation pipeline tag for the Hub to offer
    assert card.pipeline_tag is None and card.library_name == "transformers" and "custom_generate" in card.tags
    loads = []
    real_from_pretrained = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(str(a[0])) or real_from_pretrained(*a, **k))
    for _ in range(2):
        out = model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=str(folder), trust_remote_code=True)
        assert torch.equal(out, reference)
    assert loads == [str(tmp_path / "draft")]  # the saved draft is loaded once, not on every generate() call
    with pytest.raises(FileExistsError):
        strict.save_pretrained(tmp_path / "fly-strict")
    # The folder asks for at least the hf-compress that wrote it; transformers refuses an older one before decoding.
    assert (folder / "custom_generate" / "requirements.txt").read_text().split() == [custom_generate_requirement()]
    assert custom_generate_requirement("1.4.0") == "hf-compress>=1.4.0"
    assert custom_generate_requirement("1.4.0.dev0") == custom_generate_requirement("1.4.0+local") == "hf-compress"
    newer = Path(shutil.copytree(folder, tmp_path / "from-a-newer-release"))
    (newer / "custom_generate" / "requirements.txt").write_text("hf-compress>=99.0\n")
    with pytest.raises(ImportError, match=r"hf-compress>=99.0 \(installed: "):
        model.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=str(newer), trust_remote_code=True)

    # A draft referenced by a local folder would publish its path and work nowhere else: refused, nothing sent.
    with pytest.raises(ValueError, match="draft_model=.*local"):
        strict.push_to_hub("user/fly-strict")
    assert ("model", "user/fly-strict") not in fake_hub.repos
    from hf_compress.hub import push_to_hub

    push_to_hub(tmp_path / "draft", "user/draft", allow_missing_card=True)
    on_hub = FLy("user/draft", loose=False, window=4)
    on_hub.push_to_hub("user/fly-strict")
    out = model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate="user/fly-strict",
                         trust_remote_code=True)
    assert torch.equal(out, reference)
    pushed = fake_hub.files("user/fly-strict")
    assert not any(str(tmp_path).encode() in data for data in pushed.values())  # no local path reached the Hub
    # Settings round-trip through the dict embedded in generate.py.
    assert strategy_from_dict(strict.to_dict()).to_dict() == strict.to_dict()


def test_a_draft_model_given_by_name_takes_the_librarys_names_and_fails_in_one_line(tmp_path):
    target, tokenizer = tiny_model("llama")
    ids = tokenizer("a b c d e f", return_tensors="pt").input_ids
    greedy = target.generate(ids, max_new_tokens=6, do_sample=False)
    by_name = SpeculativeDecoding("tiny-llama", num_draft_tokens=3)  # a name only load_model knows
    assert torch.equal(target.generate(ids, max_new_tokens=6, do_sample=False, custom_generate=by_name), greedy)
    assert by_name.draft_model.dtype == target.dtype and not by_name.draft_model.training
    missing = SpeculativeDecoding(str(tmp_path / "no-such-draft"))
    with pytest.raises(FileNotFoundError, match="no-such-draft: no such folder"):
        target.generate(ids, max_new_tokens=6, do_sample=False, custom_generate=missing)


def test_a_saved_strategy_finds_its_draft_from_any_folder_and_never_names_a_draft_changed_in_memory(tmp_path,
                                                                                                  monkeypatch):
    # A relative draft path was stored as typed (found only from the folder it was saved from); a draft pruned in
    # memory was stored by the name of the unpruned folder it came from.
    from hf_compress.assets import load_model
    from hf_compress.pruning import MagnitudePruner

    tiny_model("llama", save_dir=tmp_path / "draft")
    monkeypatch.chdir(tmp_path)
    FLy(draft_model="draft").save_pretrained("strategy")
    generate_py = (tmp_path / "strategy" / "custom_generate" / "generate.py").read_text()
    assert f'"draft_model": "{tmp_path / "draft"}"' in generate_py
    draft, tokenizer = load_model("draft")
    FLy(draft_model=draft).save_pretrained("unchanged")  # loaded and left as it is: its folder's weights
    MagnitudePruner(draft, tokenizer).prune("2:4", progress=False)
    with pytest.raises(ValueError, match="draft model was changed in memory since it was loaded from /.*/draft "):
        FLy(draft_model=draft).save_pretrained("changed")
    assert not (tmp_path / "changed").exists()


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_a_row_that_stops_first_past_the_sliding_window(arch):
    # Past the window a sliding layer keeps only its last tokens: the padding of a row that stopped rounds ago
    # cannot be fed again (it crashed on a mask of other length than the keys).
    prompts = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 5, 6, 7, 8, 5], [9, 10, 11, 12, 9, 10, 11, 12, 9, 10, 11, 12]])
    mask = (prompts != 0).long()
    for seed in range(8):
        model, _ = tiny_model(arch, seed=seed, sliding_window=6)
        free = model.generate(prompts, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None)
        row0, row1 = free[0, 12:].tolist(), free[1, 12:].tolist()
        eos = next((t for t in row0[3:8] if t not in row1 and t not in row0[:3]), None)  # row 0 alone stops
        if eos is not None:
            break
    assert eos is not None, "no token ends row 0 alone"
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=0)
    stock = model.generate(prompts, **kwargs)
    assert (stock[0] == 0).sum() > 3  # row 0 padded after its end
    assert torch.equal(model.generate(prompts, custom_generate=SpeculativeDecoding(num_draft_tokens=4), **kwargs),
                       stock)


@pytest.mark.parametrize("drafts", ["ngram", "model"])
def test_a_row_that_stops_first_leaves_generates_cache_for_the_next_turn(drafts):
    # The rounds fed a finished row its own drafts while the returned sequence showed padding: a next turn that
    # attends to those positions (the padded sequence with a mask of ones, as generate() itself extends it) went on
    # from other keys and values than generate()'s.
    model, tokenizer = tiny_model("llama")
    tokenizer.padding_side = "left"
    inputs = tokenizer(["abcabcabc hello world abc abc abc abc", "the quick brown fox jumps abc abc"],
                       return_tensors="pt", padding=True)
    start = inputs.input_ids.shape[1]
    eos = int(model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, start + 3])  # row 0 stops after 4 tokens
    strategy = SpeculativeDecoding(tiny_model("llama")[0] if drafts == "model" else None, num_draft_tokens=4)
    turns = []
    for custom in (None, strategy):
        first = model.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0,
                               return_dict_in_generate=True, custom_generate=custom)
        follow = torch.cat([first.sequences, tokenizer([" next"] * 2, return_tensors="pt").input_ids], dim=1)
        mask = torch.cat([inputs.attention_mask, torch.ones(2, follow.shape[1] - start, dtype=torch.long)], dim=1)
        second = model.generate(follow, attention_mask=mask, **cache_kwargs(model, first.past_key_values),
                                max_new_tokens=10, do_sample=False, eos_token_id=[], pad_token_id=0)
        turns.append((first.sequences, first.past_key_values, second))
    (stock_sequences, stock_cache, stock_next), (sequences, cache, following) = turns
    assert torch.equal(sequences, stock_sequences) and (sequences[0] == 0).any()  # row 0 padded after its end
    for stock_layer, layer in zip(stock_cache.layers, cache.layers):
        torch.testing.assert_close(layer.keys, stock_layer.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.values, stock_layer.values, rtol=1e-4, atol=1e-5)
    assert torch.equal(following, stock_next)


def _recurrent_model(kind: str):
    from transformers import AutoConfig

    settings = {
        "mamba": dict(hidden_size=64, state_size=8, num_hidden_layers=2),
        "qwen3_next": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                           num_experts_per_tok=2, linear_num_value_heads=4, linear_num_key_heads=2,
                           linear_key_head_dim=16, linear_value_head_dim=16),
        "recurrent_gemma": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, lru_width=64,
                                attention_window_size=16, intermediate_size=128),
        "olmo_hybrid": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, intermediate_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    }[kind]
    if kind not in CONFIG_MAPPING:
        pytest.skip(f"{kind} is not in the installed transformers")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, vocab_size=256, **settings)).eval()


@pytest.mark.parametrize("kind", ["mamba", "qwen3_next"])
def test_models_with_recurrent_layers_roll_back_their_states(kind):
    # Mamba (recurrent layers only) and Qwen3-Next (linear attention beside attention) keep a state that runs through
    # the tokens: the rounds record the states of as many tokens as they can reject, and go back to them.
    model = _recurrent_model(kind)
    prompts = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 5, 6, 7, 8, 5], [9, 10, 11, 12, 9, 10, 11, 12, 9, 10, 11, 12]])
    if not _compat.records_recurrent_states(DynamicCache(config=model.config).layers):  # transformers before 5.25
        with pytest.raises(ValueError, match=r"rolls back recurrent layers .* with transformers 5\.25\.0 or newer.*"
                                             r"transformers>=5\.25"):
            model.generate(prompts, max_new_tokens=4, pad_token_id=0, custom_generate=SpeculativeDecoding())
        return
    mask = (prompts != 0).long()
    accepted = 0
    for ids, attention_mask in ((prompts[1:], mask[1:]), (prompts, mask)):
        kwargs = dict(attention_mask=attention_mask, max_new_tokens=40, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
        strategy = SpeculativeDecoding(num_draft_tokens=4)
        assert torch.equal(model.generate(ids, custom_generate=strategy, **kwargs), model.generate(ids, **kwargs))
        metrics = strategy.last_metrics
        assert metrics.draft_tokens_accepted < metrics.draft_tokens_proposed  # drafts were rejected: rolled back
        accepted += metrics.draft_tokens_accepted
    assert accepted > 0  # and some accepted: several tokens advanced the states in one forward


@pytest.mark.parametrize("kind", ["mamba", "qwen3_next", "olmo_hybrid"])
def test_a_round_whose_drafts_are_all_rejected_rolls_back_to_its_first_token(kind):
    # A round feeds the pending token and num_draft_tokens drafts; rejecting every draft goes back to the state after
    # the first of them, num_draft_tokens + 1 steps back (recording one state fewer was off by one: OLMo-Hybrid
    # decoded other tokens than plain generate on most prompts).
    model = _recurrent_model(kind)
    if not _compat.records_recurrent_states(DynamicCache(config=model.config).layers):
        pytest.skip("transformers before 5.25 refuses recurrent targets (test above)")
    kwargs = dict(max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    for seed in range(6):
        ids = torch.randint(3, 256, (1, 4), generator=torch.Generator().manual_seed(seed)).repeat(1, 4)
        strategy = SpeculativeDecoding(num_draft_tokens=4)
        assert torch.equal(model.generate(ids, custom_generate=strategy, **kwargs), model.generate(ids, **kwargs)), seed


def test_recurrent_models_that_cannot_roll_back_are_refused_clearly():
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8]])
    # Before transformers 5.25 no recurrent layer rolls back, and the refusal says which release does.
    refusal = ("RecurrentGemmaForCausalLM's cache cannot be rolled back"
               if _compat.records_recurrent_states(DynamicCache(config=_recurrent_model("mamba").config).layers) else
               "rolls back recurrent layers")
    with pytest.raises(ValueError, match=f"{refusal} .*plain generate"):
        _recurrent_model("recurrent_gemma").generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                                     custom_generate=SpeculativeDecoding(num_draft_tokens=4))
    target, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="MambaForCausalLM keeps recurrent states .* draft with an attention-only model"):
        target.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                        custom_generate=SpeculativeDecoding(_recurrent_model("mamba"), num_draft_tokens=4))
