"""GRPO (or RLOO, PPO, online DPO) of your model on your prompts, scored by verifiers.

    python -m jalign.train --config=configs/grpo.py --workdir=/tmp/grpo \
        --config.init_from=SFT_WORKDIR/final_params --config.data.path=prompts.jsonl \
        [--config.data.eval_path=eval_prompts.jsonl] \
        [--config.rl.reward_sources=math_answer,python:my_rewards.fn]

Rows are {"prompt": text or chat messages, ...any columns your reward functions
read}, e.g. {"prompt": [{"role": "user", "content": "What is 47 + 85?"}], "answer":
"132"} for the default `math_answer` verifier (README "RL on your own prompts").
TRL 1.16's GRPO defaults: 8 completions per prompt, loss aggregation "dapo", no KL
term (rl.kl_beta 0), temperature 1, lr 1e-6. `--config.algo=rloo|ppo|online_dpo`
trains the other online algorithms on the same rollouts. The architecture, compute
dtype and tokenizer come from the init_from folder (configs/_real_model.py).
Variants: `:test` (a few steps, for tests).
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("_real_model.py")))


def get_config(arg: str = ""):
    variants = _common["parse_variants"](arg, "grpo", ())
    test = "test" in variants
    config = _common["real_model_config"]("grpo", learning_rate=1e-6, test=test)
    config.data.batch_size = 8           # prompts per step, x rl.group_size completions
    config.rl.group_size = 8
    config.rl.max_new_tokens = 256
    config.rl.loss_aggregation = "dapo"
    config.rl.reward_sources = "math_answer"
    config.eval.num_prompts = 64
    config.eval.max_new_tokens = 256
    config.eval.batch_size = 16
    if test:
        config.data.batch_size = 2
        config.rl.group_size = 4
        config.rl.max_new_tokens = 8
        config.eval.num_prompts = 4
        config.eval.max_new_tokens = 8
        config.eval.batch_size = 4
        config.train.num_steps = 2
        config.train.eval_every = 2
    return config
