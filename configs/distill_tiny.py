"""Distillation on the built-in "sort" task: a bigger teacher, a smaller student, on a CPU.

    python -m jalign.train --config=configs/distill_tiny.py --workdir=/tmp/jalign_distill
    python -m jalign.train --config=configs/distill_tiny.py --workdir=/tmp/jd3 --seeds=3

One pipeline, four stages in WORKDIR/<stage>:
  teacher     the quickstart's model (hidden 128, 2 layers, 4 heads, 0.4M parameters)
              trained by SFT on clean demonstrations (demo_quality 1): the teacher knows
              something the student's data does not, as a big model trained on more and
              better data does;
  sft         the student (hidden 64, 2 layers, 2 heads, ~0.1M parameters) trained by SFT
              alone on the quickstart's demonstrations (half of them imperfect), 300 steps;
  sft_longer  the control: `sft` trained 300 more SFT steps on the same data at lr 1e-3;
  distill     `sft` trained the same 300 steps by GKD (algo=distill) from the teacher
              instead, as the GKD paper starts from an SFT student: beta 0.5,
              temperature 0.9, half the steps on the student's own samples (TRL
              GKDConfig's defaults), the other half on the same imperfect data.
The table gives each stage's held-out gold reward; the part of the teacher-minus-student
gap that distillation closes is (distill - sft) / (teacher - sft), and against the
equal-steps control (distill - sft_longer) / (teacher - sft_longer). A teacher trained on
the student's own data (`--config.pipeline.teacher.data.demo_quality=0.5`) only ties the
control: its distributions carry nothing the demonstrations do not (benchmarks/RESULTS.md).

Variants (`--config=configs/distill_tiny.py:VARIANT[,VARIANT]`):
  onpolicy  lmbda = 1, beta = 1: on-policy reverse-KL distillation;
  test      seconds-long sizes (for tests), the teacher and distill stages only (the
            student from fresh weights).
Any key can be overridden, e.g. `--config.pipeline.distill.distill.beta=0`.
"""

import pathlib
import runpy

import ml_collections

_quickstart = runpy.run_path(str(pathlib.Path(__file__).with_name("quickstart.py")))


TEACHER_MODEL = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=344)  # the quickstart's ("tiny")
STUDENT_MODEL = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                     intermediate_size=172)


def get_config(arg: str = ""):
    config = _quickstart["sort_task_config"]()
    for key, value in STUDENT_MODEL.items():
        config.model[key] = value
    config.distill.teacher = "stage:teacher"
    config.distill.max_new_tokens = 16
    config.pipeline.stages = "teacher=sft,sft,sft_longer=sft,distill"
    config.eval.num_prompts = 512
    config.pipeline.teacher = ml_collections.ConfigDict({"model": dict(TEACHER_MODEL),
                                                         "data": {"demo_quality": 1.0}})
    config.pipeline.sft = ml_collections.ConfigDict()
    # Both continue from the student's SFT model for the same steps and rate: the one with
    # the demonstrations' one-hot targets, the other with the teacher's distributions.
    more = {"init_from": "stage:sft", "train": {"num_steps": 300, "eval_every": 150},
            "optimizer": {"learning_rate": 1e-3, "warmup_steps": 10}}
    config.pipeline.sft_longer = ml_collections.ConfigDict(more)
    config.pipeline.distill = ml_collections.ConfigDict(more)
    variants = {v for v in arg.split(",") if v}
    unknown = variants - {"onpolicy", "test"}
    if unknown:
        raise ValueError(f"configs/distill_tiny.py: unknown variant(s) {sorted(unknown)}; "
                         "valid: 'onpolicy', 'test'")
    if "onpolicy" in variants:
        config.distill.lmbda = 1.0
        config.distill.beta = 1.0
    if "test" in variants:
        config.pipeline.stages = "teacher=sft,distill"
        del config.pipeline["sft_longer"]
        config.pipeline.distill.init_from = ""  # no student SFT stage here
        config.pipeline.distill.train.num_steps = 3
        config.pipeline.distill.train.eval_every = 3
        config.data.num_train_examples = 64
        config.data.batch_size = 8
        config.train.num_steps = 3
        config.train.log_every = 1
        config.train.eval_every = 3
        config.train.eval_at_start = False
        config.train.checkpoint_every = 3
        config.train.memory_report = False
        config.eval.num_prompts = 8
        config.eval.batch_size = 8
        config.eval.max_new_tokens = 6
        config.distill.max_new_tokens = 6
        config.distill.lmbda = 0.5
    return config
