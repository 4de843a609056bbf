"""Settings the real-model configs share (configs/{sft,reward,dpo,grpo}.py).

The model's architecture, compute dtype and tokenizer come from `config.init_from`
(a Hugging Face folder, a `python -m jalign.convert import` folder or an earlier
run's WORKDIR/final_params); a `--config.model.*` architecture key given on the
command line must agree with it. Data come from your JSONL/Parquet files.
Defaults follow what TRL users expect: 1024-token sequences with no separate prompt
limit (rows that do not fit are counted and reported, never cut silently), float32
master weights, a linear decay to zero, AdamW without weight decay.
"""

from jalign.config_utils import base_config, model_from_checkpoint


def parse_variants(arg: str, name: str, valid: tuple[str, ...]) -> set[str]:
    variants = {v for v in arg.split(",") if v}
    unknown = variants - set(valid) - {"test"}
    if unknown:
        raise ValueError(f"configs/{name}.py: unknown variant(s) {sorted(unknown)}; valid: "
                         f"{', '.join(valid + ('test',))}")
    return variants


def real_model_config(algo: str, *, learning_rate: float, test: bool):
    config = base_config()
    config.algo = algo
    config.model = model_from_checkpoint()
    config.data.source = "jsonl"
    config.data.max_length = 1024
    config.data.max_prompt_length = 0        # no separate prompt limit: only max_length
    config.data.batch_size = 8
    config.optimizer.learning_rate = learning_rate
    config.optimizer.schedule = "linear"
    config.optimizer.end_learning_rate_factor = 0.0
    config.optimizer.warmup_steps = 0
    config.train.num_steps = 1000
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.checkpoint_every = 500
    if test:  # seconds on a CPU with a tiny model: what the CI test runs
        config.train.num_steps = 4
        config.train.log_every = 1
        config.train.eval_every = 4
        config.train.checkpoint_every = 2
    return config
