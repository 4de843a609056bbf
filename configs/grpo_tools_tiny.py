"""Tool use from one command: SFT on demonstrations with calculator calls, then multi-turn GRPO.

    python -m jalign.train --config=configs/grpo_tools_tiny.py --workdir=/tmp/jalign_tools

The built-in `calc` task multiplies a 3-4 digit number by another, which the tiny
model cannot do in its head but can with the `calculator` tool: a turn
`<tool_call>{"name":"calculator","arguments":{"expression":"4821*937"}}</tool_call>`,
the tool's answer as a `tool` message, then the final answer. The gold reward is 1
when the final assistant turn is the product (held-out success).

  sft   demonstrations of which `demo_quality` (0.5) call the tool; the rest answer
        directly with a near miss, so the SFT model calls the tool about half of the
        time;
  grpo  multi-turn GRPO from the SFT model: each episode runs up to `max_turns` policy
        turns; every tool call is parsed (Hermes format), run (5 s timeout) and its
        result prefilled into the KV cache; the tool-result tokens have loss mask 0.

The summary's first and last gold figures are held-out success after SFT and after
GRPO, both as multi-turn episodes (greedy and sampled). Variants
(`--config=configs/grpo_tools_tiny.py:VARIANT[,VARIANT]`): `guess` plays the
higher/lower guessing game instead (credit over several turns, a -0.05 cost per wrong
guess); `test` seconds-long sizes.
"""

import ml_collections

from jalign.config_utils import base_config


def get_config(arg: str = ""):
    variants = {v for v in arg.split(",") if v}
    unknown = variants - {"guess", "test"}
    if unknown:
        raise ValueError(f"configs/grpo_tools_tiny.py: unknown variant(s) {sorted(unknown)}; "
                         "valid: 'guess', 'test'")
    config = base_config()
    config.data.task = "guess" if "guess" in variants else "calc"
    config.data.batch_size = 32
    config.data.max_length = 192
    config.data.max_prompt_length = 32
    config.data.demo_quality = 0.5
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 20
    config.train.num_steps = 500
    config.train.eval_every = 500
    config.train.checkpoint_every = 100
    config.eval.num_prompts = 128
    config.eval.max_new_tokens = 96       # per turn: a tool call is 83 characters
    config.rl.max_new_tokens = 96
    config.rl.max_turns = 3
    config.rl.max_observation_tokens = 96  # room for an error message the policy can read
    config.rl.max_episode_tokens = 288    # a call, its result (or an error) and an answer
    # The task's exact success, and 0.2 for an episode whose tool calls all ran: sampled
    # from the SFT model most episodes fail, and this keeps every group's rewards apart.
    config.rl.reward_sources = "gold,tool_use"
    config.rl.reward_weights = [1.0, 0.2]
    config.pipeline.stages = "sft,grpo"
    config.pipeline.sft = ml_collections.ConfigDict()
    config.pipeline.grpo = ml_collections.ConfigDict({
        "data": {"batch_size": 8},
        # Dr. GRPO: a sum over tokens with a constant normaliser and no std scaling, so that
        # long failing turns are not favoured over short ones.
        "rl": {"group_size": 8, "loss_aggregation": "dr_grpo", "scale_rewards": "none"},
        # The SFT stage's final evaluation is this stage's start.
        "train": {"num_steps": 100, "eval_every": 50, "log_every": 5, "eval_at_start": False},
        "optimizer": {"learning_rate": 1.5e-4, "warmup_steps": 5, "schedule": "constant"},
    })
    if "guess" in variants:
        config.data.max_length = 160
        config.eval.max_new_tokens = 8
        config.rl.max_new_tokens = 8
        config.rl.max_turns = 5
        config.rl.max_observation_tokens = 16
        config.rl.max_episode_tokens = 0
        config.rl.reward_sources = "gold"
        config.rl.reward_weights = None
    if "test" in variants:
        config.data.num_train_examples = 64
        config.data.batch_size = 8
        config.train.num_steps = 3
        config.train.log_every = 1
        config.train.eval_every = 3
        config.train.checkpoint_every = 3
        config.train.memory_report = False
        config.eval.num_prompts = 8
        config.eval.batch_size = 8
        config.eval.max_new_tokens = min(config.eval.max_new_tokens, 24)
        config.rl.max_new_tokens = min(config.rl.max_new_tokens, 24)
        config.rl.max_episode_tokens = 0
        config.pipeline.grpo.data.batch_size = 4
        config.pipeline.grpo.rl.group_size = 2
        config.pipeline.grpo.train.num_steps = 2
        config.pipeline.grpo.train.eval_every = 2
        config.pipeline.grpo.train.log_every = 1
    return config
