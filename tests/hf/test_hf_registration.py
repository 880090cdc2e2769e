"""How hybridlm meets HF transformers: only hybridlm.hf imports it; `import hybridlm` never
does (with transformers installed or not) and costs nothing for it; once both are imported,
in either order, AutoConfig knows model_type "hybridlm". These tests run without transformers
too (the ones that need it skip)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hybridlm

SRC = Path(hybridlm.__file__).parent
HAVE_TRANSFORMERS = subprocess.run([sys.executable, "-c", "import transformers"],
                                   capture_output=True).returncode == 0
needs_transformers = pytest.mark.skipif(
    not HAVE_TRANSFORMERS, reason="the optional `hf` extra (transformers) is not installed")

# Makes `transformers` unimportable, as where the extra is not installed.
HIDE_TRANSFORMERS = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Hide())
"""


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": f"{SRC.parent}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _imports_transformers(node: ast.AST) -> bool:
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
        [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
    return any(n == "transformers" or n.startswith("transformers.") for n in names)


def test_only_hybridlm_hf_imports_transformers_and_convert_only_when_called():
    """hybridlm.hf imports it; `hybridlm convert` (HF checkpoints) inside its functions only;
    nothing else at all."""
    importers = []
    for path in sorted(SRC.rglob("*.py")):
        if SRC / "hf" in path.parents:
            continue
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if SRC / "convert" in path.parents else ast.walk(tree)
        if any(_imports_transformers(node) for node in nodes):
            importers.append(str(path.relative_to(SRC)))
    assert not importers


def test_import_hybridlm_does_not_import_transformers():
    assert python("import sys, hybridlm; print(sorted(m for m in sys.modules "
                  "if m.split('.')[0] == 'transformers' or m == 'hybridlm.hf'))") == "[]"


def test_import_hybridlm_without_transformers_installed():
    out = python(HIDE_TRANSFORMERS + """
import hybridlm
try:
    import transformers
except ModuleNotFoundError as err:
    print("absent:", err)
print(hybridlm.HybridLM.__name__, "hybridlm.hf" in sys.modules)
""")
    assert out == "absent: No module named 'transformers'\nHybridLM False"


@needs_transformers
@pytest.mark.parametrize("order", ["hybridlm first", "transformers first"])
def test_auto_config_knows_hybridlm_in_either_import_order(order, tmp_path):
    from hybridlm import HybridLM, ModelConfig

    HybridLM(ModelConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         mlp_pattern="D")).save_pretrained(tmp_path)
    imports = ("import hybridlm\nimport transformers" if order == "hybridlm first"
               else "import transformers\nimport hybridlm")
    out = python(f"{imports}\nconfig = transformers.AutoConfig.from_pretrained({str(tmp_path)!r})"
                 "\nprint(type(config).__name__, config.mixer_pattern)")
    assert out == "HybridLMConfig A"
