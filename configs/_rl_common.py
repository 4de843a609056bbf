"""Settings the online-RL tiny configs share (configs/{grpo,rloo,ppo,online_dpo}_tiny.py).

Every one runs on the built-in `sort` task, starting from the quickstart's SFT
model (`--config.init_from=/tmp/jalign_quickstart/sft/final_params`).
"""

from jalign.config_utils import base_config


def parse_variants(arg: str, name: str, valid: tuple[str, ...]) -> tuple[str, bool]:
    """"VARIANT[,test]" -> (variant, test); the first of `valid` when none is named."""
    variants = {v for v in arg.split(",") if v}
    chosen = variants - {"test"}
    if len(chosen) > 1 or chosen - set(valid):
        raise ValueError(f"configs/{name}.py: unknown variant(s) {sorted(variants)}; valid: "
                         f"{', '.join(valid)} (+ test); each online-RL algorithm has its own "
                         "configs/{grpo,rloo,ppo,online_dpo}_tiny.py")
    return (chosen.pop() if chosen else valid[0]), "test" in variants


def tiny_rl_config(algo: str, *, prompts: int, group_size: int, test: bool,
                   test_prompts: int, test_group_size: int):
    """100 steps of `algo`, `prompts` x `group_size` completions per step.

    `test` shrinks it to a seconds-long run of two steps; the test sizes give
    rollout batches that split over 8 (simulated) devices.
    """
    config = base_config()
    config.algo = algo
    config.data.task = "sort"
    config.data.batch_size = prompts    # prompts per step; x group_size completions
    config.data.max_length = 48
    config.data.max_prompt_length = 48
    config.optimizer.learning_rate = 2e-4
    config.optimizer.warmup_steps = 5
    config.optimizer.schedule = "constant"
    config.rl.group_size = group_size
    config.rl.max_new_tokens = 16
    config.train.num_steps = 100
    config.train.eval_every = 50
    config.train.checkpoint_every = 50
    config.train.log_every = 5
    # 512 held-out prompts, so that a gain of a few hundredths in sampled gold reward is
    # above the eval's standard error (benchmarks/RESULTS.md, "Quickstart over 5 seeds").
    config.eval.num_prompts = 512
    config.eval.max_new_tokens = 16
    if test:
        config.data.batch_size = test_prompts
        config.rl.group_size = test_group_size
        config.rl.max_new_tokens = 8
        config.train.num_steps = 2
        config.train.eval_every = 2
        config.train.checkpoint_every = 2
        config.train.log_every = 1
        config.eval.num_prompts = 8
        config.eval.batch_size = 8
        config.eval.max_new_tokens = 8
    return config
