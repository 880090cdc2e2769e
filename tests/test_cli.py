"""The command line, end to end on a slice of the demo corpus."""

import json

from hybridlm.cli import main


def test_tokenizer_prepare_train_generate(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    from hybridlm.data import DEMO_CORPUS, load_documents

    docs = load_documents(DEMO_CORPUS)[::10]
    corpus.write_text("".join(
        json.dumps({"id": d.id, "text": d.text[:4000]}) + "\n" for d in docs))
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400",
                 "--out", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert main(["data", "prepare", "--input", str(corpus), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "data")]) == 0
    train = ["train", "--preset", "tiny", "--data", str(tmp_path / "data"),
             "--batch-size", "2", "--seq-len", "32", "--eval-every", "3",
             "--eval-batches", "1", "--out", str(tmp_path / "run"),
             "--set", "model.hidden_size=32", "--set", "model.num_hidden_layers=1",
             "--set", "model.intermediate_size=64", "--set", "model.tr_routing=zipf",
             "--set", "progress=false"]
    assert main([*train, "--steps", "3"]) == 0
    capsys.readouterr()
    # resuming a finished run, or into a new length without --reschedule, is refused
    assert main([*train, "--steps", "3", "--resume"]) == 2
    assert "steps=3 is at or below the checkpoint's step 3" in capsys.readouterr().err
    assert main([*train, "--steps", "4", "--resume"]) == 2
    assert "steps 3 -> 4 changes the cosine learning rate" in capsys.readouterr().err
    assert main([*train, "--steps", "4", "--resume", "--reschedule"]) == 0
    assert "[resume] rescheduled: steps 3 -> 4" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "run"), "--prompt", "The Congress",
                 "--max-new-tokens", "5", "--greedy"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The Congress") and len(text.strip()) > len("The Congress")


def test_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main(["data", "prepare", "--input", str(tmp_path / "none.jsonl"), "--tokenizer",
                 str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_unknown_preset_is_refused(tmp_path, capsys):
    assert main(["train", "--preset", "huge", "--data", str(tmp_path), "--out", "o"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_presets_lists_total_and_active_counts(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("complexity-deep-187m"))
    assert row.split()[-2:] == ["186,822,144", "123,121,152"]
