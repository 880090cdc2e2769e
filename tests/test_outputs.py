"""The output policy itself (hybridlm.outputs): staging, atomic replace, interruption, stale
temporaries, what a directory holds, and which targets are refused."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cli_errors import snapshot
from hybridlm import outputs
from hybridlm.outputs import (
    DEMO,
    FILE,
    MODEL,
    OTHER,
    PLOTS,
    PREPARED,
    RUN,
    TOKENIZER,
    OutputError,
    check_not_an_input,
    claim_output,
    claim_run_dir,
    identify,
    move_into_place,
    remove_stale_temps,
    staged_dir,
    staged_file,
)


def _write(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _litter(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------- staging
def test_a_new_directory_appears_only_when_the_block_finishes(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target) as staging:
        _write(staging, {"a.txt": "a", "sub/b.txt": "b"})
        assert not target.exists()  # nothing visible while it is written
        assert staging.parent == tmp_path and staging.name.startswith(".out.partial-")
    assert snapshot(target) == snapshot(_write(tmp_path / "ref", {"a.txt": "a", "sub/b.txt": "b"}))
    assert _litter(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_or_ctrl_c_mid_write_leaves_the_target_as_it_was(tmp_path, error):
    target = _write(tmp_path / "out", {"old.txt": "old"})
    before = snapshot(target)
    with pytest.raises(error), staged_dir(target, replace=True) as staging:
        _write(staging, {"new.txt": "half"})
        raise error
    assert snapshot(target) == before
    assert _litter(tmp_path) == []  # the temporary directory is gone too


def test_an_error_mid_write_leaves_no_new_target(tmp_path):
    with pytest.raises(ValueError), staged_dir(tmp_path / "out") as staging:
        _write(staging, {"a": "x"})
        raise ValueError("bad input")
    assert list(tmp_path.iterdir()) == []


def test_replace_deletes_the_old_directory_only_once_the_new_one_is_in_place(tmp_path,
                                                                            monkeypatch):
    target = _write(tmp_path / "out", {"old.txt": "old"})
    seen_at_delete = []
    rmtree = outputs.shutil.rmtree

    def watching_rmtree(path, *args, **kwargs):
        seen_at_delete.append(snapshot(target))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(outputs.shutil, "rmtree", watching_rmtree)
    with staged_dir(target, replace=True) as staging:
        _write(staging, {"new.txt": "new"})
        assert (target / "old.txt").read_text() == "old"  # untouched while the new one is built
    assert seen_at_delete and all("new.txt" in s for s in seen_at_delete)
    assert sorted(snapshot(target)) == ["new.txt"]
    assert _litter(tmp_path) == []


def test_a_non_empty_target_is_never_replaced_without_replace(tmp_path):
    target = _write(tmp_path / "out", {"keep.txt": "k"})
    with pytest.raises(OutputError, match="not empty"), staged_dir(target):
        pytest.fail("the block must not run")
    assert (target / "keep.txt").read_text() == "k"


def test_an_existing_empty_directory_is_filled_in_place_markers_last(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    inode = target.stat().st_ino
    moved = []
    replace = os.replace
    monkeypatch.setattr(outputs.os, "replace",
                        lambda src, dst: (moved.append(Path(dst).name), replace(src, dst)))
    with staged_dir(target, last=["meta.json"]) as staging:
        assert staging.parent == target  # staged inside: a mount point or the cwd works too
        _write(staging, {"meta.json": "{}", "a.bin": "a", "z.bin": "z"})
    assert target.stat().st_ino == inode
    assert moved[-1] == "meta.json"
    assert sorted(p.name for p in target.iterdir()) == ["a.bin", "meta.json", "z.bin"]


def test_staged_directories_get_the_usual_permissions(tmp_path):
    with staged_dir(tmp_path / "out") as staging:
        pass
    mode = stat.S_IMODE((tmp_path / "out").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert staging.name and mode == 0o777 & ~umask  # not mkdtemp's private 0700


def test_a_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = _write(tmp_path / "out", {"old.txt": "old"})
    new = _write(tmp_path / "new", {"new.txt": "new"})
    calls = []
    rename = os.rename

    def failing_second_move(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # 1: over the target (refused: not empty), 2: aside, 3: new in
            raise OSError("disk gone")
        return rename(src, dst)

    monkeypatch.setattr(outputs.os, "rename", failing_second_move)
    with pytest.raises(OSError, match="disk gone"):
        move_into_place(new, target)
    assert (target / "old.txt").read_text() == "old" and not (target / "new.txt").exists()


def test_staged_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), staged_file(target) as staging:
        staging.write_text("ha")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and _litter(tmp_path) == []
    with staged_file(target) as staging:
        staging.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new" and _litter(tmp_path) == []


# ---------------------------------------------------------------------- stale temporaries
def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    target = _write(tmp_path / "out", {"a": "a"})
    (tmp_path / f".out.partial-{dead}-abc").mkdir()
    (tmp_path / f".out.old-{dead}-abc").mkdir()  # the target exists: a leftover of a replace
    (tmp_path / f".out.partial-{live}-abc").mkdir()
    (tmp_path / f".other.partial-{dead}-abc").mkdir()  # another target's: not ours to touch
    (target / f".partial-{dead}-abc").mkdir()
    remove_stale_temps(target)
    assert _litter(tmp_path) == [f".other.partial-{dead}-abc", f".out.partial-{live}-abc"]
    assert _litter(target) == []


def test_a_replace_that_died_between_its_two_moves_is_undone(tmp_path):
    dead = _dead_pid()
    aside = _write(tmp_path / f".out.old-{dead}-abc", {"old.txt": "old"})
    _write(tmp_path / f".out.partial-{dead}-abc", {"new.txt": "new"})
    before = snapshot(aside)
    remove_stale_temps(tmp_path / "out")
    assert snapshot(tmp_path / "out") == before and _litter(tmp_path) == []


def test_claiming_a_target_restores_it_first(tmp_path):
    # Otherwise a restored old directory could be replaced without --overwrite.
    aside = _write(tmp_path / f".tok.old-{_dead_pid()}-abc", {"tokenizer.json": "{}"})
    del aside
    with pytest.raises(OutputError, match="already holds a tokenizer"):
        claim_output(tmp_path / "tok", TOKENIZER)


# ---------------------------------------------------------------------- what is there
@pytest.mark.parametrize("files, kind, described", [
    ({"train_config.json": "{}", "config.json": "{}", "model.safetensors": ""}, RUN,
     "a training run (config.json, model.safetensors, train_config.json)"),
    ({"checkpoints/step_00000001/x": ""}, RUN, "a training run (checkpoints)"),
    ({"config.json": "{}", "model.safetensors": "", "tokenizer.json": "{}"}, MODEL,
     "a model (config.json, model.safetensors)"),
    ({"meta.json": "{}", "tokenizer.json": "{}", "train/index.json": "{}"}, PREPARED,
     "prepared data (meta.json)"),
    ({"train/index.json": "{}", "train/shard_00000.bin": ""}, PREPARED,
     "unfinished prepared data"),
    ({"tokenizer.json": "{}"}, TOKENIZER, "a tokenizer (tokenizer.json)"),
    ({"loss.png": "", "lr.png": ""}, PLOTS, "plots (loss.png, lr.png)"),
    ({"notes.txt": ""}, OTHER, "files hybridlm did not write (notes.txt)"),
    ({"a.txt": "", "loss.png": ""}, OTHER, "files hybridlm did not write (a.txt, loss.png)"),
    ({"data/meta.json": "{}", "model/train_config.json": "{}"}, DEMO, "a demo (data/, model/)"),
])
def test_identify_names_what_a_directory_holds(tmp_path, files, kind, described):
    found = identify(_write(tmp_path / "d", files))
    assert found.kind == kind and found.description.startswith(described)


def test_identify_nothing_empty_and_file(tmp_path):
    assert identify(tmp_path / "none").kind is None
    assert identify(tmp_path).kind is None
    (tmp_path / f".partial-{os.getpid()}-x").mkdir()  # a write in progress is not content
    assert identify(tmp_path).kind is None
    (tmp_path / "f").write_text("x")
    assert identify(tmp_path / "f").kind == FILE


def test_the_markers_are_the_names_the_writers_use():
    from hybridlm.chat import CHAT_TEMPLATE_FILE
    from hybridlm.checkpoint import CONFIG_NAME, WEIGHTS_NAME
    from hybridlm.data.shards import (
        COUNTS_FILENAME,
        DOC_OFFSETS_FILENAME,
        INDEX_FILENAME,
        META_FILENAME,
        TMP_TOKENS_FILENAME,
    )
    from hybridlm.data.tokenizer import TOKENIZER_CONFIG_FILENAME, TOKENIZER_FILENAME
    from hybridlm.train.checkpoint import checkpoint_dir
    from hybridlm.train.metrics import METRICS_FILE, TENSORBOARD_DIR
    from hybridlm.train.trainer import CONFIG_FILE

    assert {CONFIG_FILE, METRICS_FILE, CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_FILENAME,
            TOKENIZER_CONFIG_FILENAME, CHAT_TEMPLATE_FILE} == outputs._RUN_FILES
    assert {checkpoint_dir("r").name, TENSORBOARD_DIR, "plots"} == outputs._RUN_DIRS
    assert {META_FILENAME, COUNTS_FILENAME, TOKENIZER_FILENAME, TOKENIZER_CONFIG_FILENAME,
            TMP_TOKENS_FILENAME} == outputs._PREPARED_FILES
    assert all(outputs._SPLIT_FILE.match(n) for n in (INDEX_FILENAME, DOC_OFFSETS_FILENAME,
                                                      "shard_00012.bin"))


# ---------------------------------------------------------------------- refusing targets
@pytest.mark.parametrize("out, given, where", [
    ("in", "in", "is the input"),
    ("in/sub", "in", "is inside the input"),
    ("in", "in/c.jsonl", "holds the input"),
])
def test_an_output_that_overlaps_an_input_is_refused(tmp_path, out, given, where):
    _write(tmp_path, {"in/c.jsonl": ""})
    with pytest.raises(OutputError, match=where):
        check_not_an_input(tmp_path / out, {"--input": tmp_path / given})
    check_not_an_input(tmp_path / "elsewhere", {"--input": tmp_path / given})


def test_a_symlink_to_an_input_is_the_input(tmp_path):
    _write(tmp_path, {"model/config.json": "{}"})
    (tmp_path / "link").symlink_to(tmp_path / "model")
    with pytest.raises(OutputError, match="is the input --model"):
        check_not_an_input(tmp_path / "link", {"--model": tmp_path / "model"})


def test_overwrite_replaces_only_the_same_kind_holding_nothing_else(tmp_path):
    tok = _write(tmp_path / "tok", {"tokenizer.json": "{}"})
    with pytest.raises(OutputError, match="pass --overwrite"):
        claim_output(tok, TOKENIZER)
    assert claim_output(tok, TOKENIZER, overwrite=True) == tok
    with pytest.raises(OutputError, match="prepared data is not written over it"):
        claim_output(tok, PREPARED, overwrite=True)
    (tok / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds notes.txt besides a tokenizer"):
        claim_output(tok, TOKENIZER, overwrite=True)


def test_a_run_needs_a_new_or_empty_directory_or_resume(tmp_path):
    run = _write(tmp_path / "run", {"train_config.json": "{}"})
    with pytest.raises(OutputError, match="no checkpoint to --resume from"):
        claim_run_dir(run, resume=False, checkpoint=None)
    with pytest.raises(OutputError, match="holds no checkpoint to resume from"):
        claim_run_dir(run, resume=True, checkpoint=None)
    checkpoint = run / "checkpoints" / "step_00000002"
    with pytest.raises(OutputError, match="pass --resume"):
        claim_run_dir(run, resume=False, checkpoint=checkpoint)
    assert claim_run_dir(run, resume=True, checkpoint=checkpoint) == run
    assert claim_run_dir(tmp_path / "new", resume=False, checkpoint=None) == tmp_path / "new"


# ---------------------------------------------------------------------- model directories
def test_save_pretrained_over_a_directory_keeps_its_other_files(tmp_path, make_model):
    directory = tmp_path / "m"
    make_model(seed=0).save_pretrained(directory)
    _write(directory, {"tokenizer.json": "{}", "checkpoints/step_00000001/state": "s"})
    make_model(seed=1).save_pretrained(directory)
    assert (directory / "tokenizer.json").read_text() == "{}"
    assert (directory / "checkpoints/step_00000001/state").read_text() == "s"
    assert _litter(tmp_path) == []


@pytest.mark.parametrize("fails_at", ["writing weights", "moving into place"])
def test_save_pretrained_that_fails_midway_changes_nothing(tmp_path, make_model, monkeypatch,
                                                           fails_at):
    import hybridlm.checkpoint

    directory = tmp_path / "m"
    make_model(seed=0).save_pretrained(directory)
    _write(directory, {"tokenizer.json": "{}", "checkpoints/step_00000001/state": "s"})
    before = snapshot(directory)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if fails_at == "writing weights":
        monkeypatch.setattr(hybridlm.checkpoint, "save_file", disk_full)
    else:  # after the other files were carried over into the new directory
        monkeypatch.setattr(outputs, "move_into_place", disk_full)
    with pytest.raises(OSError, match="No space"):
        make_model(seed=1).save_pretrained(directory)
    assert snapshot(directory) == before and _litter(tmp_path) == []


def test_a_checkpoint_saved_again_at_the_same_step_is_replaced(tmp_path, make_model):
    import torch

    from hybridlm.train.checkpoint import latest_checkpoint, save_checkpoint

    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters())
    first = save_checkpoint(tmp_path, 3, model, optimizer, {"skipped_steps": 0})
    (first / "stale").write_text("from the first save")
    assert save_checkpoint(tmp_path, 3, model, optimizer, {"skipped_steps": 1}) == first
    assert latest_checkpoint(tmp_path) == first and not (first / "stale").exists()
    assert _litter(first.parent) == []
