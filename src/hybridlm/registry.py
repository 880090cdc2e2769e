"""The registries: one table per kind of part, each from a config name to the builder of it.

    mixers   a mixer_pattern letter  -> a Mixer class, builder(config, layer_idx)
    MLPs     an mlp_pattern letter   -> builder(config, layer_idx) -> an MLP module
    routers  a moe_router name       -> builder(config, num_experts) -> a Router

    register_mixer("X", MyMixer, "my mixer")       # before the config is made
    register_mlp("H", build_hash_moe, "hash MoE")
    register_router("hash", HashRouter.build, "hash routing")

Config validation reads the names from these tables (`mixer_letters()`, `mlp_letters()`,
`router_names()`) and the layers build from them, so a new part is its own file plus one
`register_*` line. This module imports nothing of hybridlm, so `config` checks a name without
importing any layer; the built-in entries are made by `hybridlm.layers` (layers/mixers.py,
layers/mlps.py, layers/routers.py), which `import hybridlm` (and so any `hybridlm.*`
import) loads first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    name: str  # the letter or name a config uses
    builder: Any  # what builds the part (see the table's kind in the module docstring)
    description: str  # what the name means, listed when a config names an unknown one


class Registry:
    """One table: name -> Entry. A name is registered once: a second registration raises
    instead of silently replacing the first."""

    def __init__(self, kind: str, field: str, *, letters: bool,
                 required: tuple[str, ...] = ()) -> None:
        self.kind, self.field = kind, field  # "mixer", the config field that names entries
        self.letters = letters  # names are single characters (pattern letters)
        self.required = required  # attributes every builder must have
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, builder: Any, description: str) -> Any:
        """Map `name` to `builder`; returns builder (so it also works as a decorator's body)."""
        if not isinstance(name, str) or not name or not name.isprintable() or " " in name or (
                self.letters and len(name) != 1):
            what = "one printable character" if self.letters else "a name without spaces"
            raise ValueError(f"{self.kind} {'letter' if self.letters else 'name'} {name!r} "
                             f"must be {what}")
        if name in self._entries:
            taken = self._entries[name].builder
            raise ValueError(f"{self.kind} {name!r} is already registered to "
                             f"{getattr(taken, '__name__', taken)}")
        missing = [attr for attr in self.required if not hasattr(builder, attr)]
        if missing:
            raise ValueError(f"{self.kind} {builder!r} for {name!r} lacks {missing}")
        self._entries[name] = Entry(name, builder, description)
        return builder

    def unregister(self, name: str) -> None:
        """Forget `name` (tests and notebooks that register a part of their own)."""
        self._entries.pop(name, None)

    def names(self) -> dict[str, str]:
        """Every registered name -> its description, in registration order."""
        return {name: entry.description for name, entry in self._entries.items()}

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise KeyError(f"no {self.kind} registered for {self.field}={name!r}; known: "
                           f"{self.names()}")
        return self._entries[name]


MIXERS = Registry("mixer", "mixer_pattern", letters=True,
                  required=("reads_mu", "new_cache", "forward"))
MLPS = Registry("MLP", "mlp_pattern", letters=True)
ROUTERS = Registry("router", "moe_router", letters=False)

register_mixer: Callable[[str, Any, str], Any] = MIXERS.register
unregister_mixer = MIXERS.unregister
mixer_letters = MIXERS.names
mixer_entry = MIXERS.entry

register_mlp: Callable[[str, Any, str], Any] = MLPS.register
unregister_mlp = MLPS.unregister
mlp_letters = MLPS.names
mlp_entry = MLPS.entry

register_router: Callable[[str, Any, str], Any] = ROUTERS.register
unregister_router = ROUTERS.unregister
router_names = ROUTERS.names
router_entry = ROUTERS.entry
