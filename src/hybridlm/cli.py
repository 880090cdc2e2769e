"""The `hybridlm` command line.

    hybridlm tokenizer train --input CORPUS --vocab-size 8192 --out tok/
    hybridlm data prepare    --input CORPUS --tokenizer tok/ --out data/
    hybridlm train           --preset tiny --data data/ --steps 300 --out runs/x
    hybridlm generate        --model runs/x --prompt "Once upon a time"
    hybridlm presets
    hybridlm demo            --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import sys

from hybridlm.config import PRESETS


def _parse_override(text: str) -> tuple[str, object]:
    """`key=value` with a JSON value (`routing=zipf` also works for bare strings)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from hybridlm.data import Tokenizer, load_documents, split_documents

    docs = split_documents(load_documents(args.input))["train"]
    tokenizer = Tokenizer.train((d.text for d in docs), vocab_size=args.vocab_size)
    path = tokenizer.save(args.out)
    print(f"trained on {len(docs)} training documents; vocab {tokenizer.vocab_size} -> {path}")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from hybridlm.data import Tokenizer, load_documents, prepare_dataset, split_documents

    tokenizer = Tokenizer.from_file(args.tokenizer)
    splits = split_documents(load_documents(args.input), args.val_fraction, args.test_fraction)
    meta = prepare_dataset(splits, tokenizer, args.out, source=str(args.input))
    print(json.dumps({"out": args.out, "tokens": meta["tokens"], "documents": meta["documents"]}))


def cmd_train(args: argparse.Namespace) -> None:
    from hybridlm.train import TrainConfig, train

    cfg = TrainConfig(
        data=args.data, out=args.out, preset=args.preset, model_overrides=dict(args.set),
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, eval_every=args.eval_every, eval_batches=args.eval_batches,
        max_minutes=args.max_minutes, seed=args.seed, device=args.device,
    )
    result = train(cfg)
    print(json.dumps(vars(result)))


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from hybridlm.data import Tokenizer
    from hybridlm.model import HybridLM

    model = HybridLM.from_pretrained(args.model).eval()
    tokenizer = Tokenizer.from_file(args.model)
    ids = torch.tensor([tokenizer.encode(args.prompt)])
    if ids.numel() == 0:
        raise ValueError("--prompt is empty")
    out = model.generate(
        ids, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id, generator=torch.Generator().manual_seed(args.seed),
    )
    print(tokenizer.decode(out[0].tolist(), skip_special_tokens=True))


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


def cmd_demo(args: argparse.Namespace) -> None:
    from hybridlm.demo import run_demo

    run_demo(args.out, steps=args.steps, max_minutes=args.max_minutes,
             vocab_size=args.vocab_size)


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
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="tokenise a corpus into train/validation/test splits")
    p.add_argument("--input", required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or its directory")
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("train", help="train a model on prepared data")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--out", required=True, help="run directory for the model")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--set", type=_parse_override, action="append", default=[],
                   metavar="FIELD=VALUE", help="override a ModelConfig field (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a trained model directory")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("presets", help="list presets with total and active parameter counts")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("demo", help="prepare the shipped corpus, train the tiny model, sample")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--max-minutes", type=float, default=10.0)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"hybridlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
