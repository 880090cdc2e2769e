"""SIGKILL `data prepare`, `tokenizer train` and `sft` while they write: the target is then
either absent or the previous complete one, byte for byte, and the next run cleans up.

Most kills land at a chosen moment: the child process runs the real command with one step
of its writing stalled (it touches a mark file and sleeps), and the test kills it there. One
test kills at whatever moment the temporary directory is first seen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cli_errors import snapshot
from hybridlm import HybridLM
from hybridlm.cli import main as cli_main
from hybridlm.data import load_prepared

CHILD = textwrap.dedent("""
    import os, shutil, sys, time
    import hybridlm.outputs as outputs
    from hybridlm.cli import main

    def stall():
        open(os.environ["KILL_MARK"], "w").close()
        time.sleep(120)

    where = os.environ["STALL"]
    if where == "before-move":  # the new output is complete, not yet in place
        outputs.move_into_place = lambda *args, **kwargs: stall()
    elif where == "between-moves":  # the old output is aside, the new one not yet in
        rename = os.rename
        def rename_then_stall(src, dst):
            rename(src, dst)
            if ".old-" in os.path.basename(dst):
                stall()
        os.rename = rename_then_stall
    elif where == "before-replace":  # a file written whole beside its place, not yet moved
        os.replace = lambda *args: stall()
    elif where == "after-first-split":  # some shards written, others not
        from hybridlm.data.shards import SplitWriter
        finish = SplitWriter.finish
        SplitWriter.finish = lambda self: (finish(self), stall())[0]
    elif where == "mid-weights-copy":  # half of model.safetensors copied into the run dir
        copyfile = shutil.copyfile
        def half_then_stall(src, dst, **kwargs):
            if os.path.basename(src) == "model.safetensors" and ".partial-" in str(dst):
                data = open(src, "rb").read()
                open(dst, "wb").write(data[: len(data) // 2])
                stall()
            return copyfile(src, dst, **kwargs)
        shutil.copyfile = half_then_stall
    sys.exit(main(sys.argv[1:]))
""")


def main(argv: list) -> int:
    return cli_main([str(a) for a in argv])


def kill_when_stalled(tmp_path: Path, argv: list, where: str) -> None:
    """Run `hybridlm argv` in a child stalled at `where`; SIGKILL it there."""
    mark = tmp_path / f"stalled-{where}"
    env = {**os.environ, "KILL_MARK": str(mark), "STALL": where, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert mark.exists(), f"the child never reached {where}: {err.decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL


def _litter(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, demo_docs) -> Path:
    path = tmp_path_factory.mktemp("kill") / "c.jsonl"
    path.write_text("".join(json.dumps({"id": d.id, "text": d.text[:3000]}) + "\n"
                            for d in demo_docs[::3]))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, small_tokenizer) -> Path:
    return small_tokenizer.save(tmp_path_factory.mktemp("kill-tok") / "tok").parent


def _prepare(corpus, tokenizer, out, *extra) -> list:
    return ["data", "prepare", "--input", corpus, "--tokenizer", tokenizer, "--out", out,
            "--workers", "1", *extra]


# ---------------------------------------------------------------------- data prepare
@pytest.mark.parametrize("where", ["after-first-split", "before-move"])
def test_data_prepare_killed_mid_write_leaves_the_previous_data(tmp_path, corpus, tokenizer,
                                                                where):
    out = tmp_path / "data"
    assert main(_prepare(corpus, tokenizer, out)) == 0
    before = snapshot(out)
    kill_when_stalled(tmp_path, _prepare(corpus, tokenizer, out, "--val-fraction", "0.2",
                                         "--overwrite"), where)
    assert snapshot(out) == before
    assert _litter(tmp_path)  # the killed write's temporary directory, clearly named
    assert main(_prepare(corpus, tokenizer, out, "--val-fraction", "0.2", "--overwrite")) == 0
    assert load_prepared(out).meta["val_fraction"] == 0.2 and _litter(tmp_path) == []


def test_data_prepare_killed_into_a_new_directory_leaves_none(tmp_path, corpus, tokenizer):
    out = tmp_path / "data"
    kill_when_stalled(tmp_path, _prepare(corpus, tokenizer, out), "after-first-split")
    assert not out.exists()


def test_data_prepare_killed_between_the_two_moves_gets_the_old_data_back(tmp_path, corpus,
                                                                          tokenizer, capsys):
    out = tmp_path / "data"
    assert main(_prepare(corpus, tokenizer, out)) == 0
    before = snapshot(out)
    kill_when_stalled(tmp_path, _prepare(corpus, tokenizer, out, "--val-fraction", "0.2",
                                         "--overwrite"), "between-moves")
    assert not out.exists()  # absent: the old data waits aside, the new beside it
    # The next run puts the old data back before judging it: without --overwrite it is
    # refused, exactly as it was.
    assert main(_prepare(corpus, tokenizer, out, "--val-fraction", "0.2")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(out) == before and _litter(tmp_path) == []


def test_data_prepare_killed_whenever_its_temporary_directory_appears(tmp_path, corpus,
                                                                      tokenizer):
    out = tmp_path / "data"
    assert main(_prepare(corpus, tokenizer, out)) == 0
    before = snapshot(out)
    argv = _prepare(corpus, tokenizer, out, "--val-fraction", "0.2", "--overwrite")
    proc = subprocess.Popen([sys.executable, "-m", "hybridlm.cli", *map(str, argv)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and not _litter(tmp_path) and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == -signal.SIGKILL:
        assert snapshot(out) in (before, {})  # the previous data, or (mid-swap) none yet
    else:  # it finished before it was seen: the new data, whole
        assert load_prepared(out).meta["val_fraction"] == 0.2


# ---------------------------------------------------------------------- tokenizer train
def _tokenizer_train(corpus, out, *extra) -> list:
    return ["tokenizer", "train", "--input", corpus, "--vocab-size", "400", "--out", out,
            *extra]


@pytest.mark.parametrize("where", ["before-move", "between-moves"])
def test_tokenizer_train_killed_mid_write_leaves_the_previous_tokenizer(tmp_path, corpus,
                                                                        tokenizer, where):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "tokenizer.json").write_bytes((tokenizer / "tokenizer.json").read_bytes())
    before = snapshot(out)
    kill_when_stalled(tmp_path, _tokenizer_train(corpus, out, "--overwrite"), where)
    assert snapshot(out) in ((before,) if where == "before-move" else (before, {}))
    assert main(_tokenizer_train(corpus, out, "--overwrite")) == 0
    assert snapshot(out) != before and _litter(tmp_path) == []


def test_tokenizer_json_killed_mid_write_leaves_the_previous_file(tmp_path, corpus,
                                                                  tokenizer):
    out = tmp_path / "tok.json"
    out.write_bytes((tokenizer / "tokenizer.json").read_bytes())
    before = out.read_bytes()
    kill_when_stalled(tmp_path, _tokenizer_train(corpus, out, "--overwrite"), "before-replace")
    assert out.read_bytes() == before
    assert main(_tokenizer_train(corpus, out, "--overwrite")) == 0
    assert out.read_bytes() != before and _litter(tmp_path) == []


# ---------------------------------------------------------------------- sft
@pytest.fixture(scope="module")
def base(tmp_path_factory, prepared_dir) -> Path:
    out = tmp_path_factory.mktemp("kill-base") / "base"
    assert main(["train", "--preset", "tiny", "--data", prepared_dir, "--out", out,
                 "--steps", "1", "--batch-size", "2", "--seq-len", "32",
                 "--set", "model.hidden_size=32", "--set", "model.num_hidden_layers=1",
                 "--set", "model.intermediate_size=64", "--set", "progress=false"]) == 0
    return out


def test_sft_killed_while_writing_its_model_leaves_the_previous_model(tmp_path, base):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"{a}?", "response": f"{a}."}) + "\n"
                             for a in range(8)))
    out = tmp_path / "sft"
    sft = ["sft", "--model", base, "--data", chats, "--out", out, "--batch-size", "2",
           "--seq-len", "32", "--set", "progress=false"]
    base_before = snapshot(base)
    # A new run killed while copying its final weights: the run dir has no model yet.
    kill_when_stalled(tmp_path, [*sft, "--steps", "1"], "mid-weights-copy")
    assert not (out / "model.safetensors").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".model.safetensors.partial-")]
    # Finished by a resume: the run dir is a complete model.
    assert main([*sft, "--steps", "2", "--resume", "--reschedule"]) == 0
    model_files = {name: (out / name).read_bytes() for name in ("config.json",
                                                                "model.safetensors")}
    # A resumed run killed while copying: the previous weights, byte for byte.
    kill_when_stalled(tmp_path, [*sft, "--steps", "3", "--resume", "--reschedule"],
                      "mid-weights-copy")
    assert {name: (out / name).read_bytes() for name in model_files} == model_files
    HybridLM.from_pretrained(out)
    assert snapshot(base) == base_before
