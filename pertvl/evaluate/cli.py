"""`pertvl eval NAME` for every evaluation of pertvl.evaluate.catalog, `pertvl finetune`, `pertvl
ablate` and `pertvl report`. The encoder: an ONNX export (--export), a torch run (--run) or, for
text-only evaluations, a plain HF text model (--text-model)."""

from __future__ import annotations

import argparse

from pertvl.cli import lazy_handler, positive_int, with_out_lock
from pertvl.evaluate.evaluation import add_chexpert_image_arguments, non_negative


def _build_encoder(args: argparse.Namespace):
    """The Encoder named by --export / --run / --text-model, and a description for the result's info."""
    if args.export:
        from pertvl.infer import Embedder

        return Embedder.from_export(args.export, batch_size=args.batch_size), {"encoder": "onnx", "export": str(args.export)}
    if args.run:
        from pertvl.evaluate.torch_encoder import TorchEncoder

        enc = TorchEncoder.from_run(args.run, device=args.device, batch_size=args.batch_size)
        return enc, {"encoder": "torch", "run": str(args.run), "device": str(enc.device)}
    from pertvl.evaluate.torch_encoder import HFTextEncoder

    enc = HFTextEncoder(args.text_model, pooling=args.pooling, device=args.device, batch_size=args.batch_size)
    return enc, {"encoder": "hf-text", "text_model": str(args.text_model), "pooling": args.pooling}


def _samples(args: argparse.Namespace):
    import itertools

    from pertvl.data.shards import iter_samples

    samples = iter_samples(args.shards, args.split)
    return itertools.islice(samples, args.limit) if args.limit else samples


def _info(args: argparse.Namespace, encoder_info: dict) -> dict:
    from pertvl.evaluate.report import run_info

    info = {**encoder_info, **run_info()}
    if getattr(args, "shards", None):
        info.update(shards=str(args.shards), split=args.split)
    if getattr(args, "limit", None):
        info["limit"] = args.limit
    return info


@with_out_lock
def _evaluate(args: argparse.Namespace) -> int:
    """`pertvl eval NAME`: load the data, build the encoder, run, write NAME.json/.md (+ figures)."""
    from pertvl.evaluate.catalog import EVALUATIONS
    from pertvl.evaluate.report import print_paths, write_result

    evaluation = EVALUATIONS[args.evaluation]
    data = evaluation.load(args) if evaluation.load is not None else None
    if data is None and evaluation.shards:
        if not args.shards:
            raise SystemExit(f"pertvl eval {evaluation.name}: give --shards DIR (or this evaluation's own data "
                             "option, see --help)")
        data = _samples(args)
    encoder, enc_info = _build_encoder(args)
    result = evaluation.run(encoder, data, args)
    result.info = {**_info(args, enc_info), **result.info}  # provenance first, the evaluation's own after
    paths = write_result(result, args.out, args.name or evaluation.key)
    print(result.headline())
    print_paths(paths)
    return 0


_finetune_nli = lazy_handler("pertvl.evaluate.finetune.nli", "nli_cli_main")
_finetune_chexpert = lazy_handler("pertvl.evaluate.finetune.chexpert", "chexpert_cli_main")
_ablate = lazy_handler("pertvl.evaluate.ablate", "cli_main", lock_out=True)
_curves = lazy_handler("pertvl.evaluate.curves", "cli_main")


def _model_args(p: argparse.ArgumentParser, text_model: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--export", metavar="DIR", help="ONNX export folder (pertvl export), run on onnxruntime")
    g.add_argument("--run", metavar="RUN_DIR", help="training run folder; loads RUN_DIR/final with torch")
    if text_model:
        g.add_argument("--text-model", metavar="PATH",
                       help="a plain Hugging Face text model folder (untrained baseline), e.g. the offline MiniLM")
        p.add_argument("--pooling", choices=["mean", "cls"], default="mean",
                       help="pooling of --text-model token states (default: mean)")
    p.add_argument("--device", default="auto", help="torch device for --run/--text-model: auto|cpu|cuda[:N] (default auto)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images/texts per encoder call (default 32)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the JSON, Markdown and PNG outputs")
    p.add_argument("--name", help="file stem of the outputs (default: the evaluation's name)")


def _shard_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--shards", required=required, metavar="DIR",
                   help="shard folder (pertvl pack), e.g. shards/demo" + ("" if required else " (or the data option below)"))
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate (default test)")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N samples (quick checks)")


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 (folds), got {text}")
    return value


def _dataset_name(text: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '_', '.', '-' (a metric key part), got {text!r}")
    return text


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def _finetune_args(p: argparse.ArgumentParser, *, epochs: int, lr: float, batch_size: int) -> None:
    p.add_argument("--epochs", type=positive_int,
                   help=f"training epochs (default {epochs}; 30 with a frozen encoder or --export)")
    p.add_argument("--lr", type=float, default=lr, help=f"encoder learning rate, AdamW (default {lr:g})")
    p.add_argument("--head-lr", type=float,
                   help="learning rate of the new head (default 1e-3; 1e-2 with a frozen encoder or --export)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"batch size (default {batch_size})")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on weight matrices (0.01)")
    p.add_argument("--warmup", type=_fraction, default=0.1, help="linear warm-up fraction of the steps (0.1)")
    p.add_argument("--dropout", type=_fraction, default=0.1, help="dropout before the head (0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the head, shuffling and dropout (and the split) (0)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="keep the pretrained encoder frozen and train the head only (linear probe)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda[:N] (default auto)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="fp32, or bf16/fp16 autocast (default fp32)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for NAME.json and NAME.md")
    p.add_argument("--name", help="file stem of the outputs (default: the task's name)")


def register(sub: argparse._SubParsersAction) -> None:
    _register_finetune(sub)
    _register_report(sub)
    ev = sub.add_parser(
        "eval",
        help="evaluate an export or checkpoint: structure, retrieval, zero-shot, text-structure, grounding",
        description="Evaluate pretrained encoders (ONNX export or torch run) on a shard split.")
    esub = ev.add_subparsers(dest="eval_command", metavar="EVALUATION", required=True)
    from pertvl.evaluate.catalog import EVALUATIONS

    for evaluation in EVALUATIONS.values():
        p = esub.add_parser(evaluation.name, help=evaluation.help, description=evaluation.description)
        _model_args(p, text_model=evaluation.text_only)
        if evaluation.shards:
            _shard_args(p, required=evaluation.load is None)
        evaluation.add_arguments(p)
        p.set_defaults(handler=_evaluate, evaluation=evaluation.name)


def _register_finetune(sub: argparse._SubParsersAction) -> None:
    """`pertvl finetune {nli,chexpert}` and `pertvl ablate`."""
    ft = sub.add_parser(
        "finetune", help="downstream fine-tuning: NLI (MedNLI/RadNLI, Table III) and CheXpert (Table II)",
        description="Fine-tune a pretrained encoder (or probe an ONNX export) on a downstream task.")
    fsub = ft.add_subparsers(dest="finetune_command", metavar="TASK", required=True)

    p = fsub.add_parser(
        "nli",
        help="text encoder + classification head on MedNLI/RadNLI jsonl (sentence1, sentence2, gold_label)",
        description="Sentence-pair classification (entailment/contradiction/neutral): --train --dev --test "
        "(best dev epoch), --train --test (last epoch) or --train --cv K; the protocols: docs/FINETUNE.md.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", metavar="RUN_DIR", help="training run folder; fine-tunes RUN_DIR/final's text tower")
    g.add_argument("--export", metavar="DIR", help="ONNX export: linear probe on [u, v, |u-v|, u*v] embeddings")
    g.add_argument("--text-model", metavar="PATH", help="a plain Hugging Face model folder (not-pretrained baseline)")
    p.add_argument("--train", required=True, metavar="JSONL",
                   help="training file (with --cv: the one file to cross-validate on)")
    p.add_argument("--dev", metavar="JSONL",
                   help="dev file for epoch selection (without it the last epoch is scored)")
    p.add_argument("--test", metavar="JSONL",
                   help="test file, e.g. mli_test_v1.jsonl or radnli_test_v1.jsonl (required unless --cv)")
    p.add_argument("--cv", type=_at_least_two, metavar="K",
                   help="K-fold label-stratified cross-validation on --train alone")
    p.add_argument("--max-length", type=positive_int, default=256,
                   help="word pieces per sentence pair; longer pairs are truncated and counted (default 256)")
    p.add_argument("--dataset", type=_dataset_name, metavar="NAME",
                   help="data set name (MedNLI, RadNLI, phantom) of the metric keys nli/DATASET/...")
    _finetune_args(p, epochs=3, lr=2e-5, batch_size=16)
    p.set_defaults(handler=_finetune_nli)

    p = fsub.add_parser(
        "chexpert",
        help="image encoder + multi-label head on a CheXpert-format CSV (Consolidation, Pleural Effusion)",
        description="Multi-label fine-tune (or --export linear probe) of the image tower, scored by AUROC and "
        "accuracy per label; the policies: docs/FINETUNE.md.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", metavar="RUN_DIR", help="training run folder; fine-tunes RUN_DIR/final's image tower")
    g.add_argument("--export", metavar="DIR", help="ONNX export: linear probe on its image embeddings")
    p.add_argument("--csv", required=True, help="CheXpert-format CSV (train.csv; the phantom corpus' labels.csv)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--valid-csv", metavar="CSV",
                       help="test on this CSV (e.g. CheXpert valid.csv); default: a seeded split of --csv by patient")
    split.add_argument("--split-from", metavar="PAIRS_JSONL",
                       help="split --csv as this pairs.jsonl splits its images (train trains, val and test test)")
    p.add_argument("--images", required=True, metavar="ROOT", help="folder the CSV's Path column is relative to")
    p.add_argument("--labels", default="Consolidation,Pleural Effusion",
                   help='comma-separated label columns (default "Consolidation,Pleural Effusion")')
    p.add_argument("--uncertain", choices=["zeros", "ones", "ignore", "u-mix"], default="zeros",
                   help="uncertain (-1) training labels: U-Zeros, U-Ones, U-Ignore or u-mix (default zeros)")
    add_chexpert_image_arguments(p)
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of patients held out for test without --valid-csv (default 0.2)")
    p.add_argument("--group-pattern", default=r"(?:^|/)(patient\d+|p\d{8})(?=/)",
                   help="regex whose first group is the patient in a Path (split unit); no match: the image itself")
    p.add_argument("--workers", type=non_negative, default=2, help="image decoding processes (default 2)")
    _finetune_args(p, epochs=5, lr=1e-4, batch_size=32)
    p.set_defaults(handler=_finetune_chexpert)

    p = sub.add_parser(
        "ablate",
        help="the four loss configurations (+ variants) x seeds: train, evaluate, fine-tune, comparison table",
        description="Train every preset (and --variant) per seed, make Tables II, III and IV of each run and "
        "the comparison table (mean +- std over seeds); finished stages are skipped on re-run.")
    p.add_argument("--config", default="configs/demo.yaml", help="training config (default configs/demo.yaml)")
    p.add_argument("--shards", default="shards/demo", help="shard folder (default shards/demo)")
    p.add_argument("--presets", help="comma-separated loss presets (default: the built-in ones, "
                   "convirt,gloria,no_local,full; pertvl.losses.LOSS_PRESETS)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--max-steps", type=positive_int, help="override the config's training steps")
    p.add_argument("--nproc", type=positive_int, default=2, help="training ranks per run (default 2)")
    p.add_argument("--eval-with", choices=["torch", "export"], default="torch",
                   help="evaluate each run from its torch weights (default) or from an ONNX export of it")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="evaluation split (test)")
    p.add_argument("--bootstrap", type=non_negative, default=1000,
                   help="bootstrap resamples of the structure CIs")
    p.add_argument("--no-wandb", action="store_true", help="train without the W&B offline run")
    p.add_argument("--out", default="runs/ablate", help="folder of the runs and the table (default runs/ablate)")
    p.add_argument("--force", action="store_true", help="re-run every stage")
    p.add_argument("--holdout-type", action="append", metavar="T",
                   help="leave-one-type-out: retrain the L_pert presets without type T and write "
                   "OUT/holdout.{md,json} (repeatable, comma-separated, or `all`)")
    p.add_argument("--variant", action="append", metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="one more row NAME trained with `pertvl train --set KEY=VALUE` (repeatable; "
                   "docs/FINETUNE.md)")
    p.add_argument("--tables", default="II,III,IV",
                   help="the paper's tables to make per run (default II,III,IV)")
    p.add_argument("--corpus", metavar="DIR",
                   help="the phantom corpus of Tables II/III (default: the folder of the shards' pairs)")
    for option, table, tower, epochs in (("--chexpert-finetune", "II", "image", 5), ("--nli-finetune", "III", "text", 3)):
        p.add_argument(option, metavar="MODE[:EPOCHS]",
                       help=f"Table {table}: probe (frozen {tower} tower, default) or end-to-end, optionally "
                       f":EPOCHS (default 30 for a probe, {epochs} end to end)")
    p.add_argument("--mednli", metavar="DIR",
                   help="Table III also on MedNLI: DIR holds mli_{train,dev,test}_v1.jsonl")
    p.add_argument("--radnli", metavar="DIR",
                   help="Table III also on RadNLI: DIR holds radnli_{dev,test}_v1.jsonl")
    p.set_defaults(handler=_ablate)


def _register_report(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("report", help="figures over training runs: learning curves of train.eval_every",
                         description="Reports drawn from training run folders.")
    rsub = rep.add_subparsers(dest="report_command", metavar="REPORT", required=True)
    p = rsub.add_parser(
        "curves",
        help="learning curves: the eval/… metrics of runs trained with train.eval_every, one line per run",
        description="The in-training evaluations of each run against optimizer steps, in OUT/curves.png, "
        "curves.json and curves.md.")
    p.add_argument("runs", nargs="+", metavar="[LABEL=]RUN",
                   help="training run folders; LABEL= names the line (default: the folder's name)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for curves.png, curves.json, curves.md")
    p.set_defaults(handler=_curves)
