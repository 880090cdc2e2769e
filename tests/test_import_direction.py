"""Imports point one way: config <- layers <- model <- {checkpoint, parallel, infer, eval}
<- {train, serve} <- demo <- cli, and `ops` knows nothing above it. Checked twice: by
importing the model in a fresh interpreter (what a user of the model alone loads), and by
reading every module's imports (ast), so a new arrow the wrong way fails here, naming the
file."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import hybridlm

SRC = Path(hybridlm.__file__).parent

# A part of the package (its first name under hybridlm) may import, at module level, parts of
# a lower level only (or itself). Parts not listed are only checked for cycles.
LEVELS = {
    "errors": 0, "config_check": 0, "outputs": 0, "ops": 0, "registry": 0,
    "_hf_registration": 0,  # imports hybridlm.hf by name, once transformers is imported
    "config_legacy": 0.5,  # the old field names: reads config_check, read by config
    "config": 1, "data": 1,
    "layers": 2, "chat": 2,
    "model": 3,
    "checkpoint": 4, "parallel": 4, "infer": 4, "eval": 4,
    "train": 5, "serve": 5,  # the server: the engine over HTTP
    "hf": 5,  # HF transformers' view of the model: checkpoint + chat + tokenizer
    "demo": 6, "convert": 6,  # HF checkpoints <-> model directories (transformers, lazily)
    "cli": 7,
}
ABOVE_THE_MODEL = ("train", "infer", "serve", "parallel", "cli", "eval", "demo", "checkpoint",
                   "data", "chat", "convert")
# no torch.distributed here:
MODEL_CORE = ("config", "config_check", "config_legacy", "registry", "layers", "ops", "model")


def module_name(path: Path) -> str:
    parts = ["hybridlm", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """hybridlm.layers.moe -> 'layers'; the package itself -> ''."""
    return module.split(".")[1] if module.count(".") else ""


def is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


class Imports(ast.NodeVisitor):
    """The hybridlm modules a file imports: `eager` run at import time, `lazy` inside a
    function body; `if TYPE_CHECKING:` blocks never run and are skipped. Also whether the
    file names torch.distributed anywhere."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package = module, is_package
        self.eager: set[str] = set()
        self.lazy: set[str] = set()
        self.uses_torch_distributed = False
        self._depth = 0

    def _add(self, target: str) -> None:
        if target == "hybridlm" or target.startswith("hybridlm."):
            (self.lazy if self._depth else self.eager).add(target)

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)
            self.uses_torch_distributed |= alias.name.startswith("torch.distributed")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from .corpus import x, inside hybridlm.data
            package = self.module if self.is_package else self.module.rsplit(".", 1)[0]
            package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            base = f"{package}.{base}" if base else package
        self.uses_torch_distributed |= base.startswith("torch.distributed")
        for alias in node.names:  # `from hybridlm import ops` imports the module hybridlm.ops
            sub = f"{base}.{alias.name}"
            self._add(sub if is_module(sub) else base)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if ast.unparse(node).startswith("torch.distributed"):
            self.uses_torch_distributed = True
        self.generic_visit(node)


def read_imports() -> dict[str, Imports]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        module = module_name(path)
        visitor = Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), str(path)))
        found[module] = visitor
    return found


IMPORTS = read_imports()


def test_the_import_reader_sees_what_the_package_imports():
    """The reader itself: known arrows of today's code, eager, lazy and relative."""
    assert "hybridlm.layers.block" in IMPORTS["hybridlm.model"].eager
    assert "hybridlm.checkpoint" in IMPORTS["hybridlm.model"].lazy
    assert "hybridlm.model" in IMPORTS["hybridlm.checkpoint"].eager
    assert "hybridlm.data.stream" in IMPORTS["hybridlm.data.loader"].eager  # from .stream
    assert "hybridlm.ops" in IMPORTS["hybridlm.layers.experts"].eager  # from hybridlm import ops
    assert IMPORTS["hybridlm.parallel.data_parallel"].uses_torch_distributed


def test_every_part_imports_only_parts_below_it():
    wrong = []
    for module, imports in IMPORTS.items():
        mine = part_of(module)
        for target in sorted(imports.eager):
            theirs = part_of(target)
            if theirs in ("", mine) or mine not in LEVELS or theirs not in LEVELS:
                continue
            if LEVELS[theirs] >= LEVELS[mine]:
                wrong.append(f"{module} imports {target} ({mine} is level {LEVELS[mine]}, "
                             f"{theirs} level {LEVELS[theirs]})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_layers_and_ops_import_nothing_above_them_not_even_lazily():
    above = {"layers": (*ABOVE_THE_MODEL, "model"),
             "ops": (*ABOVE_THE_MODEL, "model", "layers", "config")}
    wrong = [
        f"{module} imports {target}"
        for module, imports in IMPORTS.items() if part_of(module) in above
        for target in sorted(imports.eager | imports.lazy)
        if part_of(target) in above[part_of(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_model_imports_no_training_serving_parallel_or_io_module_at_import_time():
    wrong = [target for target in IMPORTS["hybridlm.model"].eager
             if part_of(target) in ABOVE_THE_MODEL]
    assert not wrong


def test_the_model_code_never_calls_torch_distributed():
    """Cross-rank sums reach the model through balance_step(reduce=...) from parallel/."""
    users = [module for module, imports in IMPORTS.items()
             if part_of(module) in MODEL_CORE and imports.uses_torch_distributed]
    assert not users


def test_no_cycle_between_parts_at_import_time():
    graph: dict[str, set[str]] = {}
    for module, imports in IMPORTS.items():
        mine = part_of(module)
        if mine:
            graph.setdefault(mine, set()).update(
                part_of(t) for t in imports.eager if part_of(t) not in ("", mine))
    cycle = find_cycle(graph)
    assert cycle is None, "parts that import each other: " + " -> ".join(cycle or [])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once fully explored

    def walk(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":  # on the current path: back to it closes a cycle
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := walk(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start, [start])):
            return found
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


FRESH_IMPORT = """
import importlib, json, pkgutil, sys
import hybridlm.config, hybridlm.layers, hybridlm.model
for info in pkgutil.walk_packages(hybridlm.layers.__path__, "hybridlm.layers."):
    importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("hybridlm"))))
"""


def test_importing_the_model_in_a_fresh_interpreter_loads_nothing_above_it():
    done = subprocess.run([sys.executable, "-c", FRESH_IMPORT], capture_output=True, text=True,
                          timeout=120, cwd=SRC.parent, check=True)
    loaded = json.loads(done.stdout)
    assert "hybridlm.model" in loaded and "hybridlm.layers.block" in loaded
    above = [m for m in loaded if part_of(m) in ABOVE_THE_MODEL]
    assert not above, f"importing the model loaded {above}"


@pytest.mark.parametrize("old_path", [
    "from hybridlm import HybridLM, ModelConfig",
    "from hybridlm.checkpoint import load_model, save_model, load_config, CheckpointError",
    "from hybridlm.train.sft_data import ChatTemplate, CHAT_TEMPLATE_FILE",
    "from hybridlm.train.trainer import evaluate",
    "from hybridlm.cli import add_train_arguments, run_reporting_errors, run_train_command",
])
def test_old_import_paths_still_work(old_path):
    exec(old_path, {})
