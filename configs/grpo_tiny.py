"""GRPO (and its RLOO / Dr. GRPO / DAPO / online-DPO variants) on a built-in task, CPU-sized.

    python -m jalign.train --config=configs/grpo_tiny.py --workdir=/tmp/jalign_grpo \
        --config.init_from=/tmp/jalign_quickstart/sft/final_params

Starts from the quickstart's SFT model (`init_from`). Variants
(`--config=configs/grpo_tiny.py:VARIANT`): grpo (default), rloo, dr_grpo, dapo,
online_dpo, ppo (PPO with a critic; set --config.rl.critic_init to a reward
model's final_params to start the critic from it); add `,test` for a seconds-long run.
"""

from jalign.config_utils import base_config


def get_config(arg: str = ""):
    variants = {v for v in arg.split(",") if v}
    algo = (variants - {"test"}) or {"grpo"}
    unknown = algo - {"grpo", "rloo", "dr_grpo", "dapo", "online_dpo", "ppo"}
    if unknown or len(algo) > 1:
        raise ValueError(f"configs/grpo_tiny.py: unknown variant(s) {sorted(variants)}; valid: "
                         "grpo, rloo, dr_grpo, dapo, online_dpo, ppo (+ test)")
    (algo,) = algo
    config = base_config()
    config.algo = {"dr_grpo": "grpo", "dapo": "grpo"}.get(algo, algo)
    config.data.task = "sort"
    config.data.batch_size = 8          # prompts per step; x group_size completions
    config.data.max_length = 48
    config.optimizer.learning_rate = 2e-4
    config.optimizer.warmup_steps = 5
    config.optimizer.schedule = "constant"
    config.rl.group_size = 8
    config.rl.max_new_tokens = 16
    config.train.num_steps = 100
    config.train.eval_every = 50
    config.train.checkpoint_every = 50
    config.train.log_every = 5
    config.eval.num_prompts = 128
    config.eval.max_new_tokens = 16
    if algo == "dr_grpo":
        config.rl.scale_rewards = "none"
        config.rl.loss_aggregation = "dr_grpo"
    elif algo == "dapo":
        config.rl.clip_eps_high = 0.28
        config.rl.loss_aggregation = "dapo"
    elif algo == "rloo":
        config.rl.group_size = 4
        config.data.batch_size = 16
        config.rl.kl_beta = 0.05
    elif algo == "ppo":
        config.rl.group_size = 1
        config.data.batch_size = 32
        config.rl.num_iterations = 4
    elif algo == "online_dpo":
        config.dpo.beta = 0.5
    if "test" in variants:
        config.data.batch_size = 4 if algo != "rloo" else 8
        config.rl.group_size = {"rloo": 2, "ppo": 1}.get(algo, 4)
        config.rl.max_new_tokens = 8
        config.train.num_steps = 3
        config.train.eval_every = 3
        config.train.checkpoint_every = 3
        config.train.log_every = 1
        config.eval.num_prompts = 8
        config.eval.batch_size = 8
        config.eval.max_new_tokens = 8
    return config
