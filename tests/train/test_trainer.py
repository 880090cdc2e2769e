import itertools
import json
import math
import re
import signal

import pytest
import torch

from hybridlm import HybridLM, zipf_routing_table
from hybridlm.data import Tokenizer, load_prepared, unigram_loss
from hybridlm.train import TrainConfig, load_train_config, train
from hybridlm.train.metrics import MetricsLogger
from hybridlm.train.optim import param_groups
from hybridlm.train.schedule import warm_restarts, warmup_cosine, warmup_stable_decay

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 256,
         "max_position_embeddings": 128}


def run_config(prepared_dir, out, **kw) -> TrainConfig:
    base = dict(data=str(prepared_dir), out=str(out), preset="tiny", model=dict(SMALL),
                steps=60, global_batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5,
                eval_every=30, eval_batches=4, checkpoint_every=30, progress=False)
    return TrainConfig(**{**base, **kw})


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 10, 110, 0.1) for s in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:111]))
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lrs[110] == pytest.approx(0.1) and lrs[129] == pytest.approx(0.1)


def test_wsd_and_warm_restarts():
    wsd = [warmup_stable_decay(s, 5, 100, 0.1, 0.2) for s in range(100)]
    assert wsd[4] == 1.0 and wsd[50] == 1.0 and wsd[79] == 1.0
    assert wsd[80] < 1.0 and wsd[99] == pytest.approx(0.1)
    restarts = [warm_restarts(s, 5, 300, 0.1, [100, 200]) for s in range(300)]
    assert restarts[99] == pytest.approx(0.1, abs=1e-3)  # end of the first cycle
    assert restarts[100] == pytest.approx(0.2) and restarts[104] == pytest.approx(1.0)
    assert restarts[204] == pytest.approx(1.0) and restarts[299] == pytest.approx(0.1, abs=1e-3)


def test_no_weight_decay_on_norms_biases_embeddings(make_model):
    model = make_model(pid_scaler=True)
    decay, no_decay = param_groups(model, 0.1)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.embed_tokens.weight) in no_decay_ids
    assert id(model.layers[0].mixer_norm.weight) in no_decay_ids
    assert id(model.layers[0].scaler.controller.bias) in no_decay_ids
    assert id(model.layers[0].mixer.qkv_proj.weight) in {id(p) for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_tiny_model_loss_falls_on_the_demo_corpus(prepared_dir, tmp_path):
    data = load_prepared(prepared_dir)
    cfg = run_config(prepared_dir, tmp_path / "run", model={**SMALL, "tr_routing": "zipf"})
    result = train(cfg)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 61))
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 0.6, (first, last)
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "expert_load"} <= set(records[0])
    assert "val_loss" in records[29] and "val_loss" in records[59]
    # a trained model beats a unigram model of the same data on held-out text
    assert result.val_loss < unigram_loss(data.token_counts, data.split("validation"))
    assert math.isfinite(result.tokens_per_s) and result.steps == 60
    assert result.stopped == "finished" and result.skipped_steps == 0
    # the run directory is a complete model directory; the zipf table came from the counts
    model = HybridLM.from_pretrained(tmp_path / "run")
    assert model.config.tr_routing == "zipf" and model.config.vocab_size == data.vocab_size
    assert Tokenizer.from_file(tmp_path / "run").vocab_size == data.vocab_size
    expected = zipf_routing_table(torch.as_tensor(data.token_counts), 4)
    assert torch.equal(model.layers[0].mlp.router.table, expected)
    assert (tmp_path / "run" / "train_config.json").is_file()
    assert list((tmp_path / "run" / "tensorboard").iterdir())


def stop_after(monkeypatch, step: int) -> None:
    """Make the next run stop after `step` as a scheduler's SIGTERM would: it checkpoints
    and ends with its schedule (`steps`) unchanged, ready to resume."""
    log = MetricsLogger.log

    def log_then_signal(self, record):
        log(self, record)
        if record["step"] == step:
            signal.raise_signal(signal.SIGTERM)  # the trainer's own handler catches it

    monkeypatch.setattr(MetricsLogger, "log", log_then_signal)


def cosine_lr(step: int, peak: float, warmup: int, steps: int, floor: float = 0.1) -> float:
    """The LR of metrics step `step` (from 1) after the warmup, written out independently."""
    progress = (step - 1 - warmup) / (steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# A warmup shorter than the first leg: the resumed steps decay, so a schedule that moved with
# the resume would show in their LRs.
RESUME = dict(steps=8, warmup_steps=2, checkpoint_every=4, eval_every=4)


def test_resume_reproduces_the_uninterrupted_run(prepared_dir, tmp_path, monkeypatch):
    kw = dict(RESUME, model={**SMALL, "mlp_pattern": "E", "moe_balance": "aux_free"})
    train(run_config(prepared_dir, tmp_path / "straight", **kw))
    with monkeypatch.context() as patch:
        stop_after(patch, 4)
        first_leg = train(run_config(prepared_dir, tmp_path / "split", **kw))
    assert (first_leg.stopped, first_leg.steps) == ("signal", 4)
    train(run_config(prepared_dir, tmp_path / "split", **kw), resume=True)
    straight = [(r["step"], r["lr"], r["loss"]) for r in read_metrics(tmp_path / "straight")]
    split = [(r["step"], r["lr"], r["loss"]) for r in read_metrics(tmp_path / "split")]
    assert straight == split  # exactly the same LRs and losses, no step repeated or lost
    lrs = [lr for _, lr, _ in straight]
    assert all(a > b for a, b in itertools.pairwise(lrs[2:]))  # steps 3-8 decay
    a = HybridLM.from_pretrained(tmp_path / "straight").state_dict()
    b = HybridLM.from_pretrained(tmp_path / "split").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_new_length_unless_rescheduled(prepared_dir, tmp_path, monkeypatch,
                                                        capsys):
    run = tmp_path / "r"
    with monkeypatch.context() as patch:
        stop_after(patch, 4)
        train(run_config(prepared_dir, run, **RESUME))
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"steps 8 -> 12 changes the cosine learning rate of "
                                         r"the remaining steps from steps 5-8 at .* to steps "
                                         r"5-12 at .*pass --reschedule") as refused:
        train(run_config(prepared_dir, run, **{**RESUME, "steps": 12}), resume=True)
    with pytest.raises(ValueError, match="steps=4 is at or below the checkpoint's step 4"):
        train(run_config(prepared_dir, run, **{**RESUME, "steps": 4}), resume=True)
    assert (run / "metrics.jsonl").read_text() == before  # refused before writing anything
    old = str(refused.value).split(" from ")[1].split(" to ")[0]
    for value, step in re.findall(r"(\S+) at step (\d+)", old):  # what the 8 steps would be
        assert float(value) == pytest.approx(cosine_lr(int(step), 3e-3, 2, 8), rel=1e-2)

    capsys.readouterr()
    train(run_config(prepared_dir, run, **{**RESUME, "steps": 12}), resume=True,
          reschedule=True)
    printed = capsys.readouterr().out
    assert "[resume] rescheduled: steps 8 -> 12" in printed
    lr = {r["step"]: r["lr"] for r in read_metrics(run)}
    assert sorted(lr) == list(range(1, 13))
    assert [lr[s] for s in range(1, 5)] == [json.loads(line)["lr"] for line in
                                            before.splitlines()]  # the first leg kept its LRs
    for step in range(5, 13):  # the remaining steps follow the new 12-step schedule...
        assert lr[step] == pytest.approx(cosine_lr(step, 3e-3, 2, 12), rel=1e-9)
    new = printed.split(" to ")[1]
    points = re.findall(r"(\S+) at step (\d+)", new)
    assert [int(s) for _, s in points] == [5, 8, 12]
    for value, step in points:  # ...as printed
        assert lr[int(step)] == pytest.approx(float(value), rel=1e-2)
    # the new length is the saved one now: resuming the finished run has nothing to train
    with pytest.raises(ValueError, match="steps=12 is at or below the checkpoint's step 12"):
        train(run_config(prepared_dir, run, **{**RESUME, "steps": 12}), resume=True)
    with pytest.raises(ValueError, match="--reschedule only applies with --resume"):
        train(run_config(prepared_dir, tmp_path / "new", **RESUME), reschedule=True)


def test_resume_refuses_a_config_that_differs_where_it_matters(prepared_dir, tmp_path):
    train(run_config(prepared_dir, tmp_path / "r", steps=2, checkpoint_every=2))
    with pytest.raises(ValueError, match=r"lr: 0.003 -> 0.01.*seq_len: 64 -> 32"):
        train(run_config(prepared_dir, tmp_path / "r", steps=4, lr=1e-2, seq_len=32),
              resume=True)
    # a field that does not matter (eval cadence) may change; the length with reschedule
    train(run_config(prepared_dir, tmp_path / "r", steps=3, eval_every=1), resume=True,
          reschedule=True)


def test_a_new_run_never_overwrites_an_existing_one(prepared_dir, tmp_path):
    train(run_config(prepared_dir, tmp_path / "r", steps=2, checkpoint_every=2))
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        train(run_config(prepared_dir, tmp_path / "r", steps=2))
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_non_finite_steps_are_skipped_then_the_run_stops(prepared_dir, tmp_path, monkeypatch):
    from hybridlm.train import NonFiniteError

    forward = HybridLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3 or calls["n"] >= 6:  # one bad step, later a run of bad steps
                out.lm_loss = out.lm_loss * float("nan")  # the term the trainer trains on
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(HybridLM, "forward", poisoned)
    cfg = run_config(prepared_dir, tmp_path / "r", steps=20, checkpoint_every=4, max_bad_steps=3)
    with pytest.raises(NonFiniteError, match="3 steps in a row.*step_00000004"):
        train(cfg)
    records = read_metrics(tmp_path / "r")
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 2, 3]
    assert all(math.isfinite(v) for v in HybridLM.from_pretrained(
        tmp_path / "r" / "checkpoints" / "step_00000004").state_dict()["norm.weight"])


def test_gradient_accumulation_matches_one_big_batch(prepared_dir, tmp_path):
    train(run_config(prepared_dir, tmp_path / "a", steps=3, micro_batch_size=8))
    train(run_config(prepared_dir, tmp_path / "b", steps=3, micro_batch_size=2))
    a = [r["loss"] for r in read_metrics(tmp_path / "a")]
    b = [r["loss"] for r in read_metrics(tmp_path / "b")]
    assert a == pytest.approx(b, rel=1e-5)


def test_bad_inputs_stop_before_anything_is_written(prepared_dir, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(ValueError, match="steps=0"):
        train(run_config(prepared_dir, out, steps=0))
    with pytest.raises(ValueError, match="vocab_size=100"):
        train(run_config(prepared_dir, out, model={**SMALL, "vocab_size": 100}))
    with pytest.raises(ValueError, match="global_batch_size=8 is not divisible by "
                                         "micro_batch_size=3"):
        train(run_config(prepared_dir, out, micro_batch_size=3))
    with pytest.raises(FileNotFoundError):
        train(run_config(prepared_dir, out, data=str(tmp_path / "nothing")))
    assert not out.exists()


def test_run_file_plus_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: d\nout: o\nsteps: 10\nmodel:\n  tr_routing: zipf\n")
    cfg = load_train_config(path, {"lr": 0.01, "steps": None}, ["model.num_experts=2",
                                                                 "schedule=wsd"])
    assert (cfg.steps, cfg.lr, cfg.schedule) == (10, 0.01, "wsd")
    assert cfg.model == {"tr_routing": "zipf", "num_experts": 2}
    with pytest.raises(ValueError, match="unknown training field 'stepz'"):
        load_train_config(path, set_args=["stepz=3"])
    path.write_text("data: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_train_config(path)


def test_seq_len_may_equal_but_not_exceed_the_models_positions(prepared_dir, tmp_path):
    model = {**SMALL, "max_position_embeddings": 64}
    train(run_config(prepared_dir, tmp_path / "ok", steps=1, seq_len=64, model=model))
    with pytest.raises(ValueError, match="seq_len=65 exceeds the model's "
                                         "max_position_embeddings=64"):
        train(run_config(prepared_dir, tmp_path / "no", steps=1, seq_len=65, model=model))


@pytest.mark.slow  # inductor compiles the model: a few minutes on 2 CPU cores
def test_the_compiled_model_gives_the_eager_losses(prepared_dir, tmp_path):
    train(run_config(prepared_dir, tmp_path / "eager", steps=3))
    train(run_config(prepared_dir, tmp_path / "compiled", steps=3, compile=True))
    eager = [r["loss"] for r in read_metrics(tmp_path / "eager")]
    compiled = [r["loss"] for r in read_metrics(tmp_path / "compiled")]
    assert compiled == pytest.approx(eager, rel=1e-3)
