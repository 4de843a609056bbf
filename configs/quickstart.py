"""Quickstart: SFT of the tiny model on the built-in "sort" task, on a laptop CPU.

    python -m jalign.train --config=configs/quickstart.py --workdir=/tmp/jalign_quickstart

Prints the held-out gold reward before and after training and writes
WORKDIR/summary.json. `--config=configs/quickstart.py:test` is a seconds-long variant.
"""

from jalign.config_utils import base_config


def get_config(arg: str = ""):
    config = base_config()
    config.algo = "sft"
    config.data.task = "sort"
    config.data.batch_size = 32
    config.data.max_length = 48
    config.data.max_prompt_length = 32
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 20
    config.train.num_steps = 300
    config.train.eval_every = 150
    config.train.checkpoint_every = 100
    config.eval.num_prompts = 128
    config.eval.max_new_tokens = 16
    if arg == "test":
        config.data.num_train_examples = 256
        config.data.batch_size = 8
        config.train.num_steps = 6
        config.train.log_every = 1
        config.train.eval_every = 6
        config.train.checkpoint_every = 3
        config.eval.num_prompts = 8
        config.eval.batch_size = 8
        config.eval.max_new_tokens = 8
    elif arg:
        raise ValueError(f"configs/quickstart.py: unknown variant {arg!r}; valid: '', 'test'")
    return config
