"""DPO of a Llama-3-8B-shaped model with a frozen reference, sized for a v5p-64 slice.

Fit check (compiles the real step for the slice on any machine; no TPU needed):

    python -m jalign.aot --config=configs/dpo_8b.py --topology=v5p:2x4x4

Train, on every host of the slice (e.g. launch/tpu_vm.sh ... -- COMMAND), from an
SFT model converted with `python -m jalign.convert import --hf=... --out=SFT`:

    python -m jalign.train --config=configs/dpo_8b.py --workdir=/mnt/shared/dpo_8b \
        --config.init_from=SFT \
        --config.data.path=/data/train.jsonl --config.data.eval_path=/data/eval.jsonl

Choices:
  * model: the llama3_8b preset (8.03B parameters, untied 128256-token vocabulary);
    bfloat16 compute, float32 master params and float32 AdamW state (bf16 master
    weights lose DPO's small updates at lr 5e-7); remat "full" (each scanned
    layer keeps only its input for the backward pass).
  * reference: a frozen copy of the starting params in the state (sharded like the
    policy, no optimizer state). It has the policy's dtype, float32.
  * mesh: FSDP over every device (fsdp=-1); parameters, gradients, optimizer state
    and the reference are sharded 1/N, the batch is split over the same axis.
  * batch: 64 pairs x 1024 tokens per step (128 rows, 131k tokens; 4 rows per chip
    on v5p-64's 32 chips); log-probs through the chunked op, so no [tokens, vocab]
    logits are ever in memory.
  * fit (benchmarks/RESULTS.md "Fit check"): 9.9 GiB of 95 per chip on v5p-64,
    38.7 GiB on v5p-16 (8 chips); room for longer sequences or bigger batches.

Variants (`--config=configs/dpo_8b.py:VARIANT[,VARIANT]`):
  cpu     a tiny model on the built-in sort task: the same recipe as a CPU smoke run.
  seq8k   8192 tokens per sequence (prompts up to 4096), 32 pairs per step (the
          fewest v5p-64's 32 chips split evenly): 64 rows, 2 per chip, 524k tokens.
  seq32k  32768 tokens per sequence (prompts up to 16384), 32 pairs: 2.1M tokens.
          Fit on v5p-64 with splash: 16.5 GiB a chip at 8k, 89.2 GiB at 32k.
  xla     model.attention_impl="xla" (dense [T, T] scores), the "before" of the
          long-sequence fit checks (benchmarks/RESULTS.md "Fit check at 8k and 32k"):

    python -m jalign.aot --config=configs/dpo_8b.py:seq32k --topology=v5p:2x4x4
    python -m jalign.aot --config=configs/dpo_8b.py:seq32k,xla --topology=v5p:2x4x4
"""

from jalign.config_utils import base_config, model_config


def get_config(arg: str = ""):
    config = base_config()
    config.algo = "dpo"
    config.model = model_config("llama3_8b", param_dtype="float32", dtype="bfloat16",
                                remat="full")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1

    config.data.source = "jsonl"
    config.data.batch_size = 64
    config.data.max_length = 1024
    config.data.max_prompt_length = 512
    config.data.truncation = "keep_end"

    config.optimizer.learning_rate = 5e-7
    config.optimizer.warmup_steps = 100
    config.optimizer.schedule = "linear"
    config.optimizer.end_learning_rate_factor = 0.0
    config.optimizer.weight_decay = 0.0
    config.optimizer.max_grad_norm = 10.0

    config.dpo.loss_type = "sigmoid"
    config.dpo.beta = 0.1
    config.dpo.reference = "params"

    config.train.num_steps = 1000
    config.train.log_every = 10
    config.train.eval_every = 200
    config.train.eval_at_start = False
    config.train.checkpoint_every = 200
    config.train.keep_checkpoints = 2
    config.train.logprob_impl = "auto"

    variants = {v for v in arg.split(",") if v}
    known = {"cpu", "seq8k", "seq32k", "xla"}
    if variants - known or {"seq8k", "seq32k"} <= variants:
        raise ValueError(f"configs/dpo_8b.py: bad variant(s) {arg!r}; valid: {sorted(known)}, "
                         "at most one of seq8k / seq32k")
    for name, length in (("seq8k", 8192), ("seq32k", 32768)):
        if name in variants:
            config.data.batch_size = 32
            config.data.max_length = length
            config.data.max_prompt_length = length // 2
    if "xla" in variants:
        config.model.attention_impl = "xla"
    if "cpu" in variants:
        config.model = model_config("tiny", remat="full")
        config.data.source = "task"
        config.data.task = "sort"
        config.data.num_train_examples = 256
        config.data.num_eval_pairs = 16
        config.data.batch_size = 8
        config.data.max_length = 48
        config.data.max_prompt_length = 32
        config.optimizer.learning_rate = 1e-4
        config.optimizer.warmup_steps = 2
        config.train.num_steps = 10
        config.train.log_every = 1
        config.train.eval_every = 0
        config.train.checkpoint_every = 10
    return config
