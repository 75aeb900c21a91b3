"""`pertvl finetune nli` and `pertvl finetune chexpert`: the handlers (parsers in pertvl.evaluate.cli)."""

from __future__ import annotations

import logging
import sys

from pertvl.evaluate.finetune.chexpert import finetune_chexpert, prepare_chexpert
from pertvl.evaluate.finetune.fit import FitSettings
from pertvl.evaluate.finetune.metrics import format_number
from pertvl.evaluate.finetune.nli import (
    NliCvResult,
    NliFile,
    NliResult,
    cross_validate_nli,
    finetune_nli,
    read_nli,
)
from pertvl.evaluate.finetune.tasks import format_skips
from pertvl.evaluate.report import print_paths, run_info, write_result

log = logging.getLogger(__name__)


# CLI defaults that depend on the mode: (epochs, head_lr) for end-to-end fine-tuning and for a frozen
# encoder. A linear probe on precomputed features costs little per epoch and needs more, larger steps.
FINETUNE_DEFAULTS = {"nli": (3, 1e-3), "chexpert": (5, 1e-3)}
PROBE_DEFAULTS = (30, 1e-2)


def fit_settings(args, task: str) -> FitSettings:
    frozen = bool(args.freeze_encoder or args.export)
    epochs, head_lr = PROBE_DEFAULTS if frozen else FINETUNE_DEFAULTS[task]
    return FitSettings(epochs=args.epochs or epochs, lr=args.lr, head_lr=args.head_lr or head_lr,
                       batch_size=args.batch_size, weight_decay=args.weight_decay, warmup=args.warmup,
                       dropout=args.dropout, seed=args.seed, device=args.device, precision=args.precision,
                       workers=getattr(args, "workers", 0), freeze_encoder=frozen)


def nli_protocol(args) -> str:
    """"train/dev/test", "train/test" or "cv" from the CLI arguments; ValueError for a bad mix."""
    cv = getattr(args, "cv", None)
    if cv is not None:
        if args.dev or args.test:
            raise ValueError("--cv K cross-validates on --train alone; drop --dev/--test (or drop --cv for the "
                             "train/dev/test or train/test protocol)")
        return "cv"
    if not args.test:
        raise ValueError("give --test JSONL (train/test or train/dev/test protocol) or --cv K (cross-validation "
                         "on --train)")
    return "train/dev/test" if args.dev else "train/test"


def nli_cli_main(args) -> int:
    try:
        protocol = nli_protocol(args)
        if args.export and not args.freeze_encoder:
            print("note: --export holds no torch weights: the ONNX encoder stays frozen and a linear probe "
                  "is trained on its embeddings (fine-tuning needs --run)", flush=True)
        info = {**run_info(), **({"dataset": args.dataset} if getattr(args, "dataset", None) else {})}
        common = dict(run=args.run, text_model=args.text_model, export=args.export,
                      settings=fit_settings(args, "nli"), max_length=args.max_length, info=info)
        if protocol == "cv":
            data = read_nli(args.train)
            print(data.describe(), flush=True)
            print(f"protocol: {args.cv}-fold cross-validation on {data.path} (label-stratified, seed {args.seed}; "
                  "last epoch of each fold)", flush=True)

            def on_fold(k: int, train: NliFile, test: NliFile) -> None:
                print(f"fold {k}/{args.cv}: train {len(train.examples)} ("
                      + ", ".join(f"{lab} {n}" for lab, n in train.label_counts().items()) + f"), test "
                      f"{len(test.examples)} (" + ", ".join(f"{lab} {n}" for lab, n in test.label_counts().items())
                      + ")", flush=True)

            result: NliResult | NliCvResult = cross_validate_nli(data, args.cv, seed=args.seed, on_fold=on_fold,
                                                                 **common)
        else:
            train = read_nli(args.train)
            dev = read_nli(args.dev) if args.dev else None
            test = read_nli(args.test)
            for f in (train, dev, test):
                if f is not None:
                    print(f.describe(), flush=True)
            print(f"protocol: {protocol}" + (" (best dev epoch)" if dev else " (last epoch; no dev set)"), flush=True)
            result = finetune_nli(train, dev, test, **common)
    except (FileNotFoundError, ValueError) as e:
        print(f"pertvl finetune nli: {e}", file=sys.stderr)
        return 2
    paths = write_result(result, args.out, args.name or "nli")
    if isinstance(result, NliCvResult):
        print(f"NLI {args.cv}-fold CV: accuracy {100 * result.mean_accuracy:.1f}% ± {100 * result.std_accuracy:.1f} "
              f"(per fold: {', '.join(f'{100 * a:.1f}%' for a in result.fold_accuracies)}); pooled out-of-fold "
              f"accuracy {100 * result.pooled.accuracy:.1f}% (macro F1 {result.pooled.macro_f1:.3f})")
    else:
        dev_part = (f"dev accuracy {100 * result.dev.accuracy:.1f}% (macro F1 {result.dev.macro_f1:.3f}), "
                    if result.dev is not None else "")
        print(f"NLI: {dev_part}test accuracy {100 * result.test.accuracy:.1f}% (macro F1 "
              f"{result.test.macro_f1:.3f}); " + (f"best epoch {result.best_epoch}" if result.dev is not None
                                                  else f"last epoch {result.best_epoch}"))
    print_paths(paths)
    return 0


def chexpert_cli_main(args) -> int:
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    try:
        data = prepare_chexpert(args.csv, args.images, valid_csv=args.valid_csv, labels=labels,
                                uncertain=args.uncertain, blank=args.blank, frontal_only=args.frontal_only,
                                test_fraction=args.test_fraction, seed=args.seed, group_pattern=args.group_pattern,
                                split_from=getattr(args, "split_from", None))
        s = data.summary
        print(f"CheXpert: {s['train_rows']} train / {s['test_rows']} test rows ({s['split']['method']}); left out: "
              f"{format_skips(s['rows_skipped'])}; images missing: {s['images_missing']}", flush=True)
        result = finetune_chexpert(data, args.images, run=args.run, export=args.export, image_size=args.image_size,
                                   settings=fit_settings(args, "chexpert"), info=run_info())
    except (FileNotFoundError, ValueError) as e:
        print(f"pertvl finetune chexpert: {e}", file=sys.stderr)
        return 2
    paths = write_result(result, args.out, args.name or "chexpert")
    scores = ", ".join(f"{k} AUROC {format_number(v.auroc)} acc {format_number(v.accuracy, True)}" for k, v in result.per_label.items())
    print(f"CheXpert: {scores}; mean AUROC {format_number(result.mean_auroc)}; images undecodable "
          f"{result.data['images_undecodable']}")
    print_paths(paths)
    return 0
