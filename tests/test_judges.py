"""Language-model judges (jalign.judges), the label stage (jalign.label) and the judge
reward source, on a random tiny decoder with the built-in character tokenizer."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign import judges, label, pipeline, revise
from jalign.algorithms.reward_sources import build_sources, judge_reward
from jalign.config_utils import base_config
from jalign.data import load_preference_records, make_preference_dataset
from jalign.data.preference import tokenizable_preference_records
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder, decoder_init_fn, logits_from_hidden
from jalign.tasks import get_task
from jalign.tokenizer import builtin_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTITUTION = os.path.join(ROOT, "configs", "constitutions", "helpful_concise.txt")
MODEL = ModelConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                    intermediate_size=64)


def _judge_config(**overrides):
    config = base_config()
    config.judge.update({**dict(path="unused", constitution=CONSTITUTION, batch_size=4,
                                max_length=256), **overrides})
    return config.judge


@pytest.fixture(scope="module")
def params():
    return nn.meta.unbox(jax.jit(decoder_init_fn(MODEL))(jax.random.PRNGKey(0)))


def _judge(params, **overrides):
    return judges.Judge(judges.judge_spec(_judge_config(**overrides)), params, MODEL,
                        builtin_tokenizer())


def test_pairwise_probabilities_are_order_symmetric(params):
    judge = _judge(params)
    task = get_task("sort")
    pairs = task.preference_pairs(5, seed=0)
    prompts = [p["prompt"] for p in pairs]
    xs, ys = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    principles = judges.sample_principles(judge.spec.principles, 5, seed=0)
    forward = judge.pairwise(prompts, xs, ys, principles)
    backward = judge.pairwise(prompts, ys, xs, principles)
    np.testing.assert_allclose(forward["prob"] + backward["prob"], 1.0, atol=1e-6)
    # A random judge has a position bias; the two orders' average cancels it.
    assert np.abs(forward["first_prob"] - 0.5).max() > 1e-3
    np.testing.assert_allclose(forward["first_prob"], backward["first_prob"], atol=1e-6)
    np.testing.assert_array_equal(judges.preference([0.7, 0.52, 0.2], 0.05), [1.0, 0.5, 0.0])


@jax.jit
def _plain_logits(params, tokens_1xT):
    return logits_from_hidden(Decoder(MODEL).apply({"params": params}, tokens_1xT), params, MODEL)


def test_label_logprobs_equal_a_plain_forward_pass(params):
    judge = _judge(params, kind="pointwise", labels="1,2,3")
    rows = [judge.render(principle="Be right.", prompt="sort: 3 1", completion=c)
            for c in ("1 3", "3 1 1 1 1 1 1 1 1")]
    logps, mass = judge.label_logprobs(rows)  # left-padded, one batch
    ids = np.asarray(judge.label_ids)
    for i, row in enumerate(rows):
        full = jax.nn.log_softmax(_plain_logits(params, jnp.asarray([row]))[0, -1])
        np.testing.assert_allclose(logps[i], np.asarray(full)[ids], atol=1e-5)
        np.testing.assert_allclose(mass[i], jax.nn.logsumexp(full[ids]), atol=1e-5)
    # The pointwise score: the expected rating, normalised over the labels.
    scores = judge.pointwise(["sort: 3 1"] * 2, ["1 3", "3 1 1 1 1 1 1 1 1"], ["Be right."] * 2)
    np.testing.assert_allclose(scores, np.asarray(jax.nn.softmax(logps, -1)) @ [1, 2, 3],
                               atol=1e-6)


def test_a_judge_on_a_mesh_is_split_like_a_policy_and_scores_as_on_one_device(params,
                                                                            tmp_path):
    from jalign import sharding as shd
    from jalign.checkpoint import save_params
    from jalign.models.pretrained import write_run_model
    save_params(str(tmp_path / "final_params"), params)
    write_run_model(str(tmp_path), MODEL, "")
    spec = judges.judge_spec(_judge_config(path=str(tmp_path), kind="pointwise", labels="1,2,3",
                                           batch_size=3))
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    single, split = judges.load_judge(spec), judges.load_judge(spec, mesh)
    embedding = split.params["embed"]
    assert embedding.sharding.mesh == mesh and not embedding.sharding.is_fully_replicated
    assert embedding.addressable_shards[0].data.size == embedding.size // 4  # fsdp = 4
    assert split.batch_size == 8  # 3, rounded up to the data x fsdp split of the batch
    rows = [split.render(principle="Be right.", prompt="sort: 3 1", completion="1 3" + " 1" * k)
            for k in range(11)]
    for a, b in zip(single.label_logprobs(rows), split.label_logprobs(rows)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_label_of_several_tokens_is_refused_naming_it_and_the_tokenizer(params):
    with pytest.raises(ValueError, match=r"judge label '10' is 2 tokens.*tokenizer of unused"):
        _judge(params, kind="pointwise", labels="1,5,10")


def test_a_missing_constitution_names_the_key_and_the_path():
    with pytest.raises(FileNotFoundError,
                       match=r"config.judge.constitution='/nowhere/c.txt': no such file"):
        judges.judge_spec(_judge_config(constitution="/nowhere/c.txt"))
    config = _cai_test_config()
    config.judge.constitution = "/nowhere/c.txt"
    with pytest.raises(FileNotFoundError, match="config.judge.constitution='/nowhere/c.txt'"):
        pipeline.validate_pipeline(config)


def _cai_test_config(variant="test"):
    import importlib.util
    spec = importlib.util.spec_from_file_location("cai_tiny", os.path.join(ROOT, "configs",
                                                                           "cai_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    config.judge.constitution = CONSTITUTION
    return config


def test_cai_pipeline_stages_read_the_label_stage_output():
    config = _cai_test_config()
    pipeline.validate_pipeline(config)
    stages = pipeline.stages_of(config)
    label_cfg = pipeline.stage_config(config, stages[1], "/w/sft/final_params", "/w")
    dpo_cfg = pipeline.stage_config(config, stages[2], "/w/sft/final_params", "/w")
    assert (label_cfg.algo, label_cfg.judge.path) == ("label", "/w/sft")
    assert (dpo_cfg.data.source, dpo_cfg.data.path) == ("jsonl", "/w/label/pairs.jsonl")


def test_label_stage_jsonl_round_trips_through_the_preference_pipeline(params, tmp_path,
                                                                       monkeypatch):
    judge = _judge(params, margin=0.0)
    monkeypatch.setattr(judges, "cached_judge", lambda *args: judge)
    config = base_config()
    config.judge.update(dict(path="unused", constitution=CONSTITUTION, margin=0.0))
    config.label.num_samples = 4
    task = get_task("sort")
    records = task.prompt_records(3, seed=0)
    completions = [[task.reference(r["prompt"]), "9 9", "1", task.reference(r["prompt"]) + " 0"]
                   for r in records]
    rows, report = label.label_pairs(label.spec(config), records, completions, task, seed=0,
                                     tokenizer=builtin_tokenizer())
    assert report["label/pairs_written"] == len(rows) == 6
    assert 0.0 <= report["judge/gold_agreement"] <= 1.0
    path = tmp_path / label.PAIRS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded, _ = load_preference_records(str(path))
    for row, record in zip(rows, loaded):
        assert {k: record[k] for k in ("prompt", "chosen", "rejected")} == \
               {k: row[k] for k in ("prompt", "chosen", "rejected")}
        assert row["judge_probability"] >= 0.5 and row["principle"] in judge.spec.principles
        assert row["gold_chosen"] == pytest.approx(
            float(task.gold_reward([row["prompt"]], [row["chosen"]])[0]))
    tokenizer = builtin_tokenizer()
    kept = tokenizable_preference_records(loaded, tokenizer, max_length=48)
    batch = next(iter(make_preference_dataset(kept, tokenizer, batch_size=8, max_length=48,
                                              seed=0, shuffle=False, num_epochs=1)))
    assert int(np.asarray(batch["pair_mask"]).sum()) == len(rows)


def test_judge_reward_source_scores_each_completion(params, monkeypatch):
    judge = _judge(params, kind="pointwise", labels="Y,N")  # one character each
    monkeypatch.setattr(judges, "cached_judge", lambda *args: judge)
    reward = build_sources(["judge"], [1.0], gold=None, reward_model=None,
                           judge=lambda: judge_reward(_judge_config(kind="pointwise",
                                                                    labels="Y,N")))
    prompts, completions = ["sort: 2 1\n"] * 2, ["1 2", "2 1"]
    total, metrics = reward([{"prompt": p} for p in prompts], prompts, completions, [3, 3])
    np.testing.assert_allclose(total, judge.pointwise(["sort: 2 1"] * 2, completions), atol=1e-6)
    assert "rewards/judge/mean" in metrics
    with pytest.raises(ValueError, match="config.judge.kind='pointwise'"):
        judge_reward(_judge_config(kind="pairwise"))


@pytest.mark.slow
def test_the_judge_win_rate_compares_policy_and_reference_with_the_pairwise_judge(
        params, monkeypatch):
    from jalign.algorithms.common import judge_win_rate_fn
    judge = _judge(params)
    monkeypatch.setattr(judges, "cached_judge", lambda *args: judge)
    config = base_config()
    config.judge.update(dict(path="unused", constitution=CONSTITUTION))
    assert judge_win_rate_fn(config, ["sort: 2 1\n"]) is None  # not asked for
    config.eval.win_rate_by = "gold_reward,judge"
    prompts = ["sort: 2 1\n", "sort: 3 1 2\n", "sort: 5 4\n"]
    compare = judge_win_rate_fn(config, prompts)
    ours, theirs = ["1 2", "1 2 3", "5 4"], ["2 1", "1 2 3", "4 5"]
    principles = judges.sample_principles(judge.spec.principles, 3, config.seed + 1)
    want = judge.pairwise([p.strip() for p in prompts], ours, theirs, principles)["prob"]
    got = compare([0, 1, 2], ours, theirs)["judge"]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[1] == pytest.approx(0.5, abs=1e-6)  # the same answer: an even verdict
    config.judge.kind = "pointwise"
    with pytest.raises(ValueError, match="config.judge.kind must be 'pairwise'"):
        judge_win_rate_fn(config, prompts)


def test_cai_tiny_runs_sft_revise_sl_cai_label_dpo_end_to_end(tmp_path):
    """Constitutional AI in full at seconds-long sizes: the revise stage's JSONL is the
    SL-CAI stage's SFT data, and label and DPO start from the SL-CAI model."""
    config = _cai_test_config("critique,test")
    out = pipeline.run_pipeline(config, str(tmp_path))
    revised = [json.loads(line) for line in open(tmp_path / "revise" / revise.REVISIONS_FILE)]
    report = out["stages"]["revise"]["final_metrics"]
    assert len(revised) == report["revise/rows"] > 0
    assert report["revise/rows"] + report["revise/empty_revisions"] == 16
    principles = set(judges.read_constitution(CONSTITUTION))
    for row in revised:
        assert row["principle"] in principles and "\n" not in row["completion"]
        assert row["gold_revision"] == get_task("sort").gold_reward([row["prompt"]],
                                                                    [row["completion"]])[0]
    assert out["stages"]["sl_cai"]["final_metrics"]["num_tokens"] > 0
    for stage in ("label", "dpo"):
        start = pipeline.stage_config(config, stage, "unused", str(tmp_path)).init_from
        assert start == str(tmp_path / "sl_cai" / "final_params"), stage
    rows, _ = load_preference_records(str(tmp_path / "label" / label.PAIRS_FILE))
    assert len(rows) == out["stages"]["label"]["final_metrics"]["label/pairs_written"] > 0
    final = out["stages"]["dpo"]["final"]
    assert "gold_reward/greedy" in final and 0.0 <= final["winrate/length_controlled"] <= 1.0
    assert 0.0 <= final["winrate/judge/raw"] <= 1.0  # by the pairwise judge (the SFT model)
    assert set(out["table"]) == {"base", "sft", "sl_cai", "dpo"}


def test_revision_rows_keep_non_empty_revisions_with_gold_before_and_after():
    task = get_task("sort")
    records = [{"prompt": "sort: 3 1 2\n"}, {"prompt": "sort: 5 4\n"},
               {"prompt": [{"role": "user", "content": "sort: 2 1"}]}]
    rows, report = revise.revision_rows(
        records, originals=["3 1 2", "4 5 ", "1 2"], critiques=["unsorted", "fine", "ok"],
        revisions=["1 2 3", "4 5", ""], principles=["p1", "p2", "p3"], task=task)
    assert [r["completion"] for r in rows] == ["1 2 3", "4 5"]
    before = task.gold_reward(["sort: 3 1 2\n", "sort: 5 4\n"], ["3 1 2", "4 5 "])
    after = task.gold_reward(["sort: 3 1 2\n", "sort: 5 4\n"], ["1 2 3", "4 5"])
    assert report == {"revise/prompts": 3, "revise/rows": 2, "revise/empty_revisions": 1,
                      "revise/unchanged": 1, "gold/original": pytest.approx(before.mean()),
                      "gold/revision": pytest.approx(after.mean()),
                      "gold/revision_better": np.mean(after > before),
                      "gold/revision_worse": np.mean(after < before)}
    assert [r["gold_original"] for r in rows] == pytest.approx(list(before))
    assert rows[0]["critique"] == "unsorted" and rows[0]["original"] == "3 1 2"
    assert revise.clean_revision("  1 2 3\nThis is sorted.", True) == "1 2 3"
    assert revise.clean_revision("  a\nb ", False) == "a\nb"


def test_revise_templates_missing_a_field_are_named():
    config = _cai_test_config("critique,test")
    config.revise.revision_template = "Principle: {principle} Task: {prompt} Answer: {completion}"
    with pytest.raises(ValueError, match=r"config.revise.revision_template has no \{critique\}"):
        revise.spec(config)
    config.revise.revision_template = ""
    config.revise.critic_temperature = 0.0
    with pytest.raises(ValueError, match="config.revise.critic_temperature must be > 0"):
        revise.spec(config)
