"""The training loop a researcher can leave running for days.

One optimizer step = the global batch (all ranks) split into micro-batches (gradient
accumulation) -> clip -> AdamW -> MoE balance_step. Around it: warmup + cosine / WSD / warm
restarts, held-out loss, metrics (jsonl + TensorBoard), checkpoints every N steps and on
SIGTERM/SIGINT, exact resume, and a guard that skips non-finite steps and stops after K in a
row with the last good checkpoint intact.

The batch of step s on rank r depends only on (seed, s, r, world size), so a resumed run sees
exactly the batches it would have seen, and W ranks together see what one process sees with
the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hybridlm.chat import CHAT_TEMPLATE_FILE, ChatTemplate
from hybridlm.checkpoint import check_weights, load_config
from hybridlm.checkpoint_shards import INDEX_NAME, is_weight_file
from hybridlm.config import ModelConfig
from hybridlm.config_legacy import is_legacy
from hybridlm.data import WindowSampler, load_prepared
from hybridlm.data.tokenizer import tokenizer_files
from hybridlm.errors import RunError
from hybridlm.eval import evaluate
from hybridlm.model import HybridLM, count_targets
from hybridlm.outputs import claim_run_dir, copy_file_atomic, staged_file
from hybridlm.parallel import DistContext, init_distributed, shutdown, sum_over_ranks, wrap
from hybridlm.train.activation_checkpointing import checkpoint_blocks
from hybridlm.train.checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from hybridlm.train.config import TrainConfig
from hybridlm.train.metrics import METRICS_FILE, MetricsLogger, read_metrics
from hybridlm.train.optim import build_optimizer
from hybridlm.train.schedule import describe_lrs, lr_multiplier

CONFIG_FILE = "train_config.json"
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed (including skipped ones)
    train_loss: float
    val_loss: float
    seconds: float
    tokens_per_s: float
    skipped_steps: int
    stopped: str  # "finished" | "signal" | "time" | "non-finite"
    out: str
    # False with expert-choice layers: train_loss sees later tokens; val_loss is always causal.
    train_loss_causal: bool = True


class NonFiniteError(RunError):
    """Raised when too many steps in a row had a non-finite loss or gradient."""


DEVICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str, ctx: DistContext) -> torch.device:
    """The device of `name` (one of DEVICES; "auto" is cuda when there is one, else cpu);
    under torchrun "cuda" is the rank's local GPU. Raises ValueError for another name or a
    device this machine lacks."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message for "gpu7" lists device types we do not train on
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={name!r} is not one of {DEVICES}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None \
                else "torch sees no CUDA GPU"
            raise ValueError(f"device={name!r}: {why}; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device={name!r}: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
        if device.index is None and ctx.initialized:
            return torch.device("cuda", ctx.local_rank)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r}: MPS is not available on this machine; use --device "
                         "cpu (or auto)")
    return device


def build_model(cfg: TrainConfig, vocab_size: int, token_counts) -> HybridLM:
    model_config = ModelConfig.from_preset(cfg.preset, **{"vocab_size": vocab_size, **cfg.model})
    if model_config.vocab_size < vocab_size:
        raise ValueError(
            f"the data's token ids go up to {vocab_size - 1} but the model's vocab_size="
            f"{model_config.vocab_size}: ids would fall outside the embedding"
        )
    torch.manual_seed(cfg.seed)
    model = HybridLM(model_config)
    if token_counts is not None:
        model.fit_routing(torch.as_tensor(token_counts))  # e.g. Zipf token-routing tables
    return model


class NonCausalLossWarning(UserWarning):
    """The run's training loss is not a causal language-model loss (expert-choice routing)."""


def warn_if_training_loss_not_causal(model: HybridLM, has_validation: bool) -> None:
    """Say, when a run starts, that expert-choice layers make the training loss see the
    future, and which loss is causal instead."""
    if model.is_causal:
        return
    held_out = (
        "val_loss routes those layers causally (each token takes its round(capacity_factor) "
        "best experts of the same router) and is the loss to compare with other models"
        if has_validation else "this run has no validation split, so it reports no causal loss"
    )
    warnings.warn(
        "moe_router='expert_choice': an expert picks its tokens from the whole batch, later "
        "ones included, so the training loss ('loss' in metrics.jsonl, marked loss_causal="
        f"false) is not a causal language-model loss; {held_out}",
        NonCausalLossWarning, stacklevel=2,
    )


def _micro_batches(batch, micro: int) -> list[dict[str, torch.Tensor]]:
    """A rank's batch (windows (B, T+1) or an SFT dict) -> micro-batch dicts of B/micro rows."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch, "labels": batch}
    keys = list(batch)
    chunks = zip(*(batch[k].split(micro) for k in keys), strict=True)
    return [dict(zip(keys, parts, strict=True)) for parts in chunks]


def backward_global_batch(model, parts: list[dict[str, torch.Tensor]], ctx: DistContext,
                          device: torch.device, autocast=None
                          ) -> tuple[float, dict[str, Any]]:
    """Forward and backward of this rank's micro-batches: once DDP/FSDP have averaged them
    over ranks, the gradients are those of the global batch's token-mean next-token loss plus
    the mean of the micro-batches' aux losses. Returns (this rank's share of that loss, whose
    mean over ranks is the loss; the last micro-batch's aux)."""
    autocast = autocast or contextlib.nullcontext()
    parts = [{k: v.to(device) for k, v in part.items()} for part in parts]
    # Each micro-batch divides its summed token losses by the target count of the whole
    # global batch, so micro-batches and ranks weigh by their supervised tokens (SFT rows
    # differ), as in one big batch: one all-reduce of the count, before any forward.
    local_count = sum(count_targets(p["labels"], p.get("segment_ids")) for p in parts)
    global_count = ctx.all_reduce_sum(local_count).clamp(min=1)  # () long
    loss_sum, aux = 0.0, {}
    for i, part in enumerate(parts):
        # DDP: all-reduce gradients once, on the last micro-batch (no_sync is entered once:
        # it is a generator context manager).
        sync = contextlib.nullcontext()
        if ctx.parallel == "ddp" and i < len(parts) - 1:
            sync = model.no_sync()
        with sync:
            with autocast:
                output = model(**part, num_items_in_batch=global_count, return_logits=False)
            # DDP and FSDP average gradients over ranks; the ranks' token sums must add up.
            objective = output.lm_loss * ctx.world_size
            if "aux_loss" in output.aux:  # a per-micro-batch mean, weighted as before
                objective = objective + output.aux["aux_loss"] / len(parts)
            objective.backward()
        loss_sum += objective.detach()  # read once, after the last micro-batch
        aux = output.aux
    return float(loss_sum), aux


def _router_stats(aux: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if aux.get("expert_counts"):
        out["expert_load"] = [
            (c.float() / c.sum().clamp(min=1)).tolist() for c in aux["expert_counts"]
        ]
    if aux.get("router_entropy"):
        out["router_entropy"] = [float(e) for e in aux["router_entropy"]]
    if "aux_loss" in aux:
        out["aux_loss"] = float(aux["aux_loss"].detach())
    return out


def _flops_per_token(model: HybridLM, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters + what each mixer computes beyond its
    parameters (its `non_parameter_flops`, e.g. attention scores; none: 0)."""
    mixers = sum(block.mixer.non_parameter_flops(seq_len) for block in model.layers
                 if hasattr(block.mixer, "non_parameter_flops"))
    return 6 * model.num_parameters(active=True) + mixers


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop after the current step."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class RunInputs:
    """What a run trains on, built and checked before anything is written."""

    model: HybridLM
    batches: Any  # .batch(step, rank, world_size) -> windows (B, T+1) or an SFT dict
    val_tokens: Any  # held-out token stream, or None
    extra_files: list[Path]  # copied next to every saved model (tokenizer, chat template)
    checkpoint: Path | None  # where a resumed run continues from
    chat_template: Any = None  # SFT: saved into the run dir and next to every saved model
    trainer_state: dict[str, Any] | None = None  # of `checkpoint`, read while checking


def _pretrain_inputs(cfg: TrainConfig) -> RunInputs:
    data = load_prepared(cfg.data)
    # The run copies this tokenizer next to every saved model: a damaged one would leave
    # models that cannot be used, so it must load and match the data's vocabulary.
    tokenizer_size = data.load_tokenizer().vocab_size
    if tokenizer_size != data.vocab_size:
        raise ValueError(f"{data.tokenizer_path} has {tokenizer_size} tokens but the data was "
                         f"prepared with vocab_size={data.vocab_size}: prepare it again")
    train_tokens = data.split("train")
    if len(train_tokens) < cfg.seq_len:
        raise ValueError(
            f"the train split of {cfg.data} has {len(train_tokens)} tokens, fewer than one "
            f"sequence of seq_len={cfg.seq_len}"
        )
    if cfg.init_from is not None:
        model = HybridLM.from_pretrained(cfg.init_from)
        if model.config.vocab_size < data.vocab_size:
            raise ValueError(f"the data's vocabulary ({data.vocab_size}) exceeds the model's "
                             f"vocab_size={model.config.vocab_size}")
    else:
        model = build_model(cfg, data.vocab_size, data.token_counts)
    # Windows of seq_len tokens on a grid of stride seq_len - 1: the model predicts the
    # seq_len - 1 tokens after each window's first, so every token is a target exactly once.
    batches = WindowSampler(train_tokens, cfg.seq_len - 1, cfg.global_batch_size, seed=cfg.seed)
    val = data.split("validation") if "validation" in data.splits else None
    if val is not None and len(val) == 0:
        val = None  # prepared with --val-fraction 0: the run reports no held-out loss
    elif val is not None and len(val) < cfg.seq_len:  # refused now, not at the first eval
        raise ValueError(
            f"the validation split of {cfg.data} has {len(val)} tokens, fewer than one "
            f"sequence of seq_len={cfg.seq_len}: prepare it with a larger --val-fraction, or "
            "use a shorter --seq-len"
        )
    return RunInputs(model, batches, val, tokenizer_files(data.tokenizer_path), None)


def _sft_inputs(cfg: TrainConfig) -> RunInputs:
    from hybridlm.data import Tokenizer
    from hybridlm.train.sft_data import SFTBatches, load_sft_dataset

    if cfg.init_from is None:
        raise ValueError("task='sft' needs init_from: the model directory to fine-tune")
    load_config(cfg.init_from)  # "not a model directory" comes before "no tokenizer there"
    tokenizer = Tokenizer.from_file(cfg.init_from)
    template = ChatTemplate.load(cfg.init_from)
    rows, stats = load_sft_dataset(cfg.data, tokenizer, template, cfg.seq_len)
    model = HybridLM.from_pretrained(cfg.init_from)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) exceeds the "
                         f"model's vocab_size={model.config.vocab_size}")
    if len(rows) < cfg.global_batch_size:
        cut = (f" ({stats.skipped} of {stats.examples} examples have no response token within "
               f"seq_len={cfg.seq_len} and were left out)" if stats.skipped else "")
        raise ValueError(f"{cfg.data} packs into {len(rows)} rows of {cfg.seq_len} tokens, "
                         f"fewer than global_batch_size={cfg.global_batch_size}{cut}")
    print(f"[sft] {stats.to_dict()}")
    batches = SFTBatches(rows, cfg.global_batch_size, cfg.seed)
    tokenizer_copies = tokenizer_files(Path(cfg.init_from) / "tokenizer.json")
    return RunInputs(model, batches, None, tokenizer_copies, None, template)


def check_resumed_length(cfg: TrainConfig, saved: TrainConfig, done: int,
                         reschedule: bool) -> str | None:
    """Refuse to resume a run that has `done` steps into nothing left to train, or into a new
    length unless `reschedule`: every LR schedule depends on `steps`, so a new length silently
    changes the learning rate of the steps still to come. Returns the change accepted by
    `reschedule` (None when the length is unchanged)."""
    if cfg.steps <= done:
        raise ValueError(
            f"--resume: steps={cfg.steps} is at or below the checkpoint's step {done}: nothing "
            f"left to train (to go on, pass steps > {done} with --reschedule)"
        )
    if cfg.steps == saved.steps:
        return None
    old = (f"steps {done + 1}-{saved.steps} at {describe_lrs(saved, done + 1, saved.steps)}"
           if saved.steps > done else f"none (the saved schedule ended at step {saved.steps})")
    new = f"steps {done + 1}-{cfg.steps} at {describe_lrs(cfg, done + 1, cfg.steps)}"
    change = (f"steps {saved.steps} -> {cfg.steps} changes the {cfg.schedule} learning rate "
              f"of the remaining steps from {old} to {new}")
    if not reschedule:
        raise ValueError(f"--resume: {change}; pass --reschedule to accept the new schedule, "
                         f"or resume with steps={saved.steps}")
    return change


def saved_run_config(out: Path, checkpoint: Path, cfg: TrainConfig) -> TrainConfig:
    """The train_config.json of the run in `out`, to compare a resume with. A run started
    before the model fields were renamed saved its model overrides under the old names: the
    checkpoint's model (read through config_legacy) must then be the model `cfg` builds, and
    `cfg`'s overrides stand for the saved ones."""
    from hybridlm.train.config import load_train_config

    path = out / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None  # load_train_config says what is wrong with the file
    if not (isinstance(data, dict) and isinstance(data.get("model"), dict)
            and is_legacy(data["model"])):
        return load_train_config(path)
    saved_model = load_config(checkpoint)
    model = ModelConfig.from_preset(cfg.preset, **{"vocab_size": saved_model.vocab_size,
                                                   **cfg.model})
    theirs, mine = saved_model.to_dict(), model.to_dict()
    diffs = [f"model.{k}: {theirs[k]!r} -> {mine[k]!r}" for k in sorted(mine)
             if mine[k] != theirs[k]]
    if diffs:
        raise ValueError(f"--resume: the model differs from the saved run's: {diffs}")
    return TrainConfig(**{**data, "model": dict(cfg.model)})


def prepare_run(cfg: TrainConfig, resume: bool, ctx: DistContext,
                reschedule: bool = False) -> RunInputs:
    """Every check that can fail happens here, before anything is written to the run dir.
    `reschedule`: a resumed run may change `steps` (and with it the LR schedule)."""
    cfg.validate()
    cfg.accumulation_steps(ctx.world_size)
    resolve_device(cfg.device, ctx)  # a device this machine lacks is refused before any work
    # A run writes as it goes, so --out is checked before anything else: a new run needs a
    # new or empty directory, --resume a run with a checkpoint; never one of the run's inputs.
    sources = {"--model" if cfg.task == "sft" else "init_from": cfg.init_from, "--data": cfg.data}
    out = claim_run_dir(cfg.out, resume=resume, checkpoint=latest_checkpoint(cfg.out),
                        inputs={label: path for label, path in sources.items() if path})
    ctx.barrier()  # every rank has looked at --out before rank 0 writes into it
    inputs = _sft_inputs(cfg) if cfg.task == "sft" else _pretrain_inputs(cfg)
    limit = inputs.model.config.max_position_embeddings
    if cfg.seq_len > limit:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings="
                         f"{limit}")
    checkpoint = latest_checkpoint(out)
    if resume:
        saved = saved_run_config(out, checkpoint, cfg)
        diffs = cfg.differences(saved)
        if diffs:
            raise ValueError(
                f"--resume: the config differs from the saved run in fields that matter: {diffs}"
            )
        change = check_resumed_length(cfg, saved, checkpoint_step(checkpoint), reschedule)
        # Damaged files the resume reads are refused here, before the run dir changes.
        inputs.trainer_state = read_trainer_state(checkpoint)
        check_weights(inputs.model, checkpoint)
        if (out / METRICS_FILE).is_file():
            read_metrics(out)
        if change is not None and ctx.is_main:
            print(f"[resume] rescheduled: {change}")
        inputs.checkpoint = checkpoint
    elif reschedule:
        raise ValueError("--reschedule only applies with --resume")
    if inputs.chat_template is not None:  # the fine-tuned model keeps its chat template
        inputs.extra_files.append(out / CHAT_TEMPLATE_FILE)  # written with train_config.json
    return inputs


def write_run_files(out: Path, cfg: TrainConfig, inputs: RunInputs) -> None:
    """train_config.json (first: it marks the directory as a run) and the chat template, each
    written whole (a resumed run rewrites them)."""
    out.mkdir(parents=True, exist_ok=True)
    with staged_file(out / CONFIG_FILE) as staging:
        cfg.save(staging)
    if inputs.chat_template is not None:
        inputs.chat_template.save(out)


def copy_final_model(final: Path, out: Path, extra_files: list[Path]) -> None:
    """Make the run dir a loadable model dir: the last checkpoint's files, each copied whole
    (a kill mid-copy leaves the earlier file), weights last: model.safetensors, or the shards
    and then their index (a model larger than save_pretrained's max_shard_size)."""
    weights = sorted((p.name for p in final.iterdir() if is_weight_file(p.name)),
                     key=lambda name: (name == INDEX_NAME, name))
    for name in (*(p.name for p in extra_files), "config.json", *weights):
        copy_file_atomic(final / name, out / name)


def train(cfg: TrainConfig, *, resume: bool = False, reschedule: bool = False) -> TrainResult:
    """Run (or resume) a pre-training (task='pretrain') or fine-tuning (task='sft') run.
    A resumed run keeps its `steps` (the LR schedule depends on it) unless `reschedule`."""
    ctx = init_distributed(cfg.parallel)
    try:
        return _train(cfg, ctx, resume, reschedule)
    finally:
        shutdown()


def _train(cfg: TrainConfig, ctx: DistContext, resume: bool,
           reschedule: bool = False) -> TrainResult:
    inputs = prepare_run(cfg, resume, ctx, reschedule)
    loop = _set_up_loop(cfg, ctx, inputs)
    stop = _StopFlag()
    bar = tqdm(total=cfg.steps, initial=loop.start_step, desc="train", dynamic_ncols=True,
               disable=not (cfg.progress and ctx.is_main), mininterval=1.0)
    t0 = time.perf_counter()
    loss_value, val_loss, stopped, step = math.nan, math.nan, "finished", loop.start_step
    try:
        for step in range(loop.start_step, cfg.steps):
            step_start = time.perf_counter()
            loss_value, grad_norm, aux = _optimizer_step(loop, step)
            if loop.state["bad_in_a_row"] >= cfg.max_bad_steps:
                stopped = "non-finite"
                break
            done = step + 1
            elapsed = time.perf_counter() - t0
            record = _step_record(loop, done, loss_value, grad_norm, aux,
                                  tokens_per_s=loop.tokens_per_step * (done - loop.start_step)
                                  / elapsed, step_seconds=time.perf_counter() - step_start)
            val_loss = record.get("val_loss", val_loss)
            if done % cfg.log_every == 0 or "val_loss" in record:
                loop.logger.log(record)
            _show_progress(bar, record, val_loss)
            stopped = _stop_requested(loop, stop, elapsed)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopped != "finished":
                save_checkpoint(loop.out, done, loop.model, loop.optimizer, dict(loop.state),
                                keep=cfg.keep_checkpoints, extra_files=inputs.extra_files,
                                dist=ctx)
            if stopped != "finished":
                break
    finally:
        bar.close()
        loop.logger.close()
        stop.restore()
    return _finish_run(loop, stopped, step, loss_value, val_loss, time.perf_counter() - t0)


@dataclass
class _Loop:
    """What every step of a run shares, set up once by `_set_up_loop`."""

    cfg: TrainConfig
    ctx: DistContext
    inputs: RunInputs
    out: Path
    device: torch.device
    model: Any  # what the steps run: the HybridLM, under DDP or sharded by FSDP
    plain: HybridLM  # the same model unwrapped (balancing, flops)
    optimizer: torch.optim.Optimizer
    state: dict[str, Any]  # skipped_steps, bad_in_a_row, tokens_seen: saved in checkpoints
    start_step: int
    micro: int  # rows per micro-batch on this rank
    autocast: Any
    logger: MetricsLogger
    loss_causal: bool  # recorded with every step: see warn_if_training_loss_not_causal
    tokens_per_step: int
    peak_flops: float | None
    flops_per_token: float


def _set_up_loop(cfg: TrainConfig, ctx: DistContext, inputs: RunInputs) -> _Loop:
    """Device, run files, wrapping, optimizer, a resumed checkpoint and the metrics log."""
    device = resolve_device(cfg.device, ctx)
    out = Path(cfg.out)
    model = inputs.model.to(device).train()
    if ctx.is_main:  # only now, with every check passed, does the run dir get written
        write_run_files(out, cfg, inputs)
    plain: HybridLM = model
    if ctx.is_main:
        warn_if_training_loss_not_causal(plain, inputs.val_tokens is not None)
    if cfg.activation_checkpointing:
        checkpoint_blocks(model.layers)
    if cfg.compile:
        compile_model(model, ctx.parallel)
    model = wrap(model, ctx, device)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    state = {"skipped_steps": 0, "bad_in_a_row": 0, "tokens_seen": 0}
    start_step = 0
    if inputs.checkpoint is not None:
        state.update(load_checkpoint(inputs.checkpoint, model, optimizer, ctx,
                                     state=inputs.trainer_state))
        start_step = state.pop("step")
    return _Loop(
        cfg=cfg, ctx=ctx, inputs=inputs, out=out, device=device, model=model, plain=plain,
        optimizer=optimizer, state=state, start_step=start_step,
        micro=cfg.per_rank_micro_batch(ctx.world_size),
        autocast=torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"),
        logger=MetricsLogger(out, enabled=ctx.is_main,
                             resume_step=start_step if inputs.checkpoint is not None else None),
        loss_causal=plain.is_causal, tokens_per_step=cfg.global_batch_size * cfg.seq_len,
        peak_flops=_peak_flops(device), flops_per_token=_flops_per_token(plain, cfg.seq_len),
    )


def compile_model(model: HybridLM, parallel: str) -> None:
    """`compile: true`: torch.compile in place (parameter names, so checkpoints, unchanged).

    One graph for the whole model with fullgraph=True: the forward has no host sync and no
    data-dependent shape (tests/test_compile.py), so a graph break is a bug to report, not a
    silent slowdown, and the model needs a few variants only (train, eval, each shape), where
    blocks compiled one by one share one code object and exhaust dynamo's recompile limit
    (8) with a few block kinds. Under FSDP the nested fp32 groups put FSDP's hooks inside the
    blocks, so each block is compiled on its own and may break its graph there.
    """
    if parallel == "fsdp":
        for block in model.layers:
            block.compile()
    else:
        model.compile(fullgraph=True)


def _optimizer_step(loop: _Loop, step: int) -> tuple[float, float, dict[str, Any]]:
    """One optimizer step of the global batch -> (loss over all ranks, grad norm, aux). A
    non-finite loss or gradient skips the update (the data position still moves on)."""
    cfg, ctx, state = loop.cfg, loop.ctx, loop.state
    for group in loop.optimizer.param_groups:
        group["lr"] = cfg.lr * lr_multiplier(step, cfg)
    parts = _micro_batches(loop.inputs.batches.batch(step, ctx.rank, ctx.world_size), loop.micro)
    loss_sum, aux = backward_global_batch(loop.model, parts, ctx, loop.device, loop.autocast)
    limit = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(loop.model.parameters(), limit))
    loss_value = ctx.all_reduce_mean(loss_sum, loop.device)
    if math.isfinite(grad_norm) and math.isfinite(loss_value):
        loop.optimizer.step()
        loop.plain.balance_step(reduce=sum_over_ranks)  # loads summed over ranks
        state["bad_in_a_row"] = 0
    else:  # skip: no update from this batch, but the data position moves on
        state["skipped_steps"] += 1
        state["bad_in_a_row"] += 1
        loop.plain.discard_balance_loads()
    loop.optimizer.zero_grad(set_to_none=True)
    state["tokens_seen"] += loop.tokens_per_step
    return loss_value, grad_norm, aux


def _step_record(loop: _Loop, done: int, loss_value: float, grad_norm: float,
                 aux: dict[str, Any], tokens_per_s: float, step_seconds: float
                 ) -> dict[str, Any]:
    """The metrics of step `done`, with the held-out loss when it is due."""
    cfg = loop.cfg
    record = {"step": done, "loss": loss_value, "lr": loop.optimizer.param_groups[0]["lr"],
              "tokens_per_s": tokens_per_s, "grad_norm": grad_norm,
              "step_seconds": step_seconds, "skipped_steps": loop.state["skipped_steps"],
              "loss_causal": loop.loss_causal, **_router_stats(aux)}
    if loop.peak_flops is not None:
        record["mfu"] = tokens_per_s * loop.flops_per_token / (
            loop.peak_flops * loop.ctx.world_size)
    val_tokens = loop.inputs.val_tokens
    if val_tokens is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
        record["val_loss"] = evaluate(loop.model, val_tokens, cfg.seq_len, loop.micro,
                                      cfg.eval_batches, loop.device, loop.autocast)
    return record


def _show_progress(bar: tqdm, record: dict[str, Any], val_loss: float) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{record['loss']:.3f}", val=f"{val_loss:.3f}",
                    lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                    **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))


def _stop_requested(loop: _Loop, stop: _StopFlag, elapsed: float) -> str:
    """Why to stop after this step: "signal" or "time" when any rank was signalled or the run
    is out of time (every rank agrees, so all stop after the same step), else "finished"."""
    max_minutes = loop.cfg.max_minutes
    timed_out = max_minutes is not None and elapsed > max_minutes * 60
    flag = torch.tensor([float(stop.raised or timed_out)], device=loop.device)
    if loop.ctx.all_reduce_sum(flag).item() > 0:
        return "signal" if stop.raised else "time"
    return "finished"


def _finish_run(loop: _Loop, stopped: str, step: int, loss_value: float, val_loss: float,
                seconds: float) -> TrainResult:
    """Raise after too many non-finite steps; else make the run dir a loadable model dir and
    sum the run up."""
    cfg, state, out = loop.cfg, loop.state, loop.out
    if stopped == "non-finite":
        raise NonFiniteError(
            f"stopped at step {step + 1}: {state['bad_in_a_row']} steps in a row had a "
            f"non-finite loss or gradient (max_bad_steps={cfg.max_bad_steps}); the last good "
            f"checkpoint is {latest_checkpoint(out)}"
        )
    final = latest_checkpoint(out)
    if loop.ctx.is_main and final is not None:  # the run dir itself is a loadable model dir
        copy_final_model(final, out, loop.inputs.extra_files)
    start_step = loop.start_step
    done_steps = step + 1 if stopped != "finished" or cfg.steps > start_step else start_step
    return TrainResult(
        steps=done_steps, train_loss=loss_value, val_loss=val_loss, seconds=seconds,
        tokens_per_s=loop.tokens_per_step * max(0, done_steps - start_step) / max(seconds, 1e-9),
        skipped_steps=state["skipped_steps"], stopped=stopped, out=str(out),
        train_loss_causal=loop.loss_causal,
    )
