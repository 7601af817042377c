"""CoSpec (learned arbitration of draft/target mismatches) and FLy calibration, on tiny random models."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

from hf_compress.assets import tiny_model
from hf_compress.hub import load_card, read_recipe
from hf_compress.speculative import (
    FLy,
    LooseVerification,
    SpeculativeDecoding,
    StrictGreedy,
    speculative_decode,
)
from hf_compress.speculative.cospec import (
    FEATURE_NAMES,
    ArbiterConfig,
    ArbiterRule,
    ArbiterTrainingSettings,
    CoSpec,
    CoSpecArbiter,
    DecisionLog,
    Episode,
    OracleLabels,
    collect_oracle_labels,
    fit_warm_start,
    mismatch_features,
    oracle_label,
    reinforce_step,
    task_examples,
    tokenizer_fingerprint,
    train_arbiter,
)
from hf_compress.speculative.cospec.auto import arbiter_is_not_a_causal_lm
from hf_compress.speculative.drafting import CrossTokenizerDrafter, Draft
from hf_compress.speculative.strategies import read_generate_settings

PROMPTS = ["the cat sat on", "abcabcabc", "hello world, hello", "12 + 34 ="]


def test_task_answers_in_squads_own_layout_and_rewards_that_are_not_numbers():
    from hf_compress.speculative.task_answers import resolve_reward

    squad = {"prompt": "Paris is the capital of", "answers": {"text": ["France", "france"], "answer_start": [19, 19]}}
    tok = tiny_model("llama")[1]
    assert task_examples([squad], tok)[0].answers == ["France", "france"]  # was ['text', 'answer_start']
    with pytest.raises(ValueError, match="mapping without 'text'"):
        task_examples([{"prompt": "x", "answers": {"answer_start": [0]}}], tok)
    assert resolve_reward(lambda text, answers: text in answers)("a", ["a"]) == 1.0  # bools and numpy scores are numbers
    for bad in (float("nan"), "high", None):
        with pytest.raises(ValueError, match="The reward must return a finite number"):
            resolve_reward(lambda text, answers, bad=bad: bad)("a", ["a"])


def test_a_missing_arbiter_folder_is_named_as_such(pair, tmp_path):
    model, tok, _ = pair
    missing = str(tmp_path / "no" / "arbiter")
    with pytest.raises(FileNotFoundError, match="no such folder"):  # was huggingface_hub's "Repo id must be ..."
        CoSpecArbiter.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        model.generate(tok("hi", return_tensors="pt").input_ids, max_new_tokens=2, custom_generate=CoSpec(missing))
    from hf_compress.speculative.heads import load_heads

    with pytest.raises(FileNotFoundError, match="no such folder; pass a folder saved by AmphistaHeads.save_pretrained"):
        load_heads(missing)  # the drafting heads' loader said "Repo id must be ..." too


def test_calibration_candidates_and_prompts_of_the_wrong_shape_are_named(pair):
    model, tok, draft = pair
    with pytest.raises(TypeError, match=r"thresholds must be a non-empty list of candidates, e\.g\. thresholds=\[0\.5\]"):
        FLy.calibrate(model, draft, PROMPTS, tokenizer=tok, thresholds=0.5)
    with pytest.raises(TypeError, match="held_out_prompts must be a list of prompts"):  # was "'str' is not a mapping"
        FLy.calibrate(model, draft, "the cat sat", tokenizer=tok)
    # A generator is read once: it was used up by one check, then called empty.
    with pytest.raises(ValueError, match="threshold"):  # reaches the candidates' own check, past the prompts
        FLy.calibrate(model, draft, (p for p in PROMPTS), tokenizer=tok, thresholds=[])


def test_train_arbiter_refuses_held_out_prompts_given_as_one_string(pair):
    model, tok, _ = pair
    with pytest.raises(TypeError, match="held_out must be a list of prompts"):  # it calibrated on each letter
        train_arbiter(model, "ngram", task(tok)[:1], tokenizer=tok, held_out="the cat", settings=quick_settings())


def quick_settings(**overrides) -> ArbiterTrainingSettings:
    values = dict(max_new_tokens=16, stop_at_newline=False, max_forks_per_prompt=3, warm_start_steps=50,
                  rl_steps=1, rl_prompts_per_step=2, group_size=2)
    values.update(overrides)
    return ArbiterTrainingSettings(**values)


def task(tok, answers=("a",)):
    return [{"prompt": p, "answers": list(answers)} for p in PROMPTS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a loaded 2-core machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    model, tok = tiny_model("llama")
    draft, _ = tiny_model("llama", seed=1)
    return model, tok, draft


@pytest.fixture(scope="module")
def mixed_arbiter(pair):
    """An arbiter whose decisions at threshold 0.5 are mixed: warm-started on labels that depend on entropy."""
    model, tok, _ = pair
    arbiter = CoSpecArbiter.for_model(model, ArbiterConfig(use_hidden_states=True), tok)
    torch.manual_seed(0)
    features = torch.randn(64, arbiter.config.num_features)
    labels = (features[:, FEATURE_NAMES.index("top_k_entropy")] > 0).float()
    fit_warm_start(arbiter, OracleLabels(features, labels), quick_settings(warm_start_steps=100))
    return arbiter


def greedy(model, tok, prompt, n=20):
    ids = tok(prompt, return_tensors="pt").input_ids
    return ids, model.generate(ids, max_new_tokens=n, do_sample=False)


# ------------------------------------------------------------------------------------ the rule
def test_features_and_rule_on_hand_built_logits(pair):
    model, _, _ = pair
    arbiter = CoSpecArbiter.for_model(model, ArbiterConfig(use_hidden_states=False))
    logits = torch.full((1, 4, 256), -5.0)
    logits[0, [0, 1, 2, 3], [1, 2, 3, 4]] = 5.0  # the target wants 1, 2, 3 and bonus 4
    drafts = torch.tensor([[1, 9, 3]])  # a mismatch in the middle, then a match
    features = mismatch_features(drafts, logits)
    assert features.shape == (1, 3, len(FEATURE_NAMES))
    assert features[0, 1, FEATURE_NAMES.index("following_matches")] == pytest.approx(1 / 3)
    assert features[0, 0, FEATURE_NAMES.index("log_rank")] == 0 and features[0, 1, FEATURE_NAMES.index("log_rank")] > 0
    strict = StrictGreedy().verify(drafts, logits)
    for rule in (ArbiterRule(arbiter, mode="strict"), ArbiterRule(arbiter, threshold=1.0), arbiter):  # fresh = P 0.05
        verdict = rule.verify(drafts, logits)
        assert verdict.num_accepted.tolist() == strict.num_accepted.tolist() == [1]
        assert verdict.next_token.tolist() == strict.next_token.tolist() == [2]
    for rule in (ArbiterRule(arbiter, mode="accept"), ArbiterRule(arbiter, threshold=0.0)):
        verdict = rule.verify(drafts, logits)
        assert verdict.num_accepted.tolist() == [3] and verdict.next_token.tolist() == [4]  # all drafts, then the bonus
    log = DecisionLog()
    ArbiterRule(arbiter, mode="accept", log=log).verify(drafts, logits)
    assert [(d.index, d.keep_draft, d.draft_token, d.target_token) for d in log.decisions] == [(1, True, 9, 2)]



def test_features_stay_finite_when_the_logits_processors_mask_most_of_the_vocabulary(pair):
    """Fewer than k tokens with finite logits (a processor masked the rest to -inf): masked tokens have probability 0."""
    model, _, _ = pair
    logits = torch.full((1, 4, 256), -math.inf)
    logits[0, :, 5] = 2.0  # the target's choice everywhere
    logits[0, 0, 7] = 1.0  # two finite tokens at position 0, one at the others (k = 3)
    drafts = torch.tensor([[7, 9, 5]])  # a finite mismatch, a masked one, a match
    features = mismatch_features(drafts, logits, torch.zeros(1, 4, 64), entropy_top_k=3)
    assert torch.isfinite(features).all(), features[0, :, :len(FEATURE_NAMES)]
    entropy = features[0, :, FEATURE_NAMES.index("top_k_entropy")]
    p = torch.tensor([2.0, 1.0]).softmax(0)
    assert entropy[0].item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)  # the two finite tokens only
    assert entropy[1].item() == 0.0 and entropy[2].item() == 0.0  # one finite token: the target is sure
    assert features[0, :, FEATURE_NAMES.index("entropy")].tolist()[1:] == [0.0, 0.0]
    # The arbiter reading them decides (a NaN logit compares False: silently strict) and logs finite features.
    keen = CoSpecArbiter.for_model(model, ArbiterConfig(use_hidden_states=False))
    with torch.no_grad():
        keen.net[-1].weight.fill_(0.1)
        keen.net[-1].bias.fill_(10.0)
    log = DecisionLog()
    verdict = ArbiterRule(keen, log=log).verify(drafts, logits)
    assert verdict.num_accepted.tolist() == [1] and verdict.next_token.tolist() == [5]  # 7 kept, 9 banned
    assert [d.index for d in log.decisions] == [0] and torch.isfinite(log.decisions[0].features).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_features_meet_hidden_states_on_another_device():
    """A model split over devices returns its logits on the input's device and its final states on its last one."""
    logits = torch.randn(1, 3, 8, device="cuda")
    features = mismatch_features(torch.tensor([[1, 2]], device="cuda"), logits, torch.randn(1, 3, 4))  # states: CPU
    assert features.device.type == "cuda" and features.shape == (1, 2, len(FEATURE_NAMES) + 4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_arbiter_disabled_is_greedy_generate(arch, pair):
    model, tok = tiny_model(arch)
    draft, _ = tiny_model(arch, seed=1)
    arbiter = CoSpecArbiter.for_model(model)
    keen = CoSpecArbiter.for_model(model)  # wants every mismatching draft token: disabling it must still mean strict
    with torch.no_grad():
        keen.net[-1].bias.fill_(10.0)
    changed = 0
    for prompt in PROMPTS[:2]:
        ids, reference = greedy(model, tok, prompt)
        for strategy in (CoSpec(keen, draft, threshold=1.0), CoSpec(keen, mode="strict"),
                         CoSpec(keen, draft, mode="strict"), CoSpec(arbiter, draft)):  # fresh arbiter: P(DRAFT) 0.05
            assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=strategy), reference)
        loose = model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=CoSpec(keen, draft))
        changed += not torch.equal(loose, reference)
    assert changed  # enabled, the keen arbiter does change the output: the equalities above are not vacuous
    # threshold 1.0 can keep no draft token: the arbiter is not even consulted (no cost over strict verification)
    rule = ArbiterRule(arbiter, threshold=1.0)
    assert rule.keeps_nothing and not rule.reads_hidden_states and ArbiterRule(arbiter).reads_hidden_states
    arbiter.forward = lambda *args, **kwargs: pytest.fail("the arbiter ran at threshold 1.0")
    ids, reference = greedy(model, tok, PROMPTS[0])
    strategy = CoSpec(arbiter, draft, threshold=1.0)
    assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=strategy), reference)


def test_always_accept_equals_accepting_every_draft_token(pair, mixed_arbiter):
    model, tok, draft = pair

    class Sevens:  # hand-built drafts: always token 7
        def reset(self):
            pass

        def propose(self, input_ids, attention_mask, max_tokens):
            return Draft(torch.full((input_ids.shape[0], max_tokens), 7))

    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    config = GenerationConfig(max_length=ids.shape[1] + 14, do_sample=False)
    from transformers.generation import MaxLengthCriteria, StoppingCriteriaList

    stop = StoppingCriteriaList([MaxLengthCriteria(config.max_length)])
    out, metrics, _ = speculative_decode(model, ids, Sevens(), ArbiterRule(mixed_arbiter, mode="accept"), 4,
                                         generation_config=config, stopping_criteria=stop)
    new = out[0, ids.shape[1]:]
    assert metrics.target_forwards == 3  # 5 tokens per forward: 4 drafts + the bonus
    assert new[[0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12]].eq(7).all()  # the last round has room for 3 drafts
    loose = SpeculativeDecoding(draft, draft_confidence_threshold=None,
                                acceptance=LooseVerification(entropy_threshold=0.0, use_window=False))
    accept = CoSpec(mixed_arbiter, draft, threshold=0.0)
    assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=accept),
                       model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=loose))


def test_a_draft_token_the_logits_processors_ban_is_never_kept(pair):
    model, tok, draft = pair
    inf = float("-inf")
    arbiter = CoSpecArbiter.for_model(model, ArbiterConfig(use_hidden_states=False))
    logits = torch.full((1, 3, 256), -5.0)
    logits[0, [0, 1, 2], [1, 2, 3]] = 5.0
    logits[0, 1, 9] = inf  # the mismatching draft 9 is banned there (bad_words_ids, EOS under min_new_tokens)
    log = DecisionLog()
    for rule in (ArbiterRule(arbiter, mode="accept", log=log), ArbiterRule(arbiter, threshold=0.0),
                 LooseVerification(entropy_threshold=0.0, use_window=False)):  # rules that keep every allowed mismatch
        verdict = rule.verify(torch.tensor([[1, 9]]), logits)
        assert verdict.num_accepted.tolist() == [1] and verdict.next_token.tolist() == [2]
    assert log.decisions == []  # not the arbiter's to decide: nothing to learn from
    # Through generate(): a keen arbiter and FLy without its gates keep mismatching drafts, but never banned ones.
    keen = CoSpecArbiter.for_model(model)
    with torch.no_grad():
        keen.net[-1].bias.fill_(10.0)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    n = ids.shape[1]
    reference = model.generate(ids, max_new_tokens=12, do_sample=False)[0, n:].tolist()
    for make in (lambda: CoSpec(keen, draft), lambda: FLy(draft, entropy_threshold=0.01, window=1, use_ngram=False)):
        loose = model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=make())[0, n:].tolist()
        banned = [t for t in dict.fromkeys(loose) if t not in reference][:2]
        assert banned  # the loose rule did keep drafts greedy decoding would not emit
        out = model.generate(ids, max_new_tokens=12, do_sample=False, bad_words_ids=[[t] for t in banned],
                             custom_generate=make())[0, n:].tolist()
        assert not set(out) & set(banned), out
        eos = banned[0]
        out = model.generate(ids, max_new_tokens=12, min_new_tokens=8, eos_token_id=eos, pad_token_id=0,
                             do_sample=False, custom_generate=make())[0, n:].tolist()
        assert eos not in out[:8], out


# ------------------------------------------------------------------------------------ training
def test_oracle_labels_follow_the_branch_scores(pair):
    assert (oracle_label(0.2, 0.9, False), oracle_label(0.9, 0.2, True), oracle_label(0.5, 0.5, True),
            oracle_label(0.5, 0.5, False)) == (1, 0, 1, 0)
    model, tok, draft = pair
    arbiter = CoSpecArbiter.for_model(model, tokenizer=tok)
    strategy = CoSpec(arbiter, draft)
    examples = task_examples(task(tok), tok)
    greedy_answers = {}
    for example in examples:  # reward 1 for exactly the target's own greedy answer
        out = model.generate(example.input_ids, max_new_tokens=16, do_sample=False)
        greedy_answers[tuple(example.input_ids[0].tolist())] = tok.decode(out[0, example.input_ids.shape[1]:]).strip()
    answers = set(greedy_answers.values())
    data = collect_oracle_labels(model, strategy, examples, tok, lambda text, _: float(text in answers), quick_settings())
    assert data.target_scores == [1.0] * len(examples)  # strict decoding = the target's greedy answer
    assert len(data) > 0 and data.features.shape == (len(data), arbiter.config.num_features)
    assert data.labels.sum() < len(data)  # a random draft token changes the answer: labelled TARGET
    assert strategy.mode == "policy" and strategy.decision_log is None  # restored


def test_decisions_past_where_the_answer_stopped_are_not_learned_from():
    model, tok = tiny_model("llama")  # its own copy: the stop token is set on its generation config
    prompt = torch.tensor([[5, 9, 13, 200, 7]])
    greedy_tokens = model.generate(prompt, max_new_tokens=4, do_sample=False)[0, 5:].tolist()
    stop, wrong = greedy_tokens[2], (greedy_tokens[3] + 1) % 256
    assert stop not in greedy_tokens[:2]

    class AnswerThenMismatch:  # the greedy answer up to its stop token, then a mismatch inside the same round
        def reset(self):
            pass

        def propose(self, input_ids, attention_mask, max_tokens):
            if input_ids.shape[1] != prompt.shape[1]:
                return None
            return Draft(torch.tensor([greedy_tokens[:3] + [wrong]])[:, :max_tokens])

    def strategy(mode):
        cospec = CoSpec(CoSpecArbiter.for_model(model, tokenizer=tok), num_draft_tokens=4, mode=mode)
        cospec._drafter, cospec._custom_drafter = AnswerThenMismatch(), True
        return cospec

    # Without a stop the mismatch takes effect and is logged; stopped first, it never took effect.
    for eos, expected in ((None, [(3, True, wrong)]), (stop, [])):
        accept = strategy("accept")
        accept.decision_log = log = DecisionLog()
        model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0,
                       custom_generate=accept)
        assert [(d.index, d.keep_draft, d.draft_token) for d in log.decisions] == expected
    model.generation_config.eos_token_id = stop
    examples = task_examples([{"input_ids": prompt[0].tolist(), "answers": ["x"]}])
    labels = collect_oracle_labels(model, strategy("policy"), examples, tok, reward=lambda text, answers: 0.0,
                                   settings=quick_settings(max_new_tokens=8))
    assert len(labels) == 0 and labels.mismatches_seen == 0



class SureInRow1(LogitsProcessor):
    """Masks every token but the target's choice in batch row 1: no mismatch can be kept there (row 1 is strict)."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[1] = torch.where(scores[1] == scores[1].max(), scores[1], torch.full_like(scores[1], -math.inf))
        return scores


def test_the_decision_log_keeps_only_decisions_the_batch_cut_let_take_effect(pair):
    """In a batch a round emits as many drafts as the row that accepted fewest: row 0's later decisions never took
    effect (the next round decides those positions again), so the log must drop them."""
    model, tok, draft = pair
    arbiter = CoSpecArbiter.for_model(model, ArbiterConfig(use_hidden_states=False), tok)
    ids = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    strategy = CoSpec(arbiter, draft, mode="accept", num_draft_tokens=4)  # row 0 keeps every draft, row 1 none
    strategy.decision_log = log = DecisionLog()
    out = model.generate(**ids, max_new_tokens=16, do_sample=False, logits_processor=LogitsProcessorList([SureInRow1()]),
                         custom_generate=strategy)
    assert strategy.last_metrics.draft_tokens_accepted_by_rule > strategy.last_metrics.draft_tokens_accepted  # cut
    positions = [len(d.context) + d.index for d in log.decisions]
    assert log.decisions and positions == sorted(set(positions))  # each position decided once, in order
    for decision, position in zip(log.decisions, positions):  # and each decision is what row 0 emitted there
        assert decision.keep_draft and int(out[0, position]) == decision.draft_token


def test_reinforce_step_moves_the_policy_towards_rewarded_actions(pair):
    model, _, _ = pair
    arbiter = CoSpecArbiter.for_model(model, ArbiterConfig(use_hidden_states=False))
    features = torch.randn(3, arbiter.config.num_features, generator=torch.Generator().manual_seed(0))
    before = arbiter(features).sigmoid().mean().item()
    optimizer = torch.optim.SGD(arbiter.parameters(), lr=0.2)  # no momentum: each step follows its own gradient
    drafted = Episode(features, torch.ones(3), reward=1.0)
    refused = Episode(features, torch.zeros(3), reward=0.0)
    for _ in range(5):
        stats = reinforce_step(arbiter, optimizer, [[drafted, refused]], entropy_bonus=0.0)
    assert stats["episodes_with_decisions"] == 2
    assert arbiter(features).sigmoid().mean().item() > before + 0.1
    flipped = [[Episode(features, torch.ones(3), reward=0.0), Episode(features, torch.zeros(3), reward=1.0)]]
    middle = arbiter(features).sigmoid().mean().item()
    for _ in range(3):
        reinforce_step(arbiter, optimizer, flipped, entropy_bonus=0.0)
    assert arbiter(features).sigmoid().mean().item() < middle


def test_the_entropy_bonus_moves_the_policy_towards_indecision(pair):
    """Equal rewards give every episode an advantage of 0: only the entropy bonus is left, and it must push a sure
    policy towards P(DRAFT) = 0.5 (a BCE against a detached p has a zero gradient: the bonus did nothing)."""
    model, _, _ = pair
    arbiter = CoSpecArbiter.for_model(model, ArbiterConfig(use_hidden_states=False))  # P(DRAFT) 0.05 everywhere
    features = torch.randn(4, arbiter.config.num_features, generator=torch.Generator().manual_seed(0))
    before = arbiter(features).sigmoid().mean().item()
    optimizer = torch.optim.SGD(arbiter.parameters(), lr=0.5)
    group = [Episode(features, torch.zeros(4), reward=1.0), Episode(features, torch.ones(4), reward=1.0)]
    for _ in range(3):
        reinforce_step(arbiter, optimizer, [group], entropy_bonus=1.0)
    assert arbiter(features).sigmoid().mean().item() > before + 0.02
    with torch.no_grad():  # and without the bonus, zero advantages leave the policy where it is
        still = arbiter(features).clone()
    reinforce_step(arbiter, optimizer, [group], entropy_bonus=0.0)
    torch.testing.assert_close(arbiter(features), still)


def test_rl_needs_groups_of_two_rollouts():
    with pytest.raises(ValueError, match="group_size=1 gives every rollout an advantage of 0"):
        ArbiterTrainingSettings(group_size=1)
    assert ArbiterTrainingSettings(group_size=1, rl_steps=0).group_size == 1  # warm start only: no groups


def test_train_arbiter_is_reproducible_and_says_when_its_folder_drafts_otherwise(pair, tmp_path, caplog):
    model, tok, draft = pair
    settings = quick_settings(max_new_tokens=4, max_forks_per_prompt=1, warm_start_steps=0, rl_steps=0)
    config = ArbiterConfig(use_hidden_states=False, mlp_hidden_size=8)  # a hidden layer: random initial weights
    arbiters = []
    for global_seed in (1, 2):  # the global RNG differs; settings.seed does not
        torch.manual_seed(global_seed)
        arbiters.append(train_arbiter(model, draft, task(tok)[:2], reward=lambda text, answers: 0.0, tokenizer=tok,
                                      settings=settings, config=config))
    for first, second in zip(arbiters[0].parameters(), arbiters[1].parameters()):
        assert torch.equal(first, second)
    # Trained with an unnamed in-memory draft model: the saved folder cannot name it, and says so.
    assert arbiters[0].config.training["drafter"] == "model" and arbiters[0].config.draft_model_name_or_path is None
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        arbiters[0].save_pretrained(tmp_path / "unnamed")
    assert "drafts by n-gram prompt lookup unless generate() is given draft_model=" in caplog.text
    caplog.clear()
    ngram = train_arbiter(model, "ngram", task(tok)[:1], reward=lambda text, answers: 0.0, tokenizer=tok,
                          settings=settings, config=ArbiterConfig(use_hidden_states=False))
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        ngram.save_pretrained(tmp_path / "ngram")
    assert ngram.config.training["drafter"] == "ngram" and "n-gram prompt lookup" not in caplog.text
    # A copy of the target (an int8 self-draft) keeps the target's name: the folder would draft with the target.
    named = copy.deepcopy(ngram)
    named.config.base_model_name_or_path = named.config.draft_model_name_or_path = "org/target"
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        named.save_pretrained(tmp_path / "self-draft")
    assert "records its target 'org/target' as its draft model" in caplog.text


def test_an_arbiter_records_the_n_gram_lookup_it_was_trained_with(pair, tmp_path):
    model, tok, _ = pair
    settings = quick_settings(max_new_tokens=4, max_forks_per_prompt=1, warm_start_steps=0, rl_steps=0)
    arbiter = train_arbiter(model, "ngram", task(tok)[:1], reward=lambda text, answers: 0.0, tokenizer=tok,
                            settings=settings, config=ArbiterConfig(use_hidden_states=False), min_ngram_size=2)
    assert arbiter.config.min_ngram_size == 2 and arbiter.strategy().min_ngram_size == 2
    assert CoSpec(arbiter).min_ngram_size == 2 and CoSpec(arbiter, min_ngram_size=1).min_ngram_size == 1
    folder = arbiter.save_pretrained(tmp_path / "arbiter")
    from_folder = CoSpec(str(folder))  # the arbiter loads on first use; so does the lookup it was trained with
    ids = tok("abcabcab", return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=from_folder)
    assert from_folder.min_ngram_size == 2 and from_folder.drafter_for(model).min_ngram_size == 2
    with pytest.raises(ValueError, match="at least 2 tokens .config.min_ngram_size., above this strategy's max_ngram_size=1"):
        model.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=CoSpec(str(folder), max_ngram_size=1))
    assert ArbiterConfig.from_dict(arbiter.config.to_dict()).min_ngram_size == 2
    assert "custom_generate=CoSpec('arb', min_ngram_size=2)" in arbiter_is_not_a_causal_lm("arb", arbiter.config)
    arbiter.config.draft_model_name_or_path = "org/draft"  # a draft model without n-gram lookup: the setting is moot
    assert "CoSpec('arb', draft_model='org/draft')" in arbiter_is_not_a_causal_lm("arb", arbiter.config)
    for bad in (0, 5):  # below 1, above the lookup's max_ngram_size (4)
        with pytest.raises(ValueError, match="min_ngram_size"):
            train_arbiter(model, "ngram", task(tok)[:1], tokenizer=tok, arbiter=arbiter, min_ngram_size=bad)
    assert arbiter.config.min_ngram_size == 2  # refused before the given arbiter's config was touched


def test_train_arbiter_rl_lowers_target_forwards_on_a_cost_only_reward(pair):
    model, tok, draft = pair
    # Constant task score: the reward is only −λ · target forwards, so keeping drafts is right everywhere.
    settings = quick_settings(max_new_tokens=10, max_forks_per_prompt=1, rl_steps=3, rl_prompts_per_step=2, group_size=2,
                              rl_learning_rate=0.3, cost_per_forward=0.1, warm_start_steps=0)
    arbiter = train_arbiter(model, draft, task(tok), reward=lambda text, answers: 0.0, tokenizer=tok, settings=settings,
                            config=ArbiterConfig(use_hidden_states=False))
    history = arbiter.config.training["log_history"]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert history[-1]["draft_decision_rate"] > history[0]["draft_decision_rate"]
    assert arbiter.config.training["oracle_labels"] > 0 and arbiter.config.draft_model_name_or_path is None
    # What the name promises, measured on decoding: the trained arbiter needs fewer target forwards than strict.
    forwards = {}
    for name, strategy in (("strict", SpeculativeDecoding(draft, draft_confidence_threshold=None)), ("cospec", CoSpec(arbiter, draft))):
        forwards[name] = 0
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            model.generate(ids, max_new_tokens=10, do_sample=False, custom_generate=strategy)
            forwards[name] += strategy.last_metrics.target_forwards
    assert forwards["cospec"] < forwards["strict"], forwards


# ------------------------------------------------------------------------------------ saving and the Hub
def test_save_reload_gives_identical_decisions(pair, mixed_arbiter, tmp_path):
    model, tok, draft = pair
    folder = mixed_arbiter.save_pretrained(tmp_path / "arb")
    for name in ("config.json", "model.safetensors", "README.md", "custom_generate/generate.py"):
        assert (folder / name).is_file(), name
    assert read_recipe(folder)["method"] == "cospec"
    assert load_card(folder).data.pipeline_tag is None  # an arbiter is not a text-generation model
    loaded = CoSpecArbiter.from_pretrained(folder)
    features = torch.randn(32, mixed_arbiter.config.num_features)
    torch.testing.assert_close(loaded(features), mixed_arbiter(features))
    assert loaded.config.tokenizer_fingerprint == mixed_arbiter.config.tokenizer_fingerprint
    decisions = (mixed_arbiter(features) > 0).float().mean()
    assert 0 < decisions < 1  # the comparison below is not trivial
    ids = tok(PROMPTS[2], return_tensors="pt").input_ids
    first, second = CoSpec(mixed_arbiter, draft), CoSpec(str(folder), draft)
    assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=first),
                       model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=second))
    assert first.last_metrics.target_forwards == second.last_metrics.target_forwards
    with pytest.raises(FileExistsError):
        mixed_arbiter.save_pretrained(tmp_path / "arb")



def permuted_tokenizer(tok):
    """The byte tokenizer with its ids (but the three special tokens) shuffled: another vocabulary of the same size."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["model"]["vocab"] = {ch: i if i < 3 else 3 + (i - 3 + 101) % 253 for ch, i in spec["model"]["vocab"].items()}
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), padding_side="left")
    other.pad_token, other.bos_token, other.eos_token = tok.pad_token, tok.bos_token, tok.eos_token
    return other


def test_a_cross_tokenizer_arbiter_records_its_draft_tokenizer_and_refuses_another(pair, tmp_path, caplog):
    """A draft with another vocabulary of the same size: without its tokenizer the draft's ids would be read as the
    target's, silently. The arbiter records the draft tokenizer, its folder drafts through it unasked, and a draft
    tokenizer of another vocabulary is refused."""
    model, tok, draft = pair
    tok.save_pretrained(tmp_path / "target-tok")
    permuted_tokenizer(tok).save_pretrained(tmp_path / "draft-tok")
    draft.save_pretrained(tmp_path / "draft")
    target_tok = AutoTokenizer.from_pretrained(tmp_path / "target-tok")
    draft_tok = AutoTokenizer.from_pretrained(tmp_path / "draft-tok")
    named_draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    settings = quick_settings(max_new_tokens=4, max_forks_per_prompt=1, warm_start_steps=0, rl_steps=0)
    arbiter = train_arbiter(model, named_draft, task(tok)[:1], reward=lambda text, answers: 0.0, tokenizer=target_tok,
                            draft_tokenizer=draft_tok, settings=settings, num_draft_tokens=4,
                            config=ArbiterConfig(use_hidden_states=False))
    config = arbiter.config
    assert config.draft_tokenizer_fingerprint == tokenizer_fingerprint(draft_tok) != config.tokenizer_fingerprint
    assert config.draft_tokenizer_name_or_path == str(tmp_path / "draft-tok")
    assert config.tokenizer_name_or_path == str(tmp_path / "target-tok")
    config.threshold = 0.0  # keep every draft token: the output shows which tokens the drafter proposed
    ids = tok(PROMPTS[2], return_tensors="pt").input_ids

    def run(strategy, **kwargs):
        return model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=strategy, **kwargs)

    reference = run(CoSpec(arbiter, named_draft, tokenizer=target_tok, draft_tokenizer=draft_tok))
    misread = SpeculativeDecoding(named_draft, draft_confidence_threshold=None, num_draft_tokens=4,
                                  acceptance=arbiter.as_rule())
    assert not torch.equal(run(misread), reference)  # the draft's ids read as the target's: other drafts, other text
    # In memory, from the folder and through the folder's custom_generate code: the recorded tokenizers, unasked.
    unasked = CoSpec(arbiter, named_draft)
    assert torch.equal(run(unasked), reference) and isinstance(unasked.drafter_for(model), CrossTokenizerDrafter)
    folder = arbiter.save_pretrained(tmp_path / "arb")
    saved = read_generate_settings(folder)
    assert (saved["tokenizer"], saved["draft_tokenizer"]) == (str(tmp_path / "target-tok"), str(tmp_path / "draft-tok"))
    assert json.loads((folder / "config.json").read_text())["draft_tokenizer_name_or_path"] == "draft-tok"  # portable
    assert torch.equal(run(str(folder), trust_remote_code=True), reference)
    assert torch.equal(run(str(folder), trust_remote_code=True, tokenizer=target_tok), reference)
    # Another draft tokenizer (here the target's own) is refused, saying what to pass.
    for strategy, kwargs in ((CoSpec(arbiter, named_draft, tokenizer=target_tok, draft_tokenizer=target_tok), {}),
                             (str(folder), dict(trust_remote_code=True, draft_tokenizer=target_tok, tokenizer=target_tok))):
        with pytest.raises(ValueError, match=r"other draft tokenizer.*draft-tok"):
            run(strategy, **kwargs)
    # A draft tokenizer without a name cannot be loaded by the folder: it says what to pass, never drafts misread.
    unnamed = copy.deepcopy(arbiter)
    unnamed.config.draft_tokenizer_name_or_path = None
    with pytest.raises(ValueError, match="pass draft_tokenizer="):
        run(CoSpec(unnamed, named_draft))
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        unnamed_folder = unnamed.save_pretrained(tmp_path / "unnamed")
    assert "draft_tokenizer=" in caplog.text
    with pytest.raises(ValueError, match="pass draft_tokenizer="):
        run(str(unnamed_folder), trust_remote_code=True)
    assert torch.equal(run(str(unnamed_folder), trust_remote_code=True, draft_tokenizer=draft_tok, tokenizer=target_tok),
                       reference)
    # Another draft model than the recorded one: its tokenizer is not guessed.
    with pytest.raises(ValueError, match="pass draft_tokenizer="):
        run(CoSpec(arbiter, copy.deepcopy(draft)))
    # A folder saved before the draft tokenizer was recorded still loads and decodes as told.
    old_config = json.loads((folder / "config.json").read_text())
    for key in ("draft_tokenizer_name_or_path", "draft_tokenizer_fingerprint", "tokenizer_name_or_path"):
        del old_config[key]
    (folder / "config.json").write_text(json.dumps(old_config))
    old = CoSpecArbiter.from_pretrained(folder)
    assert old.config.draft_tokenizer_fingerprint is None
    assert torch.equal(run(CoSpec(old, named_draft, tokenizer=target_tok, draft_tokenizer=draft_tok)), reference)
    # A strategy built with a cross-tokenizer pair records it with the arbiter it saves.
    strategy_folder = CoSpec(old, named_draft, tokenizer=target_tok, draft_tokenizer=draft_tok).save_pretrained(
        tmp_path / "strategy")
    recorded = CoSpecArbiter.from_pretrained(strategy_folder).config
    assert recorded.draft_tokenizer_fingerprint == config.draft_tokenizer_fingerprint
    assert old.config.draft_tokenizer_fingerprint is None  # the arbiter in memory is left as it was
    with pytest.raises(ValueError, match="other draft tokenizer"):
        run(str(strategy_folder), trust_remote_code=True, draft_tokenizer=target_tok, tokenizer=target_tok)


def test_cospec_drafts_as_many_tokens_as_its_arbiter_was_trained_with(pair, mixed_arbiter, tmp_path):
    """Three features count positions in the round: CoSpec(arbiter) drafts the arbiter's length unless told."""
    model, tok, draft = pair
    arbiter = copy.deepcopy(mixed_arbiter)
    arbiter.config.num_draft_tokens = 3
    folder = arbiter.save_pretrained(tmp_path / "arb3")
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    outputs = {}
    for name, strategy in (("object", CoSpec(arbiter, draft)), ("folder", CoSpec(str(folder), draft)),
                           ("explicit", CoSpec(arbiter, draft, num_draft_tokens=3)),
                           ("other", CoSpec(arbiter, draft, num_draft_tokens=5))):
        outputs[name] = model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=strategy)
        assert strategy.num_draft_tokens == (5 if name == "other" else 3), name
    assert torch.equal(outputs["object"], outputs["explicit"]) and torch.equal(outputs["folder"], outputs["explicit"])
    assert CoSpec(mixed_arbiter, draft).num_draft_tokens == mixed_arbiter.config.num_draft_tokens == 8


def test_an_arbiter_for_another_target_of_the_same_shape_is_refused(pair, mixed_arbiter, tmp_path, caplog):
    model, tok, draft = pair
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    # Same sizes, other model: another architecture with equal weights, and the same architecture with other weights.
    for other in (tiny_model("qwen3")[0], draft):
        with pytest.raises(ValueError, match="Wrong base model for this CoSpec arbiter"):
            other.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=CoSpec(mixed_arbiter, draft))
    mixed_arbiter.check_compatible(copy.deepcopy(model).to(torch.bfloat16), tok)  # the same weights in another dtype
    # A folder saved before base model identities were recorded still loads; that it is unchecked is logged.
    folder = mixed_arbiter.save_pretrained(tmp_path / "arb")
    config = json.loads((folder / "config.json").read_text())
    del config["base_model_identity"]
    (folder / "config.json").write_text(json.dumps(config))
    old = CoSpecArbiter.from_pretrained(folder)
    assert old.config.base_model_identity is None
    with caplog.at_level(logging.INFO, logger="hf_compress"):
        draft.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=CoSpec(old, draft))
    assert "Cannot check that this model is the base model of this CoSpec arbiter" in caplog.text


def test_incomplete_or_foreign_folders_are_refused_as_arbiters(pair, mixed_arbiter, tmp_path):
    model, tok, draft = pair
    folder = mixed_arbiter.save_pretrained(tmp_path / "arb")
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("feature_")}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"not a complete CoSpec arbiter: missing \['feature_mean', 'feature_std'\]"):
        CoSpecArbiter.from_pretrained(folder)
    with pytest.raises(ValueError, match="holds a 'llama' model, not a CoSpec arbiter"):
        CoSpec(str(model.save_pretrained(tmp_path / "llama") or tmp_path / "llama"), draft).load_arbiter(model)
    # A routed model's folder: its own format loaded first and failed with "no decoder blocks found".
    from hf_compress.routing import save_routed
    from hf_compress.routing.layer import install_routing, remove_routing
    from hf_compress.routing.schedule import RoutingSchedule

    install_routing(model, RoutingSchedule([0.5, 0.5]), mode="static")
    try:
        save_routed(model, tok, tmp_path / "routed")
    finally:
        remove_routing(model)
    with pytest.raises(ValueError, match="holds a 'llama' model, not a CoSpec arbiter"):
        CoSpecArbiter.from_pretrained(tmp_path / "routed")
    arbiter, info = CoSpecArbiter.from_pretrained(mixed_arbiter.save_pretrained(tmp_path / "whole"),
                                                  output_loading_info=True)
    assert not info["missing_keys"] and isinstance(arbiter, CoSpecArbiter)


def test_custom_generate_folder_and_hub_round_trip(pair, mixed_arbiter, tmp_path, fake_hub):
    model, tok, _ = pair
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    reference = model.generate(ids, max_new_tokens=16, do_sample=False, custom_generate=CoSpec(mixed_arbiter))
    folder = mixed_arbiter.save_pretrained(tmp_path / "cospec")
    from_folder = model.generate(ids, max_new_tokens=16, do_sample=False, custom_generate=str(folder),
                                 trust_remote_code=True)
    mixed_arbiter.push_to_hub("user/tiny-cospec")
    from_hub = model.generate(ids, max_new_tokens=16, do_sample=False, custom_generate="user/tiny-cospec",
                              trust_remote_code=True)
    assert torch.equal(from_folder, reference) and torch.equal(from_hub, reference)
    assert CoSpecArbiter.from_pretrained("user/tiny-cospec").config.threshold == mixed_arbiter.config.threshold


def test_a_folder_saved_again_in_place_decodes_with_its_new_arbiter(pair, tmp_path):
    """generate.py is the same file after the second save, so transformers keeps its module, and the strategy it
    built from the first arbiter's files served the folder until the process ended."""
    model, tok, _ = pair
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    keen, strict = CoSpecArbiter.for_model(model), CoSpecArbiter.for_model(model)
    with torch.no_grad():
        keen.net[-1].bias.fill_(10.0)  # accepts every mismatching draft token
    outputs = {}
    for name, arbiter in (("keen", keen), ("strict", strict)):
        reference = model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=CoSpec(arbiter))
        folder = arbiter.save_pretrained(tmp_path / "cospec", overwrite=True)
        outputs[name] = model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=str(folder),
                                       trust_remote_code=True)
        assert torch.equal(outputs[name], reference), name
    assert not torch.equal(outputs["keen"], outputs["strict"])  # the two arbiters decide differently here


def test_the_engine_refuses_an_arbiter_rule_for_another_target(pair, mixed_arbiter):
    """The arbiter as a plain acceptance rule of the engine (no CoSpec strategy around it) is checked too."""
    model, tok, draft = pair
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    for rule in (mixed_arbiter, mixed_arbiter.as_rule(threshold=0.3)):
        with pytest.raises(ValueError, match="Wrong base model for this CoSpec arbiter"):
            draft.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=SpeculativeDecoding(acceptance=rule))
        model.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=SpeculativeDecoding(acceptance=rule))


# torch deprecates torch.ao.quantization (2.13 and 2.14 warn that it will be removed); the case it builds, a target
# whose lm_head `weight` is a method, is tested while torch has it.
@pytest.mark.skipif(not callable(getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)),
                    reason="this torch has no torch.ao.quantization.quantize_dynamic")
def test_arbiters_for_a_dynamic_int8_target_and_a_clear_error_without_an_lm_head(pair):
    model, tok, _ = pair
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    arbiter = CoSpecArbiter.for_model(int8, tokenizer=tok)  # its lm_head's `weight` is a method, not a tensor
    ids = tok(PROMPTS[2], return_tensors="pt").input_ids
    assert torch.equal(int8.generate(ids, max_new_tokens=8, do_sample=False, custom_generate=CoSpec(arbiter, mode="strict")),
                       int8.generate(ids, max_new_tokens=8, do_sample=False))
    with pytest.raises(ValueError, match="no output projection to the vocabulary"):
        CoSpecArbiter.for_model(model.model)
    with pytest.raises(ValueError, match="no output projection to the vocabulary"):
        arbiter.check_compatible(model.model)


# ------------------------------------------------------------------------------------ FLy calibration
def test_fly_calibrate_meets_the_target_on_held_out_prompts(pair):
    model, tok, draft = pair
    # The tiny model is nearly uniform, so its top-3 entropy is ~0.06 nats: FLy's 0.3 always "sees confidence".
    common = dict(tokenizer=tok, thresholds=(0.1, 0.066, 0.0), windows=(1,), max_new_tokens=12, stop_at_newline=False,
                  num_draft_tokens=4, use_ngram=False)
    # A task every answer passes: the loosest setting keeps the score and needs the fewest target forwards.
    held_out = [{"prompt": p, "answers": ["x"]} for p in PROMPTS]
    fly = FLy.calibrate(model, draft, held_out, target_keep=0.99, reward=lambda text, answers: 1.0, **common)
    report = fly.calibration
    strict_forwards = report["tried"][0]["target_forwards"]
    assert report["score"] == "task" and len(report["tried"]) == 4  # strict + 3 thresholds
    assert report["chosen"]["loose"] and fly.entropy_threshold < 0.1 and fly.window == 1  # the gate opens below 0.066
    assert report["chosen"]["target_forwards"] == min(r["target_forwards"] for r in report["tried"]) < strict_forwards
    assert report["chosen"]["kept"] >= 0.99
    # Every answer scores 1.0, so the paired lower bound equals the mean: the same choice with a confidence bound.
    cautious = FLy.calibrate(model, draft, held_out, target_keep=0.99, reward=lambda text, answers: 1.0,
                             confidence=0.9, **common).calibration
    assert cautious["confidence"] == 0.9 and cautious["chosen"] == {**report["chosen"], "lower_bound": 1.0}
    assert all(r["lower_bound"] == 1.0 for r in cautious["tried"][1:]) and "scores" not in cautious["tried"][1]
    # Agreement with strict answers: loosening changes the random model's texts, so the search stops at the first
    # setting that misses the target and falls back to the best one that met it.
    fly = FLy.calibrate(model, draft, PROMPTS, target_keep=0.8, **common)
    report = fly.calibration
    assert report["score"] == "agreement with strict"
    assert report["tried"][-1]["kept"] < 0.8 and all(r["kept"] >= 0.8 for r in report["tried"][:-1])
    assert report["chosen"]["kept"] >= 0.8
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids  # the chosen setting keeps the strict answer here
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=fly),
                       model.generate(ids, max_new_tokens=12, do_sample=False))


def test_fly_calibrate_loads_a_draft_given_by_path_once(pair, tmp_path, monkeypatch):
    import transformers

    model, tok, draft = pair
    draft.save_pretrained(tmp_path / "draft")
    loads = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(str(args[0]))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    fly = FLy.calibrate(model, str(tmp_path / "draft"), PROMPTS[:2], target_keep=0.5, tokenizer=tok,
                        thresholds=(0.1, 0.05, 0.0), windows=(1,), max_new_tokens=4, stop_at_newline=False,
                        use_ngram=False)
    assert len(fly.calibration["tried"]) >= 2 and loads == [str(tmp_path / "draft")]  # the strict run's load only
    assert fly.draft_model is not None and not isinstance(fly.draft_model, str)


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_gives_clear_errors(pair, mixed_arbiter, tmp_path):
    model, tok, draft = pair
    other, _ = tiny_model("llama", vocab_size=300)
    with pytest.raises(ValueError, match="hidden size 64 and 256 tokens"):
        other.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, custom_generate=CoSpec(mixed_arbiter))
    arbiter = CoSpecArbiter.for_model(model)
    arbiter.config.tokenizer_fingerprint = "0" * 16
    with pytest.raises(ValueError, match="another tokenizer"):
        arbiter.check_compatible(model, tok)
    # The fingerprint is remembered per tokenizer, and recomputed once the vocabulary grows.
    grown = tiny_model("llama")[1]
    before = tokenizer_fingerprint(grown)
    assert tokenizer_fingerprint(grown) == before == tokenizer_fingerprint(tok)
    grown.add_tokens(["<new-token>"])
    assert tokenizer_fingerprint(grown) != before
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    folder = tok.save_pretrained(str(tmp_path / "tok")) and tmp_path / "tok"
    # A pair's tokenizers named by path are loaded before the check, so the first call already refuses.
    with pytest.raises(ValueError, match="another tokenizer"):
        model.generate(ids, max_new_tokens=4, do_sample=False,
                       custom_generate=CoSpec(arbiter, draft, tokenizer=str(folder), draft_tokenizer=str(folder)))
    with pytest.raises(ValueError, match="Unknown reward 'bleu'"):
        train_arbiter(model, draft, task(tok), reward="bleu", tokenizer=tok)
    with pytest.raises(ValueError, match="no reference answers"):
        train_arbiter(model, draft, [{"prompt": "x", "answers": []}], tokenizer=tok)
    # Calibration: an unknown reward with plain prompts, and a held-out set mixing answered and unanswered items.
    with pytest.raises(ValueError, match="Unknown reward 'bleu'"):
        FLy.calibrate(model, draft, PROMPTS[:2], tokenizer=tok, reward="bleu")
    with pytest.raises(ValueError, match="mixes items with reference answers and 1 without"):
        FLy.calibrate(model, draft, [{"prompt": PROMPTS[0], "answers": ["x"]}, {"prompt": PROMPTS[1], "answers": []}],
                      tokenizer=tok)
    with pytest.raises(ValueError, match="needs a trained arbiter"):
        CoSpec()
    with pytest.raises(ValueError, match="threshold"):
        CoSpec(mixed_arbiter, threshold=2.0)
    with pytest.raises(ValueError, match="mode"):
        CoSpec(mixed_arbiter, mode="maybe")
    with pytest.raises(ValueError, match="do_sample=False"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=True, custom_generate=CoSpec(mixed_arbiter))
    with pytest.raises(ValueError, match="hidden states"):
        ArbiterRule(mixed_arbiter).verify(torch.tensor([[1]]), torch.zeros(1, 2, 256))
    with pytest.raises(ValueError, match="target_keep"):
        FLy.calibrate(model, draft, PROMPTS, target_keep=0.0, tokenizer=tok)
    with pytest.raises(ValueError, match="scores 0"):
        FLy.calibrate(model, None, [{"prompt": "abc", "answers": ["zzzz qqqq"]}], tokenizer=tok, max_new_tokens=4)
    with pytest.raises(ValueError, match="initial_draft_probability"):
        ArbiterConfig(initial_draft_probability=1.0)
