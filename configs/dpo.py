"""DPO (or KTO) of your model on your preference data.

    python -m jalign.train --config=configs/dpo.py --workdir=/tmp/dpo \
        --config.init_from=HF_OR_CONVERTED_DIR --config.data.path=pairs.jsonl \
        [--config.data.eval_path=eval_pairs.jsonl]

Rows are {"prompt", "chosen", "rejected"} (text or chat messages; an implicit prompt,
chosen/rejected conversations sharing their first turns, is split off; docs/data.md).
The reference is the starting model (frozen). beta 0.1 and lr 1e-6 as TRL's
DPOConfig; any `--config.dpo.loss_type` of docs/losses.md. The architecture, compute
dtype and tokenizer come from the init_from folder (configs/_real_model.py).
Variants: `:kto` (KTO on {"prompt", "completion", "label"} rows), `:lora` (rank-16
adapters over a frozen float32 base; the base is the reference, no second model),
`:qlora` (the base quantised to nf4), `:test` (a few steps, for tests).
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("_real_model.py")))


def get_config(arg: str = ""):
    variants = _common["parse_variants"](arg, "dpo", ("kto", "lora", "qlora"))
    algo = "kto" if "kto" in variants else "dpo"
    config = _common["real_model_config"](algo, learning_rate=1e-6, test="test" in variants)
    config.dpo.beta = 0.1
    if variants & {"lora", "qlora"}:
        config.model.lora_rank = 16
        config.model.lora_alpha = 32.0
        config.model.lora_quantization = "nf4" if "qlora" in variants else "none"
        config.optimizer.learning_rate = 5e-6
    return config
