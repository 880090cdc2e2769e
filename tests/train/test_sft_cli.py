"""`hybridlm sft` end to end: a pre-trained directory, a jsonl of chats, a fine-tuned model."""

import json

from hybridlm import HybridLM
from hybridlm.cli import main


def test_sft_fine_tunes_a_model_directory_and_keeps_its_chat_template(
        prepared_dir, small_tokenizer, tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", "--preset", "tiny", "--data", str(prepared_dir), "--out", str(base),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                 "--set", "model.hidden_size=32", "--set", "model.num_hidden_layers=1",
                 "--set", "model.intermediate_size=64", "--set", "progress=false"]) == 0
    records = [{"prompt": f"What is {a} plus {b}?", "response": f"{a + b}."}
               for a in range(6) for b in range(6)]
    records.append({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Name a whale."},
                                 {"role": "assistant", "content": "Moby Dick."}]})
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(base), "--data", str(data), "--out", str(out),
                 "--steps", "30", "--batch-size", "4", "--seq-len", "64", "--lr", "5e-3",
                 "--warmup-steps", "2", "--set", "progress=false"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert (out / "chat_template.json").is_file() and (out / "tokenizer.json").is_file()
    assert HybridLM.from_pretrained(out).config == HybridLM.from_pretrained(base).config
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--chat", "--prompt", "What is 2 plus 3?",
                 "--greedy", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")  # the reply (possibly empty: eos first)


def test_sft_bad_data_is_reported_before_training(prepared_dir, tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", "--preset", "tiny", "--data", str(prepared_dir), "--out", str(base),
                 "--steps", "1", "--batch-size", "2", "--seq-len", "32",
                 "--set", "model.hidden_size=32", "--set", "model.num_hidden_layers=1",
                 "--set", "model.intermediate_size=64", "--set", "progress=false"]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    assert main(["sft", "--model", str(base), "--data", str(bad), "--out",
                 str(tmp_path / "o")]) == 2
    assert "line 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["sft", "--model", str(base), "--data", str(tmp_path / "none.jsonl"), "--out",
                 str(tmp_path / "o")]) == 2
