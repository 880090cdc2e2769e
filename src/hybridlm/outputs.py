"""Where commands write, and how: one output policy for every command that writes.

Checking a target before any work
    :func:`claim_output` (a directory written in one go), :func:`claim_file_output` (a single
    file) and :func:`claim_run_dir` (a training run) refuse, with one line (:class:`OutputError`)
    that says what is there and how to proceed:

    * a path that is an existing file, or lies under one;
    * a target that is one of the command's inputs, lies inside one, or holds one;
    * a directory that already holds something (:func:`identify` names it: a run, a model,
      prepared data, a tokenizer, a demo, plots, or other files). Output of the kind the command
      makes is replaced only with ``--overwrite``, and only if it holds nothing the command does
      not write; anything else is never replaced. Training runs write as they go (checkpoints,
      metrics), so they start in a new or empty directory or continue with ``--resume``.

Writing
    :func:`staged_dir` builds a directory in a fresh temporary directory beside its target
    (inside it, when the target is an existing empty directory) and moves it into place only
    once the work has finished; :func:`staged_file` does the same for one file. A failure,
    Ctrl-C or SIGKILL leaves the target as it was. Replacing a directory moves the old one
    aside, the new one in, and only then deletes the old one: nothing is deleted before the new
    content exists. Temporary names say what they are (``.NAME.partial-PID-XXXX``,
    ``.NAME.old-PID-XXXX``); the next write to the same target removes those of processes that
    are gone, and puts an old directory back if its process died between the two moves.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# What each command writes. The marker file names are those of the writers (hybridlm.checkpoint,
# data.shards, data.tokenizer, train.trainer); they are spelled out here so that this module
# imports nothing heavy (tests check that they match).
RUN = "a training run"
MODEL = "a model"
PREPARED = "prepared data"
TOKENIZER = "a tokenizer"
DEMO = "a demo"
PLOTS = "plots"
OTHER = "other files"
FILE = "a file"

_RUN_FILES = {"train_config.json", "metrics.jsonl", "config.json", "model.safetensors",
              "tokenizer.json", "tokenizer_config.json", "chat_template.json"}
_RUN_DIRS = {"checkpoints", "tensorboard", "plots"}
# A model directory, hybridlm's or HF transformers' (hybridlm convert writes both).
_MODEL_FILES = {"config.json", "model.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.json", "chat_template.jinja", "generation_config.json"}
_MODEL_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")
_PREPARED_FILES = {"meta.json", "token_counts.npy", "tokenizer.json", "tokenizer_config.json",
                   ".tokens.tmp"}
_SPLIT_FILE = re.compile(r"^(shard_\d+\.bin|index\.json(\.tmp)?|doc_offsets\.npy)$")
_TEMP = re.compile(r"^\.(?:(?P<name>.+)\.)?(?P<tag>partial|old)-(?P<pid>\d+)-\w+$")


class OutputError(ValueError):
    """An output path the command must not write; the message is one line that names the
    path, what is there, and how to proceed."""


@dataclass(frozen=True)
class Contents:
    """What a path holds: `kind` (one of RUN, MODEL, PREPARED, TOKENIZER, DEMO, PLOTS, OTHER,
    FILE; None for nothing or an empty directory) and a description naming its files."""

    kind: str | None
    description: str


# ---------------------------------------------------------------------- what a directory holds
def entries(path: str | Path) -> dict[str, Path]:
    """Name -> path of the entries of a directory, leaving out this module's temporary ones."""
    return {p.name: p for p in Path(path).iterdir() if not _TEMP.match(p.name)}


def _named(kind: str, names: Iterable[str]) -> Contents:
    shown = sorted(names)
    listed = ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else "")
    return Contents(kind, f"{kind} ({listed})")


def _is_prepared_split(path: Path) -> bool:
    return path.is_dir() and all(_SPLIT_FILE.match(p.name) for p in path.iterdir())


def identify(path: str | Path) -> Contents:
    """Say what `path` holds, from the files each command writes: a run (train_config.json or
    checkpoints/), a demo (data/ and model/ of those kinds), a model (config.json,
    model.safetensors), prepared data (meta.json, or a split's index.json when unfinished), a
    tokenizer (tokenizer.json), plots (only .png files), other files, or a plain file."""
    path = Path(path)
    if not path.exists():
        return Contents(None, "nothing")
    if not path.is_dir():
        return Contents(FILE, FILE)
    listed = entries(path)
    names = set(listed)
    if not names:
        return Contents(None, "an empty directory")
    if "train_config.json" in names or (path / "checkpoints").is_dir():
        return _named(RUN, names & (_RUN_FILES | _RUN_DIRS))
    if identify(path / "data").kind == PREPARED or identify(path / "model").kind == RUN:
        return Contents(DEMO, f"{DEMO} (data/, model/)")
    if names & {"config.json", "model.safetensors"}:
        return _named(MODEL, names & {"config.json", "model.safetensors"})
    if "meta.json" in names:
        return Contents(PREPARED, f"{PREPARED} (meta.json)")
    if any((p / "index.json").is_file() for p in listed.values() if p.is_dir()):
        return Contents(PREPARED, f"unfinished {PREPARED} (split index.json, no meta.json)")
    if "tokenizer.json" in names:
        return Contents(TOKENIZER, f"{TOKENIZER} (tokenizer.json)")
    if all(name.endswith(".png") and p.is_file() for name, p in listed.items()):
        return _named(PLOTS, names)
    return Contents(OTHER, f"files hybridlm did not write ({', '.join(sorted(names)[:3])}"
                           f"{', ...' if len(names) > 3 else ''})")


def foreign_entries(path: str | Path, kind: str) -> list[str]:
    """Entries of directory `path` that output of `kind` never holds: replacing the directory
    would delete them, so a replace is refused while they are there."""
    listed = entries(path)
    if kind == TOKENIZER:
        mine = {"tokenizer.json", "tokenizer_config.json", "chat_template.json"}
        return sorted(name for name in listed if name not in mine)
    if kind == PREPARED:
        return sorted(name for name, p in listed.items()
                      if name not in _PREPARED_FILES and not name.endswith(".bin")
                      and not _is_prepared_split(p))
    if kind == PLOTS:
        return sorted(name for name, p in listed.items()
                      if not (name.endswith(".png") and p.is_file()))
    if kind == RUN:
        return sorted(name for name in listed if name not in _RUN_FILES | _RUN_DIRS)
    if kind == MODEL:
        return sorted(name for name in listed
                      if name not in _MODEL_FILES and not _MODEL_SHARD.match(name))
    return sorted(listed)


# ---------------------------------------------------------------------- refusing a target
def _label(out: Path, flag: str) -> str:
    return f"{flag} {out}" if flag else str(out)


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def check_output_path(out: str | Path, *, flag: str = "--out", is_file: bool = False) -> Path:
    """Refuse an output path that is an existing file (or, for a file output, an existing
    directory) or that lies under a file."""
    out = Path(out)
    if is_file and out.is_dir():
        raise OutputError(f"{_label(out, flag)} is an existing directory; name a file path")
    if not is_file and out.exists() and not out.is_dir():
        raise OutputError(f"{_label(out, flag)} is an existing file; name a directory "
                          "(new or empty) instead")
    for parent in Path(os.path.abspath(out)).parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{_label(out, flag)}: {parent} is a file, so nothing can be "
                                  "written under it; choose another path")
            break
    return out


def check_not_an_input(out: str | Path, inputs: Mapping[str, str | Path | None] | None,
                       *, flag: str = "--out") -> None:
    """Refuse an output that is an input, lies inside one, or holds one: the command would
    write into (or replace) what it reads. `inputs`: label (e.g. '--model') -> path."""
    target = _real(out)
    for label, given in (inputs or {}).items():
        for path in ([given] if isinstance(given, (str, os.PathLike)) else given or []):
            source = _real(path)
            if target == source:
                where = "is"
            elif source in target.parents:
                where = "is inside"
            elif target in source.parents:
                where = "holds"
            else:
                continue
            raise OutputError(f"{_label(Path(out), flag)} {where} the input {label} {path}: "
                              "the command would write over what it reads; choose a path "
                              "outside it")


def claim_output(out: str | Path, kind: str, *, overwrite: bool = False,
                 inputs: Mapping[str, str | Path | None] | None = None,
                 flag: str = "--out") -> Path:
    """Check, before any work, that a command making a directory of `kind` may write `out`: a
    new path or an empty directory, or (with `overwrite`) output of the same kind holding
    nothing else. Returns `out`; raises OutputError otherwise."""
    out = check_output_path(out, flag=flag)
    check_not_an_input(out, inputs, flag=flag)
    remove_stale_temps(out)  # an old directory a killed replace set aside is judged, not lost
    found = identify(out)
    if found.kind is None:
        return out
    name = _label(out, flag)
    if found.kind == OTHER:  # name the files that are not of the kind this command writes
        foreign = foreign_entries(out, kind)
        found = Contents(OTHER, f"files hybridlm did not write ({', '.join(foreign[:3])}"
                                f"{', ...' if len(foreign) > 3 else ''})")
    if found.kind != kind:
        raise OutputError(f"{name} already holds {found.description}; {kind} is not written "
                          f"over it: choose a new or empty {flag or 'directory'}")
    if not overwrite:
        raise OutputError(f"{name} already holds {found.description}; pass --overwrite to "
                          f"replace it, or choose another {flag or 'directory'}")
    foreign = foreign_entries(out, kind)
    if foreign:
        raise OutputError(f"{name} holds {', '.join(foreign[:3])} besides {kind}: --overwrite "
                          "would delete them; move them away or choose another "
                          f"{flag or 'directory'}")
    return out


def claim_file_output(out: str | Path, *, overwrite: bool = False,
                      inputs: Mapping[str, str | Path | None] | None = None,
                      flag: str = "--out") -> Path:
    """Check that a command may write the single file `out`: not inside another command's
    directory (a run, model, prepared data or demo, whose file it would replace or join), and
    an existing file only with `overwrite`."""
    out = check_output_path(out, flag=flag, is_file=True)
    check_not_an_input(out, inputs, flag=flag)
    if out.parent.is_dir():
        remove_stale_temps(out)
    owner = identify(out.parent) if out.parent.is_dir() else Contents(None, "")
    if owner.kind in (RUN, MODEL, PREPARED, DEMO):
        raise OutputError(f"{_label(out, flag)} would write into {out.parent}, which holds "
                          f"{owner.description}; choose a path outside it")
    if out.exists() and not overwrite:
        raise OutputError(f"{_label(out, flag)} already exists; pass --overwrite to replace "
                          "it, or choose another path")
    return out


def claim_run_dir(out: str | Path, *, resume: bool, checkpoint: Path | None,
                  inputs: Mapping[str, str | Path | None] | None = None,
                  flag: str = "--out") -> Path:
    """Check a training run's directory. A run writes as it goes (checkpoints, metrics), so it
    cannot be staged and swapped in: a new run needs a new or empty directory; `resume` needs
    a run with a `checkpoint` (its latest, found by the caller). Nothing is ever replaced:
    there is no --overwrite for runs (delete an old run yourself)."""
    out = check_output_path(out, flag=flag)
    check_not_an_input(out, inputs, flag=flag)
    found = identify(out)
    name = _label(out, flag)
    if resume:
        if checkpoint is None:
            held = "" if found.kind is None else f" (it holds {found.description})"
            raise OutputError(f"--resume: {out} holds no checkpoint to resume from{held}")
        return out
    if checkpoint is not None:
        raise OutputError(f"{out} already holds checkpoints ({checkpoint.name}); pass --resume "
                          f"to continue it or choose another {flag} (nothing was overwritten)")
    if found.kind is None:
        return out
    if found.kind == RUN:
        raise OutputError(f"{name} already holds {found.description} with no checkpoint to "
                          f"--resume from; delete it to start that run again, or choose "
                          f"another {flag}")
    raise OutputError(f"{name} already holds {found.description}; a run starts in a new or "
                      f"empty directory: choose another {flag}")


# ---------------------------------------------------------------------- writing in one go
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, AttributeError):  # another user's, or no such check
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(target: str | Path) -> None:
    """Remove the temporary entries of writes to `target` whose process is gone; an old
    directory set aside by a replace whose process died before the new one went in is put
    back at `target`."""
    target = Path(target)
    found = []
    if target.parent.is_dir():
        found += [(p, m) for p in target.parent.iterdir()
                  if (m := _TEMP.match(p.name)) and m["name"] == target.name]
    if target.is_dir():
        found += [(p, m) for p in target.iterdir()
                  if (m := _TEMP.match(p.name)) and m["name"] is None]
    for path, match in sorted(found, key=lambda pm: pm[1]["tag"] != "old"):
        if _alive(int(match["pid"])):
            continue
        if match["tag"] == "old" and not target.exists():
            os.rename(path, target)
        else:
            _remove(path)


def _temp_name(target: Path, tag: str) -> str:
    return f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _default_mode(bits: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return bits & ~umask


def move_into_place(new: str | Path, target: str | Path, *, last: Iterable[str] = ()) -> None:
    """Put the complete directory `new` at `target`. Beside a missing or empty target it is
    renamed over it; staged inside an empty target, its entries move up (those named in
    `last`, the completion markers, last); over an existing directory, the old one is moved
    aside, the new one in, and then the old one deleted."""
    new, target = Path(new), Path(target)
    if new.parent == target:
        last = set(last)
        for entry in sorted(new.iterdir(), key=lambda p: (p.name in last, p.name)):
            os.replace(entry, target / entry.name)
        new.rmdir()
        return
    try:
        os.rename(new, target)  # atomic; works over a missing or empty directory
        return
    except OSError:
        if not target.is_dir():
            raise
    aside = target.with_name(_temp_name(target, "old"))
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextmanager
def staged_dir(target: str | Path, *, replace: bool = False,
               last: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory; when the block finishes, move it to `target`
    (:func:`move_into_place`; `last`: the completion markers). On any exception, Ctrl-C
    included, the temporary directory is removed and `target` is as it was. An existing
    non-empty `target` is replaced only with `replace` (callers check with claim_output)."""
    target = Path(target)
    try:
        remove_stale_temps(target)
        if target.exists() and not target.is_dir():
            raise OutputError(f"{target} is an existing file; name a directory instead")
        if _is_empty_dir(target):  # stage inside: works for a mount point or the cwd too
            staging = Path(tempfile.mkdtemp(prefix=f".partial-{os.getpid()}-", dir=target))
        elif target.exists() and not replace:
            raise OutputError(f"{target} is not empty; nothing was written")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(
                prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
        os.chmod(staging, _default_mode(0o777))  # mkdtemp makes it private (0700)
    except OSError as err:
        raise OutputError(f"cannot write {target}: {err.strerror or err}") from None
    try:
        yield staging
        move_into_place(staging, target, last=last)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def staged_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` (not yet created) to write the whole file to;
    when the block finishes it replaces `target` atomically. On any exception it is removed
    and `target` is as it was."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
    except OSError as err:
        raise OutputError(f"cannot write {target}: {err.strerror or err}") from None
    staging = target.with_name(_temp_name(target, "partial"))
    try:
        yield staging
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def copy_file_atomic(source: str | Path, target: str | Path) -> None:
    """Copy a file so that `target` is always either its old content or the whole copy."""
    with staged_file(target) as staging:
        shutil.copyfile(source, staging)


def write_text_atomic(target: str | Path, text: str) -> None:
    with staged_file(target) as staging:
        staging.write_text(text, encoding="utf-8")


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """Give `target` the content of file or directory `source` without touching it: hard links
    where the filesystem allows them (no data copied), copies where it does not."""
    source, target = Path(source), Path(target)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir():
        shutil.copytree(source, target, copy_function=link, symlinks=True)
    else:
        link(str(source), str(target))
