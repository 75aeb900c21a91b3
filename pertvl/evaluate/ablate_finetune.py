"""The fine-tunes `pertvl ablate` runs on every run: Table II (`pertvl finetune chexpert` on the
corpus' labels.csv, split as its pairs.jsonl) and Table III (`pertvl finetune nli` on the corpus'
nli_*.jsonl, and MedNLI / RadNLI when given). The corpus defaults to the shards' `inputs.pairs` folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# What each table of the paper is here; IV is the ABLATE suite of pertvl.evaluate.catalog.
TABLES = {
    "II": "CheXpert-style fine-tuning of the image tower (`pertvl finetune chexpert`)",
    "III": "NLI fine-tuning of the text tower (`pertvl finetune nli`)",
    "IV": "the evaluations of the ablate suite (structure = Table IV, with retrieval, zero-shot, grounding)"}

MODES = ("probe", "end-to-end")

# The official file names of the user data sets (docs/FINETUNE.md): (train, dev or None, test).
USER_NLI = {
    "MedNLI": ("mli_train_v1.jsonl", "mli_dev_v1.jsonl", "mli_test_v1.jsonl"),
    "RadNLI": ("radnli_dev_v1.jsonl", None, "radnli_test_v1.jsonl"),  # the authors' protocol: train on dev
}


@dataclass(frozen=True)
class FinetuneMode:
    """How a table's fine-tune trains: a linear probe on the frozen tower or end to end, for `epochs`
    (None: `pertvl finetune`'s default for the mode)."""

    mode: str = "probe"
    epochs: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"fine-tune mode: expected one of {MODES}, got {self.mode!r}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"fine-tune epochs: expected >= 1, got {self.epochs}")

    def args(self) -> list[str]:
        return [*(["--freeze-encoder"] if self.mode == "probe" else []),
                *(["--epochs", str(self.epochs)] if self.epochs else [])]

    def describe(self, task: str) -> str:
        """"a linear probe on the frozen tower, 30 epochs" (task: "chexpert" or "nli", for the default epochs)."""
        from pertvl.evaluate.finetune.fit import FINETUNE_DEFAULTS, PROBE_DEFAULTS

        epochs = self.epochs or (PROBE_DEFAULTS if self.mode == "probe" else FINETUNE_DEFAULTS[task])[0]
        what = "a linear probe on the frozen tower" if self.mode == "probe" else "fine-tuned end to end"
        return f"{what}, {epochs} epochs"


# The defaults of `pertvl ablate` (measured cost: docs/FINETUNE.md, "In `pertvl ablate`").
DEFAULT_MODES = {"II": FinetuneMode("probe"), "III": FinetuneMode("probe")}


def parse_mode(text: str, option: str) -> FinetuneMode:
    """"probe", "end-to-end", "probe:20" (MODE[:EPOCHS]) → FinetuneMode; ValueError naming the option."""
    mode, _, epochs = text.partition(":")
    try:
        return FinetuneMode(mode.strip(), int(epochs) if epochs.strip() else None)
    except ValueError as e:
        raise ValueError(f"{option} {text!r}: expected MODE[:EPOCHS] with MODE one of {', '.join(MODES)} "
                         f"({e})") from None


@dataclass(frozen=True)
class FinetuneSpec:
    """One fine-tune of every run: RUN/finetune/STEM.json from `pertvl ARGV --run RUN --seed SEED ...`."""

    stem: str
    table: str  # "II" or "III"
    argv: tuple[str, ...]
    inputs: tuple[Path, ...]  # files whose sha256 are part of the stage's parameters

    def command(self, run_dir: Path, out: Path, seed: int) -> list[str]:
        return [*self.argv, "--run", str(run_dir), "--out", str(out), "--name", self.stem, "--seed", str(seed)]


def corpus_from_manifest(shards: str | Path) -> Path | None:
    """The folder of the pairs file the shards were packed from (manifest `inputs.pairs`), if recorded."""
    manifest = Path(shards) / "manifest.json"
    try:
        pairs = (json.loads(manifest.read_text(encoding="utf-8")).get("inputs") or {}).get("pairs")
    except (OSError, json.JSONDecodeError):
        return None
    return Path(pairs).parent if pairs else None


def _need(folder: Path, names: list[str], option: str, why: str) -> list[Path]:
    paths = [folder / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{option} {folder}: missing {', '.join(missing)} ({why})")
    return paths


def finetune_specs(tables: tuple[str, ...], corpus: Path | None, shards: str, modes: dict[str, FinetuneMode],
                   user_nli: dict[str, str | None]) -> list[FinetuneSpec]:
    """The fine-tunes of the chosen tables with their input files checked; FileNotFoundError / ValueError
    naming the missing file and the option to give."""
    if not {"II", "III"} & set(tables):
        return []
    corpus = Path(corpus) if corpus else corpus_from_manifest(shards)
    if corpus is None:
        raise ValueError(f"Tables II/III need the phantom corpus folder (labels.csv, pairs.jsonl, nli_*.jsonl) and "
                         f"{Path(shards) / 'manifest.json'} records no source pairs (inputs.pairs): give --corpus DIR, "
                         f"or --tables IV")
    specs = []
    if "II" in tables:
        labels, pairs = _need(corpus, ["labels.csv", "pairs.jsonl"], "--corpus",
                              "Table II reads labels.csv and splits it as pairs.jsonl: `pertvl data phantom` writes "
                              "both; or leave II out of --tables")
        specs.append(FinetuneSpec("chexpert", "II", (
            "finetune", "chexpert", "--csv", str(labels), "--images", str(corpus), "--split-from", str(pairs),
            *modes["II"].args()), (labels, pairs)))
    if "III" in tables:
        files = _need(corpus, ["nli_train.jsonl", "nli_dev.jsonl", "nli_test.jsonl"], "--corpus",
                      "Table III reads the phantom NLI set: `pertvl data phantom --nli`; or leave III out of --tables")
        specs.append(_nli_spec("phantom", files[0], files[1], files[2], modes["III"]))
        for name, (train, dev, test) in USER_NLI.items():
            folder = user_nli.get(name)
            if folder:
                names = [n for n in (train, dev, test) if n]
                found = _need(Path(folder), names, f"--{name.lower()}", f"the official {name} file names")
                by_name = dict(zip(names, found, strict=True))
                specs.append(_nli_spec(name, by_name[train], by_name.get(dev), by_name[test], modes["III"]))
    return specs


def _nli_spec(dataset: str, train: Path, dev: Path | None, test: Path, mode: FinetuneMode) -> FinetuneSpec:
    argv = ["finetune", "nli", "--train", str(train), *(["--dev", str(dev)] if dev else []), "--test", str(test),
            "--dataset", dataset, *mode.args()]
    return FinetuneSpec(f"nli_{dataset.lower()}", "III", tuple(argv), tuple(p for p in (train, dev, test) if p))
