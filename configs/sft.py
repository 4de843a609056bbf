"""Supervised fine-tuning of your model on your data.

    python -m jalign.train --config=configs/sft.py --workdir=/tmp/sft \
        --config.init_from=HF_OR_CONVERTED_DIR --config.data.path=train.jsonl \
        [--config.data.eval_path=eval.jsonl]

A row is {"prompt": ..., "completion": ...} or {"messages": [...]} (chat messages
rendered with the checkpoint's chat template); the loss is on the completion /
assistant tokens only (docs/data.md). The architecture, compute dtype and tokenizer
come from the init_from folder (configs/_real_model.py). lr 2e-5 as TRL's SFTConfig.
Variants: `:lora` (rank-16 adapters on every projection over a frozen base),
`:test` (a few steps, for tests).
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("_real_model.py")))


def get_config(arg: str = ""):
    variants = _common["parse_variants"](arg, "sft", ("lora",))
    config = _common["real_model_config"]("sft", learning_rate=2e-5, test="test" in variants)
    if "lora" in variants:
        config.model.lora_rank = 16
        config.model.lora_alpha = 32.0
        config.optimizer.learning_rate = 2e-4
    return config
