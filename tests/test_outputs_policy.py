"""Every command that writes, pointed at a path it must not write: one line naming what is
there and how to proceed, and the target byte-for-byte as it was. Then the ways through:
--overwrite (same kind only, replaced whole), re-running on unchanged inputs, --resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from cli_errors import assert_one_line_error, snapshot
from hybridlm.cli import main as cli_main
from hybridlm.data import load_prepared

TINY = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--set",
        "model.hidden_size=32", "--set", "model.num_hidden_layers=1", "--set",
        "model.intermediate_size=64", "--set", "progress=false"]


def main(argv: list) -> int:
    return cli_main([str(a) for a in argv])


def _train(w, out, *extra) -> list:
    return ["train", "--data", w.data, "--out", out, "--steps", "1", *TINY, *extra]


def _sft(w, model, out, *extra) -> list:
    return ["sft", "--model", model, "--data", w.chats, "--out", out, "--steps", "1",
            "--batch-size", "2", "--seq-len", "32", "--set", "progress=false", *extra]


def _tok(w, out, *extra, corpus=None) -> list:
    return ["tokenizer", "train", "--input", corpus or w.corpus / "c.jsonl", "--vocab-size",
            "300", "--out", out, *extra]


def _prep(w, out, *extra, inputs=None) -> list:
    return ["data", "prepare", "--input", *(inputs or [w.corpus / "c.jsonl"]), "--tokenizer",
            w.tok, "--out", out, "--workers", "1", *extra]


@pytest.fixture(scope="module")
def w(tmp_path_factory, prepared_dir, demo_docs, small_tokenizer):
    """One of everything a command can find at its --out: a run (with checkpoints), a run
    without one yet, a finished model directory, prepared data, a tokenizer, plots, other
    files, a plain file; plus a corpus and a chat file to read."""
    root = tmp_path_factory.mktemp("outputs")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "c.jsonl").write_text("".join(
        json.dumps({"id": d.id, "text": d.text[:1500]}) + "\n" for d in demo_docs[::12]))
    small_tokenizer.save(root / "tok")
    w = SimpleNamespace(root=root, corpus=corpus, tok=root / "tok", data=prepared_dir,
                        run=root / "run", model=root / "model", norun=root / "norun",
                        other=root / "other", file=root / "notes.txt", chats=root / "chats.jsonl")
    w.chats.write_text("".join(json.dumps({"prompt": f"{a} plus {a}?", "response": f"{2 * a}"})
                               + "\n" for a in range(8)))
    assert main(_train(w, w.run, "--steps", "2")) == 0
    w.model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copyfile(w.run / name, w.model / name)
    w.norun.mkdir()
    shutil.copyfile(w.run / "train_config.json", w.norun / "train_config.json")
    shutil.copyfile(w.run / "metrics.jsonl", w.norun / "metrics.jsonl")
    w.other.mkdir()
    (w.other / "thesis.tex").write_text("years of work")
    w.file.write_text("mine")
    # output of the command's own kind, plus a file the command did not write
    w.tokplus = shutil.copytree(w.tok, root / "tokplus")
    w.dataplus = shutil.copytree(w.data, root / "dataplus")
    for path in (w.tokplus, w.dataplus):
        (path / "notes.txt").write_text("mine")
    assert main(["plot", w.run]) == 0
    (w.run / "plots" / "notes.txt").write_text("mine")  # plots/ now holds more than plots
    return w


# (id, argv from the fixture, words the error names, the fixture paths that must not change)
REFUSED = [
    # tokenizer train
    ("tok-over-tok", lambda w: _tok(w, w.tok), ["already holds a tokenizer", "--overwrite"],
     ["tok"]),
    ("tok-over-model", lambda w: _tok(w, w.model), ["holds a model", "choose a new"],
     ["model"]),
    ("tok-over-model-overwrite", lambda w: _tok(w, w.model, "--overwrite"),
     ["holds a model", "not written over it"], ["model"]),
    ("tok-file-into-model", lambda w: _tok(w, w.model / "tokenizer.json", "--overwrite"),
     ["would write into", "holds a model"], ["model"]),
    ("tok-over-run", lambda w: _tok(w, w.run), ["a training run"], ["run"]),
    ("tok-over-data", lambda w: _tok(w, w.data), ["prepared data (meta.json)"], ["data"]),
    ("tok-over-other", lambda w: _tok(w, w.other, "--overwrite"),
     ["files hybridlm did not write (thesis.tex)"], ["other"]),
    ("tok-overwrite-with-notes", lambda w: _tok(w, w.tokplus, "--overwrite"),
     ["holds notes.txt besides a tokenizer", "would delete them"], ["tokplus"]),
    ("tok-existing-json", lambda w: _tok(w, w.tok / "tokenizer.json"),
     ["already exists", "--overwrite"], ["tok"]),
    ("tok-into-input", lambda w: _tok(w, w.corpus / "tok", corpus=w.corpus),
     ["is inside the input --input"], ["corpus"]),
    ("tok-is-input", lambda w: _tok(w, w.corpus, corpus=w.corpus),
     ["is the input --input"], ["corpus"]),
    ("tok-json-is-input", lambda w: _tok(w, w.tok / "tokenizer.json",
                                         corpus=w.tok / "tokenizer.json"),
     ["is the input --input"], ["tok"]),
    ("tok-out-file", lambda w: _tok(w, w.file), ["is an existing file"], ["file"]),
    ("tok-under-file", lambda w: _tok(w, w.file / "tok"),
     ["is a file, so nothing can be written under it"], ["file"]),
    # data prepare
    ("prep-other-inputs", lambda w: _prep(w, w.data),
     ["already holds prepared data", "--overwrite"], ["data"]),
    ("prep-overwrite-with-notes", lambda w: _prep(w, w.dataplus, "--overwrite"),
     ["holds notes.txt besides prepared data"], ["dataplus"]),
    ("prep-over-model", lambda w: _prep(w, w.model, "--overwrite"),
     ["holds a model", "not written over it"], ["model"]),
    ("prep-over-run", lambda w: _prep(w, w.run, "--overwrite"), ["a training run"], ["run"]),
    ("prep-over-tok", lambda w: _prep(w, w.tok), ["holds a tokenizer"], ["tok"]),
    ("prep-over-other", lambda w: _prep(w, w.other, "--overwrite"), ["thesis.tex"], ["other"]),
    ("prep-into-input", lambda w: _prep(w, w.corpus / "data", inputs=[w.corpus]),
     ["is inside the input --input"], ["corpus"]),
    ("prep-holds-input", lambda w: _prep(w, w.corpus, inputs=[w.corpus / "c.jsonl"]),
     ["holds the input --input"], ["corpus"]),
    ("prep-out-file", lambda w: _prep(w, w.file), ["is an existing file"], ["file"]),
    ("prep-under-file", lambda w: _prep(w, w.file / "data"), ["is a file"], ["file"]),
    # train (and sft) write runs as they go: a new or empty --out, or --resume
    ("train-over-model", lambda w: _train(w, w.model), ["holds a model", "choose another --out"],
     ["model"]),
    ("train-over-run", lambda w: _train(w, w.run), ["already holds checkpoints", "--resume"],
     ["run"]),
    ("train-over-run-without-checkpoint", lambda w: _train(w, w.norun),
     ["no checkpoint to --resume from", "delete it"], ["norun"]),
    ("train-resume-model", lambda w: _train(w, w.model, "--resume"),
     ["--resume", "holds no checkpoint", "a model"], ["model"]),
    ("train-over-tok", lambda w: _train(w, w.tok), ["holds a tokenizer"], ["tok"]),
    ("train-over-other", lambda w: _train(w, w.other), ["thesis.tex"], ["other"]),
    ("train-is-data", lambda w: _train(w, w.data), ["is the input --data"], ["data"]),
    ("train-into-data", lambda w: _train(w, w.data / "run"), ["is inside the input --data"],
     ["data"]),
    ("train-out-file", lambda w: _train(w, w.file), ["is an existing file"], ["file"]),
    ("train-under-file", lambda w: _train(w, w.file / "run"), ["is a file"], ["file"]),
    ("sft-is-model", lambda w: _sft(w, w.run, w.run), ["is the input --model"], ["run"]),
    ("sft-into-model", lambda w: _sft(w, w.run, w.run / "sft"),
     ["is inside the input --model"], ["run"]),
    ("sft-holds-model", lambda w: _sft(w, w.run, w.root),
     ["holds the input --model"], ["run"]),
    ("sft-is-data", lambda w: _sft(w, w.run, w.chats), ["is an existing file"], ["run"]),
    ("sft-over-model", lambda w: _sft(w, w.run, w.model), ["holds a model"], ["model", "run"]),
    # plot redraws RUN_DIR/plots, but not over files it did not draw
    ("plot-over-notes", lambda w: ["plot", w.run], ["notes.txt", "plots is not written"],
     ["run"]),
    # demo: an earlier demo's model only with --overwrite; never over other files
    ("demo-over-demo", lambda w: ["demo", "--out", w.root / "demo"],
     ["earlier demo", "--overwrite"], ["demo"]),
    ("demo-over-other-model", lambda w: ["demo", "--out", w.root / "demo2", "--overwrite"],
     ["model", "thesis.tex", "a training run is not written over it"], ["demo2"]),
    ("demo-data-over-other", lambda w: ["demo", "--out", w.root / "demo3", "--overwrite"],
     ["demo3 already holds files hybridlm did not write (data)", "choose another --out"],
     ["demo3"]),
    ("demo-data-other-vocab", lambda w: ["demo", "--out", w.root / "demo4"],
     ["prepared with --vocab-size", "not 8192", "--overwrite"], ["demo4"]),
    ("demo-over-model", lambda w: ["demo", "--out", w.model, "--overwrite"],
     ["holds a model", "choose another --out"], ["model"]),
    ("demo-out-file", lambda w: ["demo", "--out", w.file], ["is an existing file"], ["file"]),
]


@pytest.fixture(scope="module")
def demos(w):
    """demo/ as an earlier demo left it; demo2/model and demo3/data holding other files."""
    shutil.copytree(w.run, w.root / "demo" / "model")
    shutil.copytree(w.data, w.root / "demo" / "data")
    shutil.copytree(w.data, w.root / "demo2" / "data")
    shutil.copytree(w.other, w.root / "demo2" / "model")
    shutil.copytree(w.other, w.root / "demo3" / "data")
    shutil.copytree(w.data, w.root / "demo4" / "data")  # a demo stopped after its data
    return w


@pytest.mark.parametrize("argv, words, unchanged", [case[1:] for case in REFUSED],
                         ids=[case[0] for case in REFUSED])
def test_a_target_the_command_must_not_write_is_refused(demos, capsys, argv, words, unchanged):
    w = demos
    paths = [getattr(w, name) if hasattr(w, name) else w.root / name for name in unchanged]
    assert_one_line_error(argv(w), *words, capsys=capsys, unchanged=paths)


def test_python_m_hybridlm_train_refuses_the_same(w, capsys):
    from hybridlm.train.__main__ import main as train_main

    before = snapshot(w.model)
    assert train_main([str(a) for a in _train(w, w.model)[1:]]) == 2
    assert "holds a model" in capsys.readouterr().err
    assert snapshot(w.model) == before


# ---------------------------------------------------------------------- the ways through
def test_tokenizer_overwrite_replaces_the_tokenizer_whole(w, tmp_path, capsys):
    tok = tmp_path / "tok"
    shutil.copytree(w.tok, tok)
    before = snapshot(tok)
    assert main(_tok(w, tok, "--overwrite")) == 0
    after = snapshot(tok)
    assert list(after) == ["tokenizer.json"] and after != before
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temporaries left behind


def test_data_prepare_reruns_are_no_ops_and_overwrite_replaces(w, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(_prep(w, out)) == 0
    first = snapshot(out)
    assert main(_prep(w, out)) == 0  # unchanged inputs: nothing to do, no --overwrite needed
    assert "up to date" in capsys.readouterr().out and snapshot(out) == first
    assert_one_line_error(_prep(w, out, "--val-fraction", "0.3"), "--overwrite",
                          capsys=capsys, unchanged=[out])
    assert main(_prep(w, out, "--val-fraction", "0.3", "--overwrite")) == 0
    assert load_prepared(out).meta["val_fraction"] == 0.3
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


@pytest.mark.parametrize("bad, words", [
    ('{"id": "x", "text": "fine"}\n{"id": broken\n', ["bad.jsonl:2"]),
    ('{"id": "x", "text": "   "}\n', ["no non-empty documents"]),
])
def test_overwrite_with_input_that_turns_out_bad_changes_nothing(w, tmp_path, capsys, bad,
                                                                 words):
    out = tmp_path / "data"
    assert main(_prep(w, out)) == 0
    (tmp_path / "bad.jsonl").write_text(bad)
    assert_one_line_error(_prep(w, out, "--overwrite", inputs=[tmp_path / "bad.jsonl"]),
                          *words, capsys=capsys, unchanged=[tmp_path / "data"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "data"]


def test_sft_writes_a_new_run_beside_its_base_and_resumes(w, tmp_path, capsys):
    base = snapshot(w.run)
    out = tmp_path / "sft"
    assert main(_sft(w, w.run, out)) == 0
    assert main(_sft(w, w.run, out, "--steps", "2", "--resume", "--reschedule")) == 0
    assert snapshot(w.run) == base
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2


def test_an_interrupted_demo_keeps_the_earlier_model(demos, tmp_path, monkeypatch):
    import hybridlm.demo
    from hybridlm.data import load_prepared

    demo = tmp_path / "demo"
    shutil.copytree(demos.root / "demo", demo)
    before = snapshot(demo)

    def interrupted_training(cfg, **kwargs):
        Path(cfg.out, "train_config.json").write_text("{}")  # the new run had begun
        raise KeyboardInterrupt

    monkeypatch.setattr(hybridlm.demo, "train", interrupted_training)
    with pytest.raises(KeyboardInterrupt):
        hybridlm.demo.run_demo(str(demo), steps=1, max_minutes=1, overwrite=True,
                               vocab_size=load_prepared(demo / "data").vocab_size)
    assert snapshot(demo) == before


def test_plot_redraws_its_own_plots(w, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(w.run / "metrics.jsonl", run / "metrics.jsonl")
    assert main(["plot", run]) == 0
    (run / "plots" / "loss.png").write_bytes(b"stale")
    assert main(["plot", run]) == 0
    assert (run / "plots" / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert _litter(run) == [] and all(p.suffix == ".png" for p in (run / "plots").iterdir())


def _litter(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)
