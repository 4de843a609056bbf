"""What a run starts from (`config.init_from`): its architecture, tokenizer and weights.

`init_from` may name

* a Hugging Face model folder (config.json + *.safetensors): read directly, no
  conversion step;
* a folder written by `python -m jalign.convert import` (model_config.json, params/
  and the tokenizer files), or its params/ folder;
* an earlier run's WORKDIR/final_params: every run writes WORKDIR/model_config.json
  and, when it used a tokenizer file, that tokenizer's files beside it, so the next
  stage finds both.

`resolve_model` completes a config's model section from the folder: fields left None
(configs/sft.py, dpo.py, ... build their model section with
`jalign.config_utils.model_from_checkpoint`) take the checkpoint's values, and an
architecture field that is set must agree with it, or the run is refused naming the
key. Training options (param_dtype, remat, LoRA, ...) are the config's to choose.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Mapping

from jalign import checkpoint
from jalign.models import hf
from jalign.models.config import ModelConfig
from jalign.models.hf_config import config_from_hf

# ModelConfig fields fixed by the weights: shapes, norms, rope, the attention pattern.
# Every other field (dtypes, remat, LoRA, kernels and block sizes) is a training choice.
_ARCHITECTURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "intermediate_size", "rope_theta", "rope_scaling", "rms_norm_eps",
                 "tie_embeddings", "family", "qkv_bias", "qk_norm", "norm_unit_offset",
                 "sandwich_norms", "mlp_activation", "scale_embeddings", "query_pre_attn_scalar",
                 "attn_logit_softcap", "final_logit_softcap", "sliding_window", "layer_types",
                 "rope_local_theta")
# Architecture fields that may legitimately be None (the rest are required).
_OPTIONAL_ARCHITECTURE = ("head_dim", "rope_scaling", "query_pre_attn_scalar",
                          "attn_logit_softcap", "final_logit_softcap", "sliding_window",
                          "layer_types", "rope_local_theta")
MODEL_CONFIG_FILE = "model_config.json"


def architecture_fields(*, required: bool = False) -> tuple[str, ...]:
    """ModelConfig fields fixed by the weights. `required`: only those that cannot be
    None in a complete config."""
    return tuple(n for n in _ARCHITECTURE if n not in _OPTIONAL_ARCHITECTURE) if required \
        else _ARCHITECTURE


def nullable_fields() -> tuple[str, ...]:
    """ModelConfig fields whose type admits None."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if "None" in str(f.type))


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A starting point, as found on disk."""
    path: str                       # config.init_from as given
    kind: str                       # "hugging_face", "converted" or "params"
    weights: str                    # the HF folder, or the Orbax params folder
    model: ModelConfig | None       # its architecture, when the folder states it
    described_by: str | None        # the file `model` was read from
    tokenizer: str | None           # a folder with tokenizer.json, when there is one

    def load(self, abstract_params: Any) -> Any:
        """The weights as `abstract_params` (ShapeDtypeStructs with shardings) describes."""
        if self.kind == "hugging_face":
            return hf.load_weights(self.weights, abstract_params)
        return checkpoint.load_params(self.weights, abstract_params)


def _is_orbax(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in ("_CHECKPOINT_METADATA", "_METADATA"))


def _tokenizer_dir(*folders: str) -> str | None:
    for folder in folders:
        if os.path.exists(os.path.join(folder, "tokenizer.json")):
            return folder
    return None


def _read_model_config(path: str) -> ModelConfig:
    try:
        with open(path) as f:
            values = json.load(f)
        return ModelConfig.from_mapping(values)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"{path} is not a jalign model config ({e})") from None


def find(path: str) -> Pretrained:
    """What `config.init_from = path` names; a FileNotFoundError / ValueError saying
    what was expected when it names nothing jalign can start from."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.init_from={path!r}: no such file or directory")
    if os.path.isfile(path):
        checkpoint.load_params(path, None)  # raises the "a file, not a directory" message
    config_json = os.path.join(path, "config.json")
    if os.path.exists(config_json) and (glob.glob(os.path.join(path, "*.safetensors"))
                                        or os.path.exists(os.path.join(path, hf.INDEX_FILE))):
        with open(config_json) as f:
            try:
                values = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{config_json} is not valid JSON: {e}") from None
        model = config_from_hf(values)
        return Pretrained(path, "hugging_face", path, model, config_json, _tokenizer_dir(path))
    own = os.path.join(path, MODEL_CONFIG_FILE)
    for sub in ("params", "final_params"):  # a `convert import` folder, or a run's WORKDIR
        if os.path.exists(own) and _is_orbax(os.path.join(path, sub)):
            return Pretrained(path, "converted", os.path.join(path, sub), _read_model_config(own),
                              own, _tokenizer_dir(path))
    if _is_orbax(path):
        parent = os.path.dirname(os.path.abspath(path))
        beside = os.path.join(parent, MODEL_CONFIG_FILE)
        model = _read_model_config(beside) if os.path.exists(beside) else None
        return Pretrained(path, "params", path, model, beside if model else None,
                          _tokenizer_dir(path, parent))
    if os.path.exists(config_json):
        hf._weight_map(path)  # raises "no *.safetensors in ..." (naming pickle files if any)
    found = sorted(os.listdir(path))
    pickles = [f for f in found if f.endswith((".pkl", ".pickle", ".bin", ".pt", ".pth"))]
    hint = (f"; {pickles[0]} looks pickled, and jalign never unpickles (convert a Hugging Face "
            "model to safetensors)" if pickles else "")
    raise ValueError(
        f"config.init_from={path!r} holds no model jalign can start from (found {found[:6]}); "
        "expected a Hugging Face folder (config.json + *.safetensors), a `python -m "
        "jalign.convert import` folder (model_config.json + params/) or a run's "
        f"WORKDIR/final_params{hint}")


def _normal(value):
    if isinstance(value, Mapping):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_normal(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def resolve_model(model: Mapping[str, Any], source: Pretrained | None) -> dict[str, Any]:
    """The complete model section: None fields from `source`, set ones checked against it.

    A None `dtype` becomes the checkpoint's stored dtype (its compute dtype, as a
    `bf16=True` TRL run computes in bfloat16); a None `param_dtype` is float32 (master
    weights: Adam's small updates are lost in bfloat16 params).
    """
    values = dict(model)
    known = source.model if source is not None else None
    if known is not None:
        checkpoint_values = known.to_dict()
        for key in architecture_fields():
            ours, theirs = values.get(key), checkpoint_values[key]
            if ours is None:
                values[key] = theirs
            elif _normal(ours) != _normal(theirs):
                raise ValueError(
                    f"config.model.{key}={ours!r} disagrees with {theirs!r} in "
                    f"{source.described_by}: the architecture comes from config.init_from; drop "
                    f"--config.model.{key}, or use a config whose model section is taken from the "
                    "checkpoint (configs/sft.py, configs/reward.py, configs/dpo.py, ...)")
        if values.get("dtype") is None:
            values["dtype"] = checkpoint_values["dtype"]
    missing = [k for k in architecture_fields(required=True) + ("dtype",) if values.get(k) is None]
    if missing:
        where = ("config.init_from is empty" if source is None else
                 f"{source.path} states no architecture (no {MODEL_CONFIG_FILE} beside it)")
        raise ValueError(
            f"config.model.{missing[0]} is not set and {where}: this config takes the model "
            "from config.init_from; give --config.init_from=DIR (a Hugging Face folder, a "
            "`python -m jalign.convert import` folder or a run's WORKDIR/final_params) or set "
            f"config.model.{missing[0]} ({len(missing)} unset: {', '.join(missing)})")
    if values.get("param_dtype") is None:
        values["param_dtype"] = "float32"
    return values


def write_run_model(workdir: str, model: ModelConfig, tokenizer_path: str) -> None:
    """WORKDIR/model_config.json and the tokenizer's files, for runs starting from
    WORKDIR/final_params (`find` reads them) and for `jalign.convert export`."""
    with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
        json.dump(model.to_dict(), f, indent=2)
    if not tokenizer_path:
        return
    if os.path.isdir(tokenizer_path):
        pairs = [(os.path.join(tokenizer_path, n), n)
                 for n in hf.TOKENIZER_FILES]
    elif os.path.basename(tokenizer_path) == "tokenizer.json":
        folder = os.path.dirname(tokenizer_path)
        pairs = [(os.path.join(folder, n), n) for n in hf.TOKENIZER_FILES]
    else:  # a bare tokenizer file stands alone
        pairs = [(tokenizer_path, "tokenizer.json")]
    for src, name in pairs:
        dst = os.path.join(workdir, name)
        if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(dst):
            with open(src, "rb") as fin, open(dst, "wb") as fout:
                fout.write(fin.read())
