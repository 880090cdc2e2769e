"""Register hybridlm with HF transformers' Auto classes when both are imported, without
`import hybridlm` ever importing transformers itself.

`import transformers` costs seconds (its model base classes about 4.5 s here, against 2.7 s
for `import hybridlm` with torch), so hybridlm must not pay it for users who never touch HF.
Instead `arrange()`, called by `hybridlm/__init__.py`:
- transformers already imported: import `hybridlm.hf` now (which registers);
- otherwise: put a finder on `sys.meta_path` that, the moment `transformers` itself is
  imported, lets it load normally and then imports `hybridlm.hf`. The finder steps aside for
  every other module and removes itself after that one import, so `import hybridlm` costs a
  list insert, with or without transformers installed.
Either order (`import hybridlm; import transformers` or the reverse) therefore ends with
`AutoModelForCausalLM.from_pretrained(model_dir)` working, with no trust_remote_code. A
registration that fails (a transformers release this module does not fit) warns with the
reason and leaves transformers usable; `import hybridlm.hf` raises the error itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

TRANSFORMERS = "transformers"
HF_MODULE = "hybridlm.hf"


def arrange() -> None:
    if TRANSFORMERS in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())


def _register() -> None:
    if HF_MODULE in sys.modules:  # imported (or being imported): it registers itself
        return
    try:
        importlib.import_module(HF_MODULE)
    except Exception as err:
        warnings.warn(f"hybridlm could not register with transformers ({type(err).__name__}: "
                      f"{err}); `import hybridlm.hf` shows the full error", stacklevel=2)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for `transformers`, hands back the real spec with a loader that
    registers hybridlm once transformers has run."""

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if name != TRANSFORMERS:
            return None
        sys.meta_path.remove(self)  # one use; also keeps find_spec below from finding us
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # transformers sees its own loader, as it would without us (it reads __spec__)
        module.__loader__ = self.inner
        module.__spec__.loader = self.inner
        self.inner.exec_module(module)
        _register()
