"""A Bradley-Terry reward model of your model on your preference pairs.

    python -m jalign.train --config=configs/reward.py --workdir=/tmp/reward \
        --config.init_from=SFT_WORKDIR/final_params --config.data.path=pairs.jsonl \
        [--config.data.eval_path=eval_pairs.jsonl]

Rows are {"prompt", "chosen", "rejected"} (text or chat messages; docs/data.md). A
scalar head on the last token of the starting model; held-out pairwise accuracy is
`eval_accuracy`. The architecture and tokenizer come from the init_from folder
(configs/_real_model.py). Variants: `:test` (a few steps, for tests).
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("_real_model.py")))


def get_config(arg: str = ""):
    variants = _common["parse_variants"](arg, "reward", ())
    return _common["real_model_config"]("reward", learning_rate=1e-5, test="test" in variants)
