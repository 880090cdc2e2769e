"""The `hybridlm` command line.

    hybridlm tokenizer train --input CORPUS --vocab-size 8192 --out tok/
    hybridlm data prepare    --input CORPUS --tokenizer tok/ --out data/
    hybridlm train           --preset tiny --data data/ --steps 300 --out runs/x [--resume]
    torchrun --nproc_per_node=2 -m hybridlm.train --config run.yaml --parallel ddp
    hybridlm plot            runs/x
    hybridlm sft             --model runs/x --data chats.jsonl --out runs/x-sft --steps 200
    hybridlm generate        --model runs/x --prompt "Once upon a time"
    hybridlm serve           --model runs/x --port 8000
    hybridlm convert         --from-hf HF_DIR --out runs/x   (or --to-hf runs/x --out HF_DIR)
    hybridlm presets
    hybridlm demo            --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hybridlm.config import PRESETS
from hybridlm.errors import run_reporting_errors
from hybridlm.train.command import add_train_arguments, run_sft_command, run_train_command


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from hybridlm.data import Tokenizer, load_documents, split_documents
    from hybridlm.data.tokenizer import check_vocab_size

    check_vocab_size(args.vocab_size)  # before reading a corpus that may be large
    as_file = claim_tokenizer_out(args.out, args.input, args.overwrite)
    docs = split_documents(load_documents(args.input))["train"]
    tokenizer = Tokenizer.train((d.text for d in docs), vocab_size=args.vocab_size)
    path = save_tokenizer_out(tokenizer, args.out, as_file)
    print(f"trained on {len(docs)} training documents; vocab {tokenizer.vocab_size} -> {path}")


def claim_tokenizer_out(out: str, corpus: str, overwrite: bool) -> bool:
    """Check `tokenizer train --out` before training (hybridlm.outputs); True when it names a
    .json file rather than a directory."""
    from hybridlm.outputs import TOKENIZER, claim_file_output, claim_output

    if Path(out).suffix == ".json":  # the rule of Tokenizer.save
        claim_file_output(out, overwrite=overwrite, inputs={"--input": corpus})
        return True
    claim_output(out, TOKENIZER, overwrite=overwrite, inputs={"--input": corpus})
    return False


def save_tokenizer_out(tokenizer, out: str, as_file: bool) -> Path:
    """A tokenizer directory is written whole beside --out and moved into place."""
    from hybridlm.outputs import staged_dir

    if as_file:
        return tokenizer.save(out)
    with staged_dir(out, replace=True) as staging:
        name = tokenizer.save(staging).name
    return Path(out) / name


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from hybridlm.data import prepare_corpus

    meta = prepare_corpus(
        args.input, args.tokenizer, args.out, workers=args.workers,
        shard_tokens=args.shard_tokens, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, overwrite=args.overwrite,
    )
    print(json.dumps({"out": args.out, "tokens": meta["tokens"], "documents": meta["documents"],
                      "shards": meta["shards"]}))


def cmd_plot(args: argparse.Namespace) -> None:
    from hybridlm.train.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from hybridlm.data import Tokenizer
    from hybridlm.infer.generate import check_sampling_args
    from hybridlm.model import HybridLM

    # Refuse bad flags before loading a model that may take a while.
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed {args.seed} must lie in [0, 2**64)")
    try:  # bytes that are not UTF-8 reach argv as lone surrogates, which no tokenizer takes
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("--prompt holds bytes that are not UTF-8 text (is the terminal set "
                         "to another encoding?)") from None
    model = HybridLM.from_pretrained(args.model).eval()
    tokenizer = Tokenizer.from_file(args.model)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"{args.model}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {model.config.vocab_size}: the tokenizer.json there is not the one "
            "the model was trained with"
        )
    stop_strings = None
    if args.chat:  # render the prompt as a user turn with the model's chat template
        from hybridlm.chat import ChatTemplate

        template = ChatTemplate.load(args.model)
        prompt_ids = template.render_prompt([{"role": "user", "content": args.prompt}],
                                            tokenizer)
        stop_strings = template.stop_strings()  # the reply ends before any next turn
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("--prompt is empty")
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id, generator=torch.Generator().manual_seed(args.seed),
        stop_strings=stop_strings, tokenizer=tokenizer,
    )
    if args.chat:
        from hybridlm.infer.generate import cut_at_stop_strings

        reply = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        print(cut_at_stop_strings(reply, stop_strings))
    else:
        print(tokenizer.decode(out[0].tolist(), skip_special_tokens=True))


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from hybridlm.serve.cli import load_engine, run_server
    except ModuleNotFoundError as err:
        if err.name not in ("fastapi", "uvicorn", "pydantic", "starlette"):
            raise
        raise ValueError(f"serving needs {err.name}, which is not installed: "
                         "pip install 'hybridlm[serve]'") from None
    engine, name, template = load_engine(args.model, args.max_batch, args.device,
                                         args.queue_timeout, args.dtype, args.compile)
    run_server(uvicorn, engine, name, template, args.host, args.port, args.api_key)


def preset_parameter_counts(name: str) -> tuple[int, int]:
    """(total, active) parameters of a preset, built on the meta device (no memory used)."""
    import torch

    from hybridlm.config import ModelConfig
    from hybridlm.model import HybridLM

    with torch.device("meta"):
        model = HybridLM(ModelConfig.from_preset(name))
    return model.num_parameters(), model.num_parameters(active=True)


def cmd_presets(args: argparse.Namespace) -> None:
    from hybridlm.config import ModelConfig

    print(f"{'preset':<24} {'layers':>6} {'hidden':>6} {'mixers':>10} {'total params':>15} "
          f"{'active':>15}")
    for name in sorted(PRESETS):
        config = ModelConfig.from_preset(name)
        total, active = preset_parameter_counts(name)
        print(f"{name:<24} {config.num_hidden_layers:>6} {config.hidden_size:>6} "
              f"{config.mixer_pattern:>10} {total:>15,} {active:>15,}")


def cmd_convert(args: argparse.Namespace) -> None:
    from hybridlm.convert import convert_from_hf, convert_to_hf

    if args.from_hf is not None:
        print(convert_from_hf(args.from_hf, args.out, overwrite=args.overwrite))
    else:
        print(convert_to_hf(args.to_hf, args.out, overwrite=args.overwrite))


def cmd_demo(args: argparse.Namespace) -> None:
    from hybridlm.demo import run_demo

    run_demo(args.out, steps=args.steps, max_minutes=args.max_minutes,
             vocab_size=args.vocab_size, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(
        dest="action", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE on a corpus's training split")
    p.add_argument("--input", required=True, help=".jsonl[.xz], .txt, or a directory of them")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", required=True, help="tokenizer.json path or a directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a tokenizer already at --out (written whole, then swapped in)")
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="tokenise corpus files into train/validation/test shards")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="one or more .jsonl, .jsonl.xz or .txt files, or directories of them")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or its directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default: min(4, CPU cores))")
    p.add_argument("--shard-tokens", type=int, default=2**27,
                   help="most tokens per shard file (default: 2**27)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.add_argument("--overwrite", action="store_true",
                   help="replace prepared data of other inputs or settings at --out (written "
                        "whole, then swapped in); unchanged inputs are never prepared again")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("train", help="train (or --resume) a model on prepared data")
    add_train_arguments(p)
    p.set_defaults(func=run_train_command)

    p = sub.add_parser("sft", help="fine-tune a model directory on prompt/response or chat jsonl")
    p.add_argument("--model", required=True, help="model directory to start from")
    add_train_arguments(p)
    p.set_defaults(func=run_sft_command)

    p = sub.add_parser("plot", help="write PNG plots of a run's metrics into RUN_DIR/plots")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("generate", help="sample text from a trained model directory")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template; print only the reply "
                        "(which ends at eos or before the next role marker)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a model directory over an OpenAI-compatible HTTP API")
    p.add_argument("--model", required=True, help="model directory (with its tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: loopback only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the /v1 routes")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights and caches (auto: bfloat16 on a GPU that has it, else float32)")
    p.add_argument("--compile", action="store_true",
                   help="compile the CUDA-graph decode step (torch.compile; --device cuda)")
    p.add_argument("--queue-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a request that finds no free cache row within this long gets a 503 "
                        "(default 60)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="convert an HF transformers checkpoint (Llama, Qwen3, "
                       "Mixtral, Mamba) to a hybridlm model directory, or back")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="DIR", help="HF checkpoint directory to read")
    direction.add_argument("--to-hf", metavar="DIR", help="hybridlm model directory to read")
    p.add_argument("--out", required=True, help="directory to write (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model directory already at --out (written whole, then "
                        "swapped in)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("presets", help="list presets with total and active parameter counts")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("demo", help="prepare the shipped corpus, train the tiny model, sample")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--max-minutes", type=float, default=9.0)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--overwrite", action="store_true",
                   help="train OUT/model again, replacing an earlier demo's model once done")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    return run_reporting_errors(args.func, args, name)


if __name__ == "__main__":
    sys.exit(main())
