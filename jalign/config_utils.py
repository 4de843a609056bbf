"""The base config every configs/NAME.py starts from, and its validation.

`base_config()` returns a locked ml_collections.ConfigDict holding every key jalign
reads, with defaults. Config files and --config.key=value flags can only change
existing keys, so a typo fails at once, naming the key. A pipeline stage's overrides
(`--config.pipeline.STAGE.KEY=VALUE`) may set any key of the whole config
(`split_stage_overrides`, `apply_stage_overrides`).
"""

from __future__ import annotations

import ast
import copy
import difflib
from collections.abc import Sequence

import ml_collections

from jalign.models.attention import context_parallel_error
from jalign.models.config import PRESETS, ModelConfig
from jalign.models import pretrained
from jalign.models.pretrained import architecture_fields, nullable_fields


def nullable(value=None) -> ml_collections.FieldReference:
    """A config value that may be None and still be set from the command line.

    ml_collections types a field by its first value and cannot parse a flag into a
    None-valued field (nor "None" into a dict or number field); a field typed `object`
    takes any Python literal: `--config.model.rope_scaling=None`, `...=5`,
    `--config.dpo.loss_weights=[1.0,0.5]`. Values are checked where they are read.
    """
    return ml_collections.FieldReference(value, field_type=object)


def _model_section(values) -> ml_collections.ConfigDict:
    section = ml_collections.ConfigDict()
    for key, value in values.items():
        setattr(section, key, nullable(value) if key in nullable_fields() or value is None
                else value)
    return section


def model_config(preset: str = "tiny", **overrides) -> ml_collections.ConfigDict:
    """The `config.model` section of a preset (jalign.models.PRESETS), with overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid: {sorted(PRESETS)}")
    values = ModelConfig(**{**PRESETS[preset], **overrides}).to_dict()
    values["rope_scaling"] = values["rope_scaling"] or None
    return _model_section(values)


def model_from_checkpoint(**options) -> ml_collections.ConfigDict:
    """A `config.model` section whose architecture comes from `config.init_from`.

    Every architecture field (`jalign.models.config.architecture_fields`) and `dtype`
    are None: `jalign.models.pretrained.resolve_model` fills them from the checkpoint
    folder's config.json / model_config.json at start-up, and any of them given on
    the command line must agree with it. Training options (param_dtype, remat, LoRA,
    ...) keep their defaults unless given in `options`.
    """
    values = ModelConfig().to_dict()
    for key in architecture_fields() + ("dtype",):
        values[key] = None
    values.update(options)
    return _model_section(values)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.algo = ""                  # one algorithm (jalign.algorithms.ALGOS), or pipeline.stages
    c.seed = 0
    # What the run starts from: a Hugging Face model folder, a `jalign.convert import`
    # folder or an earlier run's WORKDIR/final_params ("" = fresh weights from the seed)
    c.init_from = ""
    c.model = model_config("tiny")
    # sequence > 1: context parallelism, tokens split over that many devices (jalign.sharding)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1})
    c.logical_axis_rules = nullable()  # None = jalign.sharding.DEFAULT_RULES

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=10, schedule="cosine", end_learning_rate_factor=0.1,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0, grad_accum_steps=1,
        mu_dtype=""))            # Adam first moment dtype ("" = the params' dtype, or "bfloat16")

    c.data = ml_collections.ConfigDict(dict(
        source="task",           # "task" (built-in), "jsonl" or "parquet"
        task="sort",             # built-in task name (jalign.tasks.TASKS)
        path="",                 # file or comma-separated files for jsonl/parquet
        tokenizer="",            # "" = the built-in character tokenizer, else a tokenizer.json / folder
        eval_path="",            # held-out preference file(s) for jsonl/parquet sources
        num_train_examples=4096,
        num_eval_pairs=256,      # built-in tasks: held-out pairs (clean labels) for accuracy
        label_noise=0.0,         # built-in tasks: fraction of flipped preference labels
        length_bias=0.0,         # built-in tasks: labeller's preference for longer answers
        demo_quality=1.0,        # built-in tasks: fraction of perfect demonstrations
        batch_size=32,           # global batch (sequences, or packed rows)
        # Real chat data fits, as in TRL: a row longer than max_length loses the end of its
        # completion; max_prompt_length > 0 also cuts prompts (0 = no prompt limit; RL prompts
        # must then fit max_length). The built-in tasks' configs set their own, smaller lengths.
        max_length=1024,
        max_prompt_length=0,
        truncation="keep_end",
        # padded rows: the batch's longest sequence rounded up to this multiple (one compiled
        # step per distinct width, at most max_length / multiple of them)...
        pad_to_multiple_of=64,
        # ...or, if set, the smallest of these widths that fits (max_length is appended)
        bucket_boundaries=ml_collections.FieldReference(None, field_type=list),
        packing=False,
        on_bad_row="raise",      # "raise" or "skip" (skips are counted and reported)
    ))

    c.train = ml_collections.ConfigDict(dict(
        num_steps=200, log_every=10, eval_every=0, eval_at_start=True,
        checkpoint_every=100, keep_checkpoints=3, async_checkpointing=True,
        max_consecutive_skips=5,  # non-finite steps are skipped; stop after this many in a row
        logprob_impl="auto",
        memory_report=True))     # print per-device state / step memory at start-up

    c.dpo = ml_collections.ConfigDict(dict(
        loss_type="sigmoid",     # any of jalign.losses.LOSS_TYPES, "a,b,c" to mix, or simpo/cpo/orpo/rdpo
        loss_weights=nullable(),
        beta=0.1, label_smoothing=0.0, f_divergence="reverse_kl", f_alpha=0.5,
        simpo_gamma=0.5, cpo_alpha=1.0, rdpo_alpha=0.0,
        # tokens of the NLL term (orpo, cpo, "sft" mixes): "completion" (jalign's default)
        # or "prompt_and_completion" (TRL's ORPO / CPO)
        nll_tokens="completion",
        desirable_weight=1.0, undesirable_weight=1.0,   # KTO
        reference="params",      # "params" (frozen tree) or "precomputed" (stored next to the data)
        ref_sync_every=0, ref_sync_mixup=0.6,           # TR-DPO
    ))
    c.reward = ml_collections.ConfigDict(dict(center_rewards_coefficient=0.01))
    c.rl = ml_collections.ConfigDict(dict(
        group_size=8,             # completions per prompt (GRPO group / RLOO k / online-DPO pool)
        # sampling temperature; the update's log-probs (policy, old, reference) use it too
        max_new_tokens=16, temperature=1.0,
        # comma list of "gold" (a task's), "model" (config.rl.reward_model), a jalign.rewards
        # built-in ("math_answer", "think_answer_format", "soft_overlong:max=64,cache=16",
        # "length_penalty:target=32,coef=0.01") or "python:module.function"
        reward_sources="gold",
        reward_weights=nullable(),
        reward_model="",          # a reward stage's WORKDIR/final_params for source "model"
        # ... or a comma list of them, an ensemble combined as "mean", "uncertainty"
        # (mean - reward_ensemble_lambda * std over the members) or "min"
        reward_ensemble="mean", reward_ensemble_lambda=1.0,
        scale_rewards="group",    # GRPO: "group", "batch" or "none" (Dr. GRPO)
        loss_aggregation="grpo",  # "grpo", "bnpo", "dr_grpo", "dapo"
        clip_eps_low=0.2, clip_eps_high=0.2,   # DAPO clip-higher: clip_eps_high=0.28
        kl_beta=0.0, kl_estimator="k3",
        use_bias_correction_kl=True,     # GRPO: k3 KL x importance ratio (TRL 1.16's default)
        importance_sampling_level="token",  # GRPO: "token" or "sequence" (GSPO)
        dual_clip=0.0,            # > 1: bound negative-advantage losses by -dual_clip * A (0 = off)
        num_iterations=1,         # epochs over each rollout batch (PPO epochs)
        num_minibatches=1,        # shuffled minibatches per epoch, one optimizer step each
        # PPO with a critic
        gamma=1.0, lam=0.95, vf_coef=0.1, value_clip=0.2, entropy_coef=0.0,
        kl_coef=0.05, kl_target=0.0, kl_horizon=10000.0,   # kl_target > 0: adaptive controller
        critic_init="",           # a reward model's final_params to start the critic from
        # DAPO dynamic sampling: drop groups whose rewards all tie, sample more prompts
        dynamic_sampling=False, dynamic_sampling_max_rounds=4,
        # Multi-turn episodes (jalign.environments, jalign.algorithms.episodes): "" (a built-in
        # task's own environment, else single-turn), "none" (single-turn), "tools" (calls to
        # rl.tools), "guess" or "python:module.Class"; per-turn sampling budget is
        # max_new_tokens; an episode ends after max_turns policy turns, or when its context
        # (max_episode_tokens after the prompt, 0 = max_turns x (max_new_tokens +
        # max_observation_tokens)) is full; an observation longer than
        # max_observation_tokens ends its episode (counted in env/truncated).
        environment="", max_turns=4, max_episode_tokens=0, max_observation_tokens=32,
        # comma list of jalign.tools built-ins ("calculator") or "python:module.function";
        # the call format "hermes" (<tool_call>{json}</tool_call>) or "llama3" (bare JSON);
        # a call running longer than tool_timeout seconds becomes an error observation
        tools="", tool_call_format="hermes", tool_timeout=5.0,
    ))

    # Distillation (algo=distill, GKD): the teacher (a Hugging Face folder, a jalign
    # WORKDIR or WORKDIR/final_params; in a pipeline "stage:NAME" is that stage's WORKDIR),
    # TRL GKDConfig's beta / temperature / lmbda, the on-policy samples' length and the
    # divergence op's implementation (jalign.ops.token_divergence).
    c.distill = ml_collections.ConfigDict(dict(
        teacher="", beta=0.5, temperature=0.9, lmbda=0.5, max_new_tokens=128,
        divergence_impl="auto"))

    # A language-model judge (jalign.judges): the model (a Hugging Face folder, a jalign
    # WORKDIR or its final_params; "stage:NAME" in a pipeline), "pairwise" or "pointwise",
    # a template ("" = the built-in one for the kind, else its text or a file), the
    # constitution file (one principle a line), the answer labels ("" = "A,B" / "Yes,No";
    # each one token), the pairwise tie margin; rl.reward_sources=judge scores pointwise.
    c.judge = ml_collections.ConfigDict(dict(
        path="", kind="pairwise", template="", constitution="", labels="", margin=0.05,
        chat=True, max_length=1024, batch_size=32, dtype="float32"))
    # The label stage (jalign.label): n completions per prompt sampled from the policy, the
    # pairs judged by config.judge (pairwise; labeller="gold": by the task's gold reward, the
    # control), written to WORKDIR/pairs.jsonl.
    c.label = ml_collections.ConfigDict(dict(
        num_prompts=256, num_samples=2, max_new_tokens=24, temperature=1.0, batch_size=64,
        labeller="judge"))

    # The revise stage (jalign.revise, Constitutional AI's supervised step): one completion
    # per prompt from the policy, a critique and a revision of it by config.judge's model
    # under a principle of its constitution, written to WORKDIR/revisions.jsonl for SFT.
    c.revise = ml_collections.ConfigDict(dict(
        num_prompts=256, max_new_tokens=24, temperature=1.0, critique_tokens=48,
        revision_tokens=24, critic_temperature=0.7, batch_size=32, first_line=True,
        critique_template="", revision_template=""))

    c.eval = ml_collections.ConfigDict(dict(
        num_prompts=128, max_new_tokens=24, temperature=1.0, batch_size=64, kl_to_start=True,
        # a built-in task whose held-out prompts and gold reward evaluate a run on file data
        # (e.g. DPO on pairs a judge labelled on that task's prompts)
        task="",
        # also the win rate of the sampled completions against the starting model's, raw and
        # length-controlled (jalign.winrate), by the first score (the gold reward) or by the
        # scores win_rate_by names (a comma list, e.g. "gold_reward,rewards/model" in RL:
        # winrate/... by the first, winrate/NAME/... by each further one; "judge": the
        # pairwise judge of config.judge compares the two completions directly)
        win_rate=False, win_rate_by=""))
    # Multi-stage runs (jalign.pipeline): stages="sft,reward,dpo" and per-stage
    # overrides in the config's own shape, e.g. pipeline.dpo.train.num_steps.
    c.pipeline = ml_collections.ConfigDict({"stages": ""})
    # Multi-process start-up (jalign.distributed): unset values fall back to the
    # JALIGN_COORDINATOR / JALIGN_NUM_PROCESSES / JALIGN_PROCESS_ID environment.
    c.distributed = ml_collections.ConfigDict(dict(
        mode="auto",             # "auto", "explicit", "cluster" (TPU VM / GKE / Slurm) or "off"
        coordinator_address="",  # host:port of process 0
        num_processes=0,         # 0 = unset
        process_id=-1,           # -1 = unset
        cpu_collectives="gloo",  # CPU backend collectives across processes ("gloo" or "mpi")
        initialization_timeout=300,
    ))
    c.lock()
    c.pipeline.unlock()
    return c


def _check_choice(config, path: str, choices) -> None:
    value = config
    for part in path.split("."):
        value = value[part]
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"config.{path} = {value!r} is not valid{extra}; valid: {list(choices)}")


def validate_config(config: ml_collections.ConfigDict, *, algorithms: Sequence[str] = ()) -> None:
    """Checks keys against base_config() and values against their allowed choices.

    `algorithms`: the valid names of `config.algo` and of `config.pipeline.stages`
    (the caller's registry, e.g. jalign.algorithms.ALGOS); not checked when empty.
    """
    reference = base_config()

    def walk(cfg, ref, prefix):
        for key in cfg.keys():
            if key not in ref:
                hint = difflib.get_close_matches(key, list(ref.keys()), n=1)
                extra = f" (did you mean {prefix}{hint[0]!r}?)" if hint else ""
                raise ValueError(f"unknown config key {prefix}{key!r}{extra}")
            if isinstance(ref[key], ml_collections.ConfigDict) and key not in ("model", "pipeline"):
                walk(cfg[key], ref[key], f"{prefix}{key}.")

    walk(config, reference, "")
    if config.pipeline.stages and config.algo:
        raise ValueError(f"config.algo={config.algo!r} and config.pipeline.stages="
                         f"{config.pipeline.stages!r} are both set: a run is one algorithm or "
                         "a pipeline of stages; drop --config.algo (a stage's settings go in "
                         "config.pipeline.<stage>), or run one stage with "
                         f"--config.pipeline.stages= --config.algo={config.algo}")
    if algorithms and config.pipeline.stages:
        for stage in config.pipeline.stages.split(","):
            algo = stage.partition("=")[2] or stage  # "ALGO" or a named stage "NAME=ALGO"
            if algo.strip() not in algorithms:
                raise ValueError(f"config.pipeline.stages: {algo.strip()!r} is not an algorithm; "
                                 f"valid: {list(algorithms)}")
    elif algorithms and not config.algo:
        raise ValueError(f"config.algo is not set: give --config.algo=ALGO (one of "
                         f"{list(algorithms)}) or --config.pipeline.stages=A,B,...")
    elif algorithms:
        _check_choice(config, "algo", algorithms)
    _check_choice(config, "dpo.reference", ("params", "precomputed"))
    _check_choice(config, "dpo.nll_tokens", ("completion", "prompt_and_completion"))
    _check_choice(config, "data.source", ("task", "jsonl", "parquet"))
    _check_choice(config, "data.truncation", ("keep_end", "keep_start"))
    _check_choice(config, "data.on_bad_row", ("raise", "skip"))
    if all(v is not None for k, v in config.model.items() if k in architecture_fields(required=True)):
        ModelConfig.from_mapping(config.model)  # else it is completed from init_from at start-up
    for key in ("num_steps", "log_every", "checkpoint_every"):
        if int(config.train[key]) <= 0:
            raise ValueError(f"config.train.{key} must be positive, got {config.train[key]!r}")
    if int(config.mesh.get("sequence", 1)) != 1:
        error = context_parallel_error(config.model.attention_impl)
        if error:
            raise ValueError(error)
    accum = int(config.optimizer.grad_accum_steps)
    if accum <= 0 or config.data.batch_size % accum:
        raise ValueError(f"config.data.batch_size ({config.data.batch_size}) must be a multiple of "
                         f"config.optimizer.grad_accum_steps ({accum})")


def resolve_start(config: ml_collections.ConfigDict):
    """(config, source): a copy of `config` completed from `config.init_from`.

    The model section as `jalign.models.pretrained.resolve_model` completes and checks
    it, and `data.tokenizer`, when unset, the starting folder's tokenizer.
    `source` is the `pretrained.Pretrained` found (None without init_from).
    """
    source = pretrained.find(config.init_from) if config.init_from else None
    model = pretrained.resolve_model(config.model, source)
    out = copy.deepcopy(config)
    with out.unlocked():
        for key, value in model.items():
            out.model[key] = value
        if not out.data.tokenizer and source is not None and source.tokenizer:
            out.data.tokenizer = source.tokenizer
    ModelConfig.from_mapping(out.model)
    return out, source


_STAGE_FLAG = "--config.pipeline."
StageOverride = tuple[str, list[str], str, str]  # (STAGE, [KEY, ...], VALUE, the flag)


def split_stage_overrides(argv: list[str]) -> tuple[list[str], list[StageOverride]]:
    """Splits `--config.pipeline.STAGE.KEY...=VALUE` flags off argv: a stage's overrides
    hold only the keys its config file sets, so ml_collections' own flag parser cannot set
    another (it fails with a bare KeyError). Returns (the other args, [(STAGE, [KEY, ...],
    VALUE, the flag)])."""
    rest, overrides = [], []
    for arg in argv:
        name, eq, value = arg.partition("=")
        parts = name[len(_STAGE_FLAG):].split(".") if name.startswith(_STAGE_FLAG) else []
        if eq and len(parts) >= 2 and all(parts):
            overrides.append((parts[0], parts[1:], value, arg))
        else:
            rest.append(arg)
    return rest, overrides


def _typed(raw: str, like, flag: str):
    """`raw` parsed as the type of `like` (the whole config's value at the same key)."""
    if isinstance(like, str):
        return raw
    if isinstance(like, bool):
        if raw.lower() in ("true", "1"):
            return True
        if raw.lower() in ("false", "0"):
            return False
        raise ValueError(f"{flag}: expected true or false, got {raw!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(like, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if like is not None and not isinstance(value, type(like)):
        raise ValueError(f"{flag}: expected a {type(like).__name__} (as the config's value "
                         f"{like!r}), got {raw!r}")
    return value


def apply_stage_overrides(config: ml_collections.ConfigDict, overrides) -> None:
    """Sets each `--config.pipeline.STAGE.KEY...=VALUE` in `config.pipeline.STAGE`, creating
    the stage's dict and its sections where the config file did not; the value takes the
    type of the same key in the whole config (`config.KEY...`), which must exist."""
    for stage, keys, raw, flag in overrides:
        like = config
        for i, key in enumerate(keys):
            if not isinstance(like, ml_collections.ConfigDict) or key not in like:
                raise ValueError(f"{flag}: the config has no key config.{'.'.join(keys[:i + 1])}, "
                                 f"so a pipeline stage cannot override it")
            like = like[key]
        if isinstance(like, ml_collections.ConfigDict):
            raise ValueError(f"{flag}: config.{'.'.join(keys)} is a section; set one of its keys")
        with config.unlocked():
            node = config.pipeline
            for key in [stage, *keys[:-1]]:
                if key not in node:
                    node[key] = ml_collections.ConfigDict()
                node = node[key]
            existing = node.get(keys[-1], like)
            node[keys[-1]] = _typed(raw, existing if existing is not None else like, flag)
