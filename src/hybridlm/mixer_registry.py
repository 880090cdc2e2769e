"""The mixer registry: the one table from a `mixer_pattern` letter to the mixer class it builds.

    register_mixer("A", Attention, "GQA attention")   # hybridlm/layers/mixers.py, built-ins
    register_mixer("X", MyMixer, "my mixer")          # anywhere, before the config is made

Config validation reads the letters from this table and `Block` builds from it, so a new
mixer is one file (the class, following `hybridlm.layers.mixers.Mixer`) and one entry here.
The table lives outside `layers` and imports nothing of hybridlm, so `config` can check a
pattern without importing any layer; the built-in entries are made when `hybridlm.layers`
is imported, which `import hybridlm` (and so any `hybridlm.*` import) does first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MixerEntry:
    letter: str
    builder: Any  # a class following hybridlm.layers.mixers.Mixer: builder(config, layer_idx)
    description: str  # what the letter means, shown when a pattern is refused


_MIXERS: dict[str, MixerEntry] = {}


def register_mixer(letter: str, builder: Any, description: str) -> Any:
    """Map `letter` to `builder` (a Mixer class); returns builder. A letter is one character
    and is registered once: a second registration raises instead of silently replacing."""
    if not isinstance(letter, str) or len(letter) != 1 or not letter.isprintable():
        raise ValueError(f"mixer letter {letter!r} must be one printable character")
    if letter in _MIXERS:
        taken = _MIXERS[letter].builder
        raise ValueError(
            f"mixer letter {letter!r} is already registered to {getattr(taken, '__name__', taken)}"
        )
    missing = [name for name in ("reads_mu", "new_cache", "forward") if not hasattr(builder, name)]
    if missing:
        raise ValueError(f"mixer {builder!r} for letter {letter!r} lacks {missing} (see Mixer)")
    _MIXERS[letter] = MixerEntry(letter, builder, description)
    return builder


def unregister_mixer(letter: str) -> None:
    """Forget `letter` (tests and notebooks that register a mixer of their own)."""
    _MIXERS.pop(letter, None)


def mixer_letters() -> dict[str, str]:
    """Every registered letter -> its description, in registration order."""
    return {letter: entry.description for letter, entry in _MIXERS.items()}


def mixer_entry(letter: str) -> MixerEntry:
    if letter not in _MIXERS:
        raise KeyError(f"no mixer registered for letter {letter!r}; known: {mixer_letters()}")
    return _MIXERS[letter]
