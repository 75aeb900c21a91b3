"""What the two fine-tunes share: result schemas, label sets, label policies, the problem-list
limit, and how skip counts print."""

from __future__ import annotations

NLI_SCHEMA = "pertvl-finetune-nli/1"
NLI_CV_SCHEMA = "pertvl-finetune-nli-cv/1"
NLI_LABELS = ("entailment", "contradiction", "neutral")
CHEXPERT_SCHEMA = "pertvl-finetune-chexpert/1"
CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices")
PAPER_CHEXPERT_LABELS = ("Consolidation", "Pleural Effusion")
UNCERTAIN_POLICIES = ("zeros", "ones", "ignore", "u-mix")
UNCERTAIN_NAMES = {"zeros": "U-Zeros", "ones": "U-Ones", "ignore": "U-Ignore",
                   "u-mix": "U-mix (U-Ones for Edema and Atelectasis, U-Zeros otherwise)"}
U_MIX_ONES = ("Edema", "Atelectasis")  # the labels "u-mix" maps uncertain to 1; U-Zeros for the others
BLANK_POLICIES = ("zero", "mask")
MAX_LISTED_PROBLEMS = 1000  # problems named in the JSON; all are counted


def format_skips(skipped: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in skipped.items()) or "none"
