"""RLAIF on a laptop CPU: SFT -> label (a judge labels the SFT model's samples) -> DPO.

    python -m jalign.train --config=configs/cai_tiny.py --workdir=/tmp/jalign_cai \
        --config.judge.path=/tmp/judge_smollm2

The SFT stage learns the built-in "sort" task from half-imperfect demonstrations; the
label stage samples two completions per training prompt from the SFT model, has the
judge (`config.judge.path`: a Hugging Face folder such as SmolLM2-135M-Instruct, made
offline by `python -m jalign.convert gguf --gguf=smollm2 --out=/tmp/judge_smollm2`)
pick the better one under a principle drawn from configs/constitutions/helpful_concise.txt
and writes WORKDIR/label/pairs.jsonl; DPO trains on those pairs from the SFT model and
is evaluated on the task's held-out prompts and gold reward (config.eval.task), with its
raw and length-controlled win rates against the SFT model by gold and by the judge
(config.eval.win_rate_by="gold_reward,judge"). 512 prompts give ~500 pairs and DPO runs
100 steps: with the gold labeller (`:gold`) that setting raised sampled gold on 3/3 seeds,
where 128 prompts (50 or 200 steps) did not (benchmarks/RESULTS.md, "AI feedback").
WORKDIR/label/label_summary.json holds the judge's agreement with gold and its length
bias on the pairs it labelled.

Variants (`--config=configs/cai_tiny.py:VARIANT[,VARIANT]`):
  gold  the label stage labels the same sampled pairs by the gold reward (the control:
        the DPO gain from AI labels as a fraction of this one's);
  critique  Constitutional AI in full: after SFT, the judge's model critiques and revises
        the SFT model's samples under the constitution (the `revise` stage), `sl_cai` is
        SFT on the revisions (from the SFT model), and the label and DPO stages then start
        from the SL-CAI model: sft -> revise -> sl_cai -> label -> dpo;
  test  seconds-long sizes for CI; the judge defaults to the SFT stage's own model
        ("stage:sft", no download) with one-character labels.
"""

import pathlib
import runpy

import ml_collections

_quickstart = runpy.run_path(str(pathlib.Path(__file__).with_name("quickstart.py")))


CONSTITUTION = "configs/constitutions/helpful_concise.txt"


def get_config(arg: str = ""):
    variants = {v for v in arg.split(",") if v}
    unknown = variants - {"gold", "test", "critique"}
    if unknown:
        raise ValueError(f"configs/cai_tiny.py: unknown variant(s) {sorted(unknown)}; "
                         "valid: 'gold', 'critique', 'test'")
    config = _quickstart["sort_task_config"]()  # the quickstart's task, model, SFT settings
    config.pipeline.stages = "sft,label,dpo"
    config.pipeline.sft = ml_collections.ConfigDict()
    config.pipeline.dpo = ml_collections.ConfigDict({
        "train": {"num_steps": 100, "eval_every": 100},
        "optimizer": {"learning_rate": 1e-4, "warmup_steps": 10},
        "dpo": {"loss_type": "sigmoid", "beta": 0.5},
    })
    config.judge.path = "stage:sft" if "test" in variants else "/tmp/judge_smollm2"
    config.judge.constitution = CONSTITUTION
    config.judge.kind = "pairwise"
    # SmolLM2-135M's symmetric p(x > y) sits within ~0.02 of 1/2: the default tie margin
    # (0.05) would call almost every pair a tie, so every pair is decided here.
    config.judge.margin = 0.0
    config.judge.max_length = 256
    config.label.num_prompts = 512
    config.label.num_samples = 2
    config.label.max_new_tokens = 16
    config.label.temperature = 1.0
    config.label.labeller = "gold" if "gold" in variants else "judge"
    config.pipeline.label = ml_collections.ConfigDict()
    config.pipeline.dpo.data = ml_collections.ConfigDict({
        "source": "jsonl", "path": "stage:label/pairs.jsonl"})
    # Win rates against the SFT model by the gold reward and by the judge (pairwise).
    config.pipeline.dpo.eval = ml_collections.ConfigDict(
        {"task": "sort", "win_rate": True, "win_rate_by": "gold_reward,judge"})
    if "critique" in variants:
        config.pipeline.stages = "sft,revise,sl_cai=sft,label,dpo"
        config.revise.num_prompts = config.label.num_prompts
        config.revise.max_new_tokens = config.label.max_new_tokens
        config.pipeline.revise = ml_collections.ConfigDict()
        sl_cai = {"source": "jsonl", "path": "stage:revise/revisions.jsonl"}
        config.pipeline.sl_cai = ml_collections.ConfigDict({
            "data": sl_cai, "train": {"num_steps": 100, "eval_every": 50},
            "optimizer": {"learning_rate": 3e-4, "warmup_steps": 10},
            "eval": {"task": "sort"}})
        config.pipeline.label.init_from = "stage:sl_cai/final_params"
        config.pipeline.dpo.init_from = "stage:sl_cai/final_params"
    if "test" in variants:
        config.data.num_train_examples = 256
        config.data.num_eval_pairs = 16
        config.data.batch_size = 8
        config.train.num_steps = 6
        config.train.log_every = 1
        config.train.eval_every = 6
        config.train.checkpoint_every = 3
        config.eval.num_prompts = 8
        config.eval.batch_size = 8
        config.eval.max_new_tokens = 8
        config.pipeline.dpo.train.num_steps = 4
        config.pipeline.dpo.train.eval_every = 4
        config.judge.batch_size = 8
        config.label.num_prompts = 16
        config.label.max_new_tokens = 8
        config.label.batch_size = 16
        config.revise.num_prompts = 16
        config.revise.max_new_tokens = 8
        config.revise.critique_tokens = 8
        config.revise.revision_tokens = 8
        config.revise.batch_size = 16
        if "critique" in variants:
            config.pipeline.sl_cai.train = ml_collections.ConfigDict(
                {"num_steps": 4, "eval_every": 4, "checkpoint_every": 4})
    return config
