"""DPO of a Llama-3.2-1B-shaped model on one small TPU chip (v5e-1, 16 GiB): full, LoRA, QLoRA.

Fit check (compiles the real step for the chip on any machine; no TPU needed):

    python -m jalign.aot --config=configs/dpo_1b_lora.py:lora --topology=v5e:1x1

Train (a Colab v5e-1 runtime, or any single accelerator), from a model converted with
`python -m jalign.convert import --hf=... --out=SFT`:

    python -m jalign.train --config=configs/dpo_1b_lora.py:qlora --workdir=/tmp/dpo_1b \
        --config.init_from=SFT \
        --config.data.path=/data/train.jsonl --config.data.eval_path=/data/eval.jsonl

Variants (`--config=configs/dpo_1b_lora.py:VARIANT`):
  full   every weight trained: float32 master params + AdamW state + a frozen float32
         reference copy (does not fit one v5e chip; see benchmarks/RESULTS.md);
  lora   rank-16 adapters on every projection over a frozen bfloat16 base; the base
         with adapters disabled is the reference, so there is one model in memory;
  qlora  the same with the base projections stored as nf4 (qwix, blocks of 64);
  cpu    (with lora/qlora) a tiny model on the built-in sort task, for a smoke run.
All variants: bfloat16 compute, remat "full", 8 pairs x 512 tokens per step,
log-probs through the chunked op (no [tokens, vocab] logits).
"""

from jalign.config_utils import base_config, model_config

VARIANTS = ("full", "lora", "qlora")


def get_config(arg: str = "lora"):
    options = {v for v in arg.split(",") if v}
    kind = options & set(VARIANTS)
    if len(kind) != 1 or options - set(VARIANTS) - {"cpu"}:
        raise ValueError(f"configs/dpo_1b_lora.py: give one of {VARIANTS} (optionally with "
                         f"',cpu'), got {arg!r}")
    (kind,) = kind
    config = base_config()
    config.algo = "dpo"
    lora = {} if kind == "full" else dict(
        lora_rank=16, lora_alpha=32.0, lora_base_dtype="bfloat16",
        lora_quantization="nf4" if kind == "qlora" else "none")
    config.model = model_config("llama3_1b", param_dtype="float32", dtype="bfloat16",
                                remat="full", **lora)
    config.mesh.fsdp = -1
    config.data.source = "jsonl"
    config.data.batch_size = 8
    config.data.max_length = 512
    config.data.max_prompt_length = 256
    config.optimizer.learning_rate = 5e-7 if kind == "full" else 5e-5
    config.optimizer.warmup_steps = 50
    config.train.num_steps = 1000
    config.train.logprob_impl = "chunked"
    config.dpo.beta = 0.1
    if "cpu" in options:
        config.model = model_config("tiny", **lora)
        config.data.source = "task"
        config.data.batch_size = 8
        config.data.max_length = 48
        config.data.max_prompt_length = 32
        config.train.num_steps = 20
        config.train.logprob_impl = "auto"
    return config
