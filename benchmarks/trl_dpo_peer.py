"""Peer measurement for benchmarks/dpo_step.py: TRL's DPOTrainer on the same shape, on this CPU.

    pip install torch==2.13.0 trl transformers datasets accelerate   # not jalign dependencies
    python benchmarks/trl_dpo_peer.py [--pairs 8] [--prompt 64] [--response 64]
                                      [--warmup 3] [--steps 20] [--threads 2]

A randomly initialised LlamaForCausalLM of jalign's "bench" preset (vocab 4096,
hidden 256, 4 layers, 4 heads / 4 KV heads, intermediate 688, tied embeddings,
float32) is trained by trl.DPOTrainer with its defaults for the loss (sigmoid,
beta 0.1, learning rate 1e-6, AdamW), with a separate reference model (a copy
of the policy; the reference forward runs every step, no precomputation),
per_device_train_batch_size = pairs, no gradient accumulation, max_length =
prompt + response, and no logging, saving or evaluation. Gradient checkpointing
is turned off and float32 is forced (TRL's config defaults would turn on
checkpointing and bf16 autocast), so that both frameworks do the same work:
policy forward over chosen + rejected, reference forward, policy backward and
the optimizer update. TRL's step also does what DPOTrainer always does: its
fused LM head computes per-token entropy / mean logit / top-1 metrics next to
the log-probs, the loss metrics are gathered with `.item()`, and gradients are
clipped to norm 1.0 (Trainer's default); jalign's step computes its metrics in
the same jitted step and does not clip.

Nothing touches the network. TRL 1.16 tokenizes text itself, so the data is
text over an in-memory word-level tokenizer whose words are "t0".."t4093" (one
token each) plus "<unk>" and "<eos>": a prompt is 64 words, a response 63 words
and the EOS, so every sequence is exactly prompt + response tokens (checked).

Step time is taken by a TrainerCallback between `on_step_begin` and
`on_step_end` (forward, backward, clipping, optimizer and scheduler step; the
batch is fetched and collated before `on_step_begin`), median over `--steps`
steps after `--warmup` steps. The time between consecutive `on_step_end` calls
(which includes data loading) is reported too. Tokens are counted as in
dpo_step.py: tokens_per_s = 2 * pairs * (prompt + response) / step time,
response_tokens_per_s = 2 * pairs * response / step time. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from _machine import cpu_snapshot, others_busy  # benchmarks/ is on sys.path when run as a script


def make_tokenizer(vocab_size: int):
    """A word-level fast tokenizer built in memory: words t0..t{V-3}, then <unk>, <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 2)}
    vocab["<unk>"] = vocab_size - 2
    vocab["<eos>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<eos>")


def make_dataset(num_examples: int, prompt: int, response: int, word_vocab: int, seed: int = 0):
    from datasets import Dataset

    rng = np.random.default_rng(seed)

    def words(n):
        return " ".join(f"t{i}" for i in rng.integers(0, word_vocab, n))

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(num_examples):
        rows["prompt"].append(words(prompt))
        # Leading space: the prompt and completion are concatenated as text.
        rows["chosen"].append(" " + words(response - 1) + " <eos>")
        rows["rejected"].append(" " + words(response - 1) + " <eos>")
    return Dataset.from_dict(rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--precompute-ref", action="store_true",
                        help="TRL's precompute_ref_log_probs: reference log-probs computed once "
                             "before training (compare with dpo_step.py --reference=precomputed)")
    args = parser.parse_args()

    load_start = os.getloadavg()[0]  # the machine may be shared: note its load
    import torch
    import transformers
    import trl
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = 4096
    model_cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4, intermediate_size=688,
                            tie_word_embeddings=True, max_position_embeddings=2048)
    model = LlamaForCausalLM(model_cfg).to(torch.float32)
    ref_model = copy.deepcopy(model)
    tokenizer = make_tokenizer(vocab)
    t = args.prompt + args.response
    total_steps = args.warmup + args.steps
    dataset = make_dataset(total_steps * args.pairs, args.prompt, args.response, vocab - 2)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin = None
            self.compute, self.wall, self.last_end = [], [], None

        def on_step_begin(self, train_args, state, control, **kwargs):
            self.begin = time.perf_counter()
            if state.global_step == args.warmup:  # the first measured step
                self.cpu0, self.t0 = cpu_snapshot(), self.begin

        def on_step_end(self, train_args, state, control, **kwargs):
            now = time.perf_counter()
            self.compute.append(now - self.begin)
            if self.last_end is not None:
                self.wall.append(now - self.last_end)
            self.last_end = now
            self.cpu1, self.t1 = cpu_snapshot(), now

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        config = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=args.pairs,
            gradient_accumulation_steps=1, max_steps=total_steps, max_length=t,
            beta=args.beta, loss_type=["sigmoid"], bf16=False, fp16=False,
            gradient_checkpointing=False, use_cpu=True, report_to="none",
            logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, seed=0, precompute_ref_log_probs=args.precompute_ref)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[timer])
        if not args.precompute_ref:
            assert trainer.ref_model is not None, "the reference forward must run every step"
        # Check the shape of what TRL feeds the model: [2 * pairs, prompt + response].
        sample = trainer.data_collator([trainer.train_dataset[i] for i in range(args.pairs)])
        assert tuple(sample["input_ids"].shape) == (2 * args.pairs, t), sample["input_ids"].shape
        assert sample["completion_mask"].sum(dim=1).tolist() == [args.response] * (2 * args.pairs)
        assert next(trainer.model.parameters()).dtype == torch.float32
        t0 = time.perf_counter()
        train_out = trainer.train()
        train_s = time.perf_counter() - t0
        checkpointing = any(getattr(m, "gradient_checkpointing", False)
                            for m in trainer.model.modules())
        assert not checkpointing, "gradient checkpointing must stay off"

    others = others_busy(timer.cpu0, timer.cpu1, timer.t1 - timer.t0)
    measured = timer.compute[args.warmup:]
    wall = timer.wall[max(args.warmup - 1, 0):]  # wall[i] ends at step i + 1 (0-based)
    assert len(measured) == args.steps, (len(timer.compute), total_steps)
    step_time = statistics.median(measured)
    rows = 2 * args.pairs
    result = {
        "benchmark": "dpo_step_trl_peer", "implementation": "trl.DPOTrainer",
        "pairs": args.pairs, "sequences": rows, "seq_len": t, "prompt_len": args.prompt,
        "response_len": args.response, "dtype": "float32", "loss": "sigmoid", "beta": args.beta,
        "reference_forward": not args.precompute_ref, "gradient_checkpointing": False,
        "attn_implementation": trainer.model.config._attn_implementation,
        "optimizer": str(getattr(config.optim, "value", config.optim)),
        "step_time_s": step_time, "step_time_min_s": min(measured), "step_times_s": measured,
        "tokens_per_s": rows * t / step_time,
        "response_tokens_per_s": rows * args.response / step_time,
        "wall_step_time_s": statistics.median(wall) if wall else None,
        "wall_tokens_per_s": rows * t / statistics.median(wall) if wall else None,
        "train_runtime_s": train_s, "train_loss": float(train_out.training_loss),
        "other_processes_cores_busy": others,
        "loadavg_1m_start": load_start, "loadavg_1m_end": os.getloadavg()[0],
        "torch": torch.__version__, "trl": trl.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    print(f"TRL DPOTrainer: {args.pairs} pairs x {t} tokens "
          f"({args.prompt} prompt + {args.response} response): "
          f"median {step_time * 1e3:.1f} ms/step = {result['tokens_per_s']:,.0f} tokens/s "
          f"(chosen+rejected, all tokens), "
          f"{result['response_tokens_per_s']:,.0f} response tokens/s; "
          f"step-to-step wall {result['wall_step_time_s'] * 1e3:.1f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
