"""Downstream fine-tuning (paper §IV, Tables II and III): `pertvl finetune nli` and `pertvl finetune chexpert`.

Modules: tasks.py (schemas, label sets, policies), metrics.py, fit.py (the shared fit loop),
nli.py, chexpert.py, commands.py (the CLI handlers).

NLI (Table III: MedNLI / RadNLI). The pretrained TEXT transformer reads the BERT sentence-pair
input "[CLS] premise [SEP] hypothesis [SEP]": the sentences go to the model's HF tokenizer as
written — no report cleaning (pertvl's clean_text would split "isn't" into "isn t", a lost negation
cue; an uncased tokenizer lowercases by itself) — and pairs longer than `max_length` word pieces
(default 256: MedNLI's longest pairs reach ~200+ pieces) are truncated, counted and reported. A
dropout + linear head on the [CLS] state predicts entailment / contradiction / neutral.
Cross-entropy, AdamW, linear warm-up then linear decay. Protocols (`nli_protocol`):
    train / dev / test   (MedNLI: mli_{train,dev,test}_v1.jsonl) the epoch with the best dev accuracy
                         is kept (ties: the earlier epoch) and evaluated on dev and test;
    train / test         (RadNLI, the authors' protocol: train on radnli_dev_v1.jsonl, test on
                         radnli_test_v1.jsonl; RadNLI ships no training file) the last epoch is
                         evaluated on test (no dev set to select on);
    k-fold CV on one file (`cross_validate_nli`; e.g. RadNLI's 480 dev + 480 test pairs in one file):
                         label-stratified seeded folds, each fold trained from the pretrained
                         encoder on the others and tested on itself (last epoch); accuracy per fold,
                         mean ± std, and the pooled out-of-fold metrics.

CheXpert (Table II: Consolidation, Pleural Effusion). The pretrained IMAGE backbone's pooled
global features (the input of the global projection head) + a dropout + linear multi-label head,
binary cross-entropy over the label cells the policies keep:
    1.0 → target 1;  0.0 → target 0;
    blank (the labeler found no mention) → `blank` policy: "zero" → target 0 (default: CheXpert's
        convention "not mentioned = negative", as the authors' and GLoRIA's code fill blanks with 0)
        | "mask" → out of the loss;
    -1.0 (uncertain) → `uncertain` policy: "zeros" U-Zeros → 0 (default) | "ones" U-Ones → 1 |
        "ignore" U-Ignore → out of the loss | "u-mix" → U-Ones for Edema and Atelectasis, U-Zeros
        for every other label (the per-label mix of the CheXpert authors, Irvin et al. 2019 §4).
At test time 1/0 cells are scored, blank cells as negatives under blank "zero" (excluded under
"mask"), uncertain cells never. Frontal views only by default (the paper's setting). Without --valid-csv the CSV
is split into train/test by patient (seeded), so no patient is on both sides. The last epoch is
evaluated (there is no separate dev set to select on; selecting on the test set would be cheating).

Where the encoder comes from:
    --run RUN_DIR      RUN_DIR/final (DualEncoder.save_pretrained) with torch: fine-tuned end to end,
                       or frozen with --freeze-encoder (a linear probe on the encoder's features).
    --text-model PATH  (nli only) a plain Hugging Face model folder, e.g. the offline MiniLM: the
                       not-pretrained baseline of Table III.
    --export DIR       an ONNX export (pertvl export). It holds no torch weights, so it cannot be
                       fine-tuned: the encoder is frozen and the head is a linear probe on the
                       export's L2-normalized global embeddings (nli: [u, v, |u-v|, u*v] of premise u
                       and hypothesis v, the InferSent / Sentence-BERT pair features; chexpert: the
                       image embedding), computed with onnxruntime.
When the encoder is frozen, features are computed once, standardized with the training set's
mean/std, and the head trains on them (the CLI then defaults to 30 epochs at head lr 1e-2).

Outputs in --out: NAME.json (schema pertvl-finetune-nli/1 or pertvl-finetune-chexpert/1), NAME.md,
and the per-item predictions (NAME.predictions.jsonl / NAME.predictions.csv) for any other metric.
Bad input never stops a run silently: a bad NLI line or CSV row is skipped, counted by reason and
named (file:line); a missing image is skipped, counted and named before training, an undecodable
one when it is first read (a train image that only ever fell into the dropped ragged last batch
is never read, so never counted).
"""

from pertvl.evaluate.finetune.chexpert import (
    DEFAULT_GROUP_PATTERN,
    VIEW_COLUMN,
    ChexpertData,
    ChexpertResult,
    ChexpertRow,
    ChexpertTable,
    ImageProblems,
    chexpert_targets,
    finetune_chexpert,
    group_of,
    prepare_chexpert,
    read_chexpert_csv,
    split_by_group,
)
from pertvl.evaluate.finetune.commands import (
    FINETUNE_DEFAULTS,
    PROBE_DEFAULTS,
    chexpert_cli_main,
    fit_settings,
    nli_cli_main,
    nli_protocol,
)
from pertvl.evaluate.finetune.fit import (
    EpochLog,
    FitSettings,
    fit,
    standardize,
)
from pertvl.evaluate.finetune.metrics import (
    ClassificationMetrics,
    ClassScores,
    LabelScores,
    classification_metrics,
    multilabel_scores,
)
from pertvl.evaluate.finetune.nli import (
    NLI_MAX_LENGTH,
    NliCvResult,
    NliExample,
    NliFile,
    NliResult,
    cross_validate_nli,
    finetune_nli,
    nli_folds,
    nli_truncation,
    read_nli,
)
from pertvl.evaluate.finetune.tasks import (
    BLANK_POLICIES,
    CHEXPERT_LABELS,
    CHEXPERT_SCHEMA,
    MAX_LISTED_PROBLEMS,
    NLI_CV_SCHEMA,
    NLI_LABELS,
    NLI_SCHEMA,
    PAPER_CHEXPERT_LABELS,
    U_MIX_ONES,
    UNCERTAIN_NAMES,
    UNCERTAIN_POLICIES,
)

__all__ = [
    "BLANK_POLICIES",
    "CHEXPERT_LABELS",
    "CHEXPERT_SCHEMA",
    "ChexpertData",
    "ChexpertResult",
    "ChexpertRow",
    "ChexpertTable",
    "ClassScores",
    "ClassificationMetrics",
    "DEFAULT_GROUP_PATTERN",
    "EpochLog",
    "FINETUNE_DEFAULTS",
    "FitSettings",
    "ImageProblems",
    "LabelScores",
    "MAX_LISTED_PROBLEMS",
    "NLI_CV_SCHEMA",
    "NLI_LABELS",
    "NLI_MAX_LENGTH",
    "NLI_SCHEMA",
    "NliCvResult",
    "NliExample",
    "NliFile",
    "NliResult",
    "PAPER_CHEXPERT_LABELS",
    "PROBE_DEFAULTS",
    "UNCERTAIN_NAMES",
    "UNCERTAIN_POLICIES",
    "U_MIX_ONES",
    "VIEW_COLUMN",
    "chexpert_cli_main",
    "chexpert_targets",
    "classification_metrics",
    "cross_validate_nli",
    "finetune_chexpert",
    "finetune_nli",
    "fit",
    "fit_settings",
    "group_of",
    "multilabel_scores",
    "nli_cli_main",
    "nli_folds",
    "nli_protocol",
    "nli_truncation",
    "prepare_chexpert",
    "read_chexpert_csv",
    "read_nli",
    "split_by_group",
    "standardize",
]
