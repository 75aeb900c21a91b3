"""Benchmark P2: one full training step, pertvl's dual encoder vs the authors' design.

    python bench/bench_step.py [--quick] [--batch 16] [--image-size 224] [--reps N] [--reports CSV]

Same batch, encoders (resnet-tiny + the offline MiniLM), losses (PretrainLoss "full") and SGD step;
only the design differs. pertvl: one ResNet pass (global + regions) and ONE packed text pass over
the originals and their valid perturbations. authors: a second ResNet for the local branch and
eleven text passes (originals, each of the nine perturbation types whether it exists or not, the
originals again for the word features). Both give the same eval-mode loss (checked before timing).
The batch: random Open-I findings (PERTVL_OPENI_DIR), else built-in sentences, perturbed by
Perturber; random images. Steps alternate the designs; the ratio that decides is of the best wall
times (other jobs only add time), medians and CPU time beside. Target: authors/pertvl >= 1.5.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
from pathlib import Path

import torch
from common import OPENI, alternate, load_findings

from pertvl.data.batch import Batch
from pertvl.data.records import PERTURBATION_TYPES
from pertvl.data.tokenize import encode_texts
from pertvl.losses import PretrainLoss
from pertvl.model import DualEncoder, DualOutput, ImageOutput, TextOutput, create_model
from pertvl.model.text import pack_lengths

TARGET = 1.5
FALLBACK_SENTENCES = [
    "The heart is normal in size.", "The mediastinum is unremarkable.", "The lungs are clear.",
    "There is no pleural effusion or pneumothorax.", "Mild cardiomegaly is stable.",
    "Small left pleural effusion with adjacent atelectasis.", "No focal airspace consolidation.",
    "Degenerative changes of the thoracic spine.", "Right lower lobe opacity may represent pneumonia.",
    "Calcified granuloma in the right upper lobe.", "Pulmonary vascularity is within normal limits.",
]


def load_reports(path: Path, n: int, seed: int) -> tuple[list[str], str]:
    rng = random.Random(seed)
    if path.is_file():
        return rng.sample(load_findings(path), n), f"{n} random Open-I findings from {path}"
    reports = [" ".join(rng.sample(FALLBACK_SENTENCES, rng.randint(3, 7))) for _ in range(n)]
    return reports, f"{n} reports from built-in sentences ({path} not found)"


def make_batch(model: DualEncoder, reports: list[str], image_size: int, seed: int) -> Batch:
    from pertvl.data.perturb import Perturber

    records = Perturber(seed=seed).perturb_many(reports)
    b, k = len(records), len(PERTURBATION_TYPES)
    enc = encode_texts(model.tokenizer, [r.text for r in records], model.config.max_length)
    # Unavailable types are "" (just [CLS] [SEP]), as pertvl's collate does.
    penc = encode_texts(model.tokenizer, [r.perturbations.get(t, "") for r in records for t in PERTURBATION_TYPES],
                        model.config.max_length)
    lp = penc.input_ids.shape[1]
    valid = torch.tensor([[t in r.perturbations for t in PERTURBATION_TYPES] for r in records])
    g = torch.Generator().manual_seed(seed)
    return Batch(
        images=torch.rand(b, 1, image_size, image_size, generator=g),
        input_ids=torch.from_numpy(enc.input_ids), attention_mask=torch.from_numpy(enc.attention_mask),
        word_ids=torch.from_numpy(enc.word_ids),
        pert_input_ids=torch.from_numpy(penc.input_ids).view(b, k, lp),
        pert_attention_mask=torch.from_numpy(penc.attention_mask).view(b, k, lp),
        pert_valid=valid, texts=[r.text for r in records],
    )


class AuthorsDesign(torch.nn.Module):
    """The authors' forward with pertvl's towers: two ResNets, eleven text passes."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model
        self.local_backbone = copy.deepcopy(model.image.backbone)  # the second, separate ResNet

    def _text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = max(1, int(mask.sum(1).max()))  # each pass padded to its own longest text
        ids, mask = ids[:, :n], mask[:, :n]
        return self.model.text.hidden_states(ids, mask), ids, mask

    def forward(self, batch: Batch) -> DualOutput:
        m = self.model
        image = m.image(batch.images, need_local=False)  # global branch ResNet
        local = self.local_backbone(m.image.normalize(batch.images), output_hidden_states=True).hidden_states[-2]
        regions = m.image.local_proj(local).flatten(2).transpose(1, 2)
        hidden, ids, mask = self._text(batch.input_ids, batch.attention_mask)  # pass 1: originals
        global_emb = m.text.embed(hidden, ids, mask)
        pert = []
        for k in range(batch.pert_input_ids.shape[1]):  # passes 2-10: one per perturbation type
            h, i, a = self._text(batch.pert_input_ids[:, k], batch.pert_attention_mask[:, k])
            pert.append(m.text.embed(h, i, a))
        hidden, ids, mask = self._text(batch.input_ids, batch.attention_mask)  # pass 11: local branch
        word_ids = batch.word_ids[:, :ids.shape[1]]
        words, word_mask = m.text.words(hidden, word_ids, max(1, int(word_ids.max()) + 1))
        return DualOutput(image=ImageOutput(image.global_emb, regions, (0, 0)),
                          text=TextOutput(global_emb, words, word_mask),
                          pert_emb=torch.stack(pert, 1), pert_valid=batch.pert_valid, logit_scale=m.scale())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 8 at 128 px, 2 timed steps per design")
    ap.add_argument("--batch", type=int, default=None, help="default 16 (8 with --quick)")
    ap.add_argument("--image-size", type=int, default=None, help="default 224 (128 with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per design (default 3, 2 with --quick)")
    ap.add_argument("--reports", type=Path, default=OPENI)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    b = args.batch or (8 if args.quick else 16)
    reps = args.reps or (2 if args.quick else 3)
    args.image_size = args.image_size or (128 if args.quick else 224)

    torch.manual_seed(args.seed)
    model = create_model({"image_arch": "resnet-tiny"})
    authors = AuthorsDesign(model)
    reports, source = load_reports(args.reports, b, args.seed)
    batch = make_batch(model, reports, args.image_size, args.seed)
    n_valid = int(batch.pert_valid.sum())
    loss_fn = PretrainLoss({"preset": "full"})
    print(f"P2 one training step (forward, 3 losses, backward, SGD): B={b}, {args.image_size} px, resnet-tiny + MiniLM")
    lengths = torch.cat([batch.attention_mask.sum(1), batch.pert_attention_mask[batch.pert_valid].sum(1)])
    _, packed_rows = pack_lengths(lengths.tolist(), int(lengths.max()))
    layout = f"packed into {packed_rows} rows of {int(lengths.max())}" if model.pack_texts else "padded"
    print(f"  batch: {source}; {n_valid}/{batch.pert_valid.numel()} perturbations valid; text per step: pertvl "
          f"{b + n_valid} texts ({int(lengths.sum())} tokens) in 1 pass, {layout}; authors {b * 11} texts in 11 passes")

    # Same math: in eval mode both designs give the same losses.
    authors.eval()  # covers the shared model and the second ResNet (BatchNorm running stats)
    with torch.no_grad():
        ours, theirs = loss_fn(model(batch)).total, loss_fn(authors(batch)).total
    rel = abs(float(ours) - float(theirs)) / abs(float(theirs))
    print(f"  eval-mode loss: pertvl {float(ours):.6f}, authors {float(theirs):.6f} (relative difference {rel:.1e})")
    authors.train()

    designs = {"pertvl": model, "authors": authors}
    optimizers = {name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
                  for name, m in designs.items()}  # fmt: skip

    def step(name: str) -> None:
        optimizers[name].zero_grad(set_to_none=True)
        loss_fn(designs[name](batch)).total.backward()
        optimizers[name].step()

    _, wall, cpu = alternate({name: lambda i, n=name: step(n) for name in designs}, warmup=1, rounds=reps)
    for name, ts in wall.items():
        print(f"  {name:8s} best {min(ts):7.3f} s/step, median {statistics.median(ts):7.3f} s wall, "
              f"median {statistics.median(cpu[name]):7.3f} s CPU (wall per step {', '.join(f'{t:.2f}' for t in ts)})")
    ratio = min(wall["authors"]) / min(wall["pertvl"])
    median_ratio = statistics.median(wall["authors"]) / statistics.median(wall["pertvl"])
    cpu_ratio = statistics.median(cpu["authors"]) / statistics.median(cpu["pertvl"])
    ok = ratio >= TARGET and rel <= 1e-4
    print(f"  speed-up authors/pertvl = {ratio:.2f}x best-of-{reps} wall (target >= {TARGET}x); "
          f"medians {median_ratio:.2f}x wall, {cpu_ratio:.2f}x process CPU time")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
