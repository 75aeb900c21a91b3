"""FLOP accounting for a training step, and the device peak that MFU is measured against.

Model FLOPs of one step, forward + backward, multiply-add = 2 FLOPs (padding not counted, as in
PaLM's MFU). Text tower: analytic, per token and layer 2·(4H² + 2HI) plus 4·L·H for attention
over the token's own text; backward 2× forward for trainable layers, 0 below the first trainable
one. Image tower: `FlopCounterMode` on a meta-device copy (shapes only). Losses: L_local's
matmuls as `_LocalSimilarity` runs them; L_global and L_pert (negligible). MFU divides by
`device_peak`: a table of dense 16-bit GPU peaks, PERTVL_PEAK_TFLOPS, or on a CPU (or an unknown
GPU) the measured throughput of torch's own matmul on this process's threads.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

# Dense (no 2:4 sparsity) bf16/fp16 tensor-core peaks, TFLOP/s, matched by substring of
# torch.cuda.get_device_name(), first match wins (so "H100 PCIe" precedes "H100").
DEVICE_PEAKS: tuple[tuple[str, float, str], ...] = (
    ("H200", 790.0, "H200 bf16 dense: ~790 TFLOP/s measured on a large bf16 "
                    "matmul (NVIDIA's nominal figure is 989.5, the H100 SXM's)"),
    ("H100 PCIe", 756.0, "NVIDIA H100 PCIe datasheet, bf16 dense (1,513 with sparsity)"),
    ("H100", 989.5, "NVIDIA H100 SXM datasheet, bf16 dense (1,979 with sparsity)"),
    ("A100", 312.0, "NVIDIA A100 datasheet, bf16 dense (624 with sparsity)"),
    ("L40S", 362.0, "NVIDIA L40S datasheet, bf16 dense (733 with sparsity)"),
    ("A10", 125.0, "NVIDIA A10 datasheet, bf16 dense (250 with sparsity)"),
)


@dataclass(frozen=True)
class Peak:
    """The FLOP/s that MFU divides by, and where the number comes from."""

    flops_per_s: float
    source: str


@functools.cache
def measure_matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                        seconds: float = 0.3) -> float:
    """FLOP/s of an n×n matmul on `device` in `dtype`, best of ~`seconds` of timings, cached per
    process; its inputs come from a private generator (the global RNG is untouched)."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 1024)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dev, dtype)
    b = torch.randn(n, n, generator=gen).to(dev, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *_: None)
    a @ b  # warm-up: kernel selection, thread pool start
    sync(dev)
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        sync(dev)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return 2.0 * n**3 / best


def device_peak(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> Peak:
    """The peak FLOP/s of `device` for MFU: `PERTVL_PEAK_TFLOPS`, else the table (CUDA), else a
    measured matmul in `dtype` (CPU, unknown GPU)."""
    dev = torch.device(device)
    override = float(os.environ.get("PERTVL_PEAK_TFLOPS") or 0)
    if override:
        return Peak(override * 1e12, f"PERTVL_PEAK_TFLOPS={override:g}")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key, tflops, source in DEVICE_PEAKS:
            if key in name:
                return Peak(tflops * 1e12, f"{name}: {source}")
        flops = measure_matmul_peak(str(dev), dtype)
        return Peak(flops, f"{name}: not in the table; measured {dtype} 8192² matmul")
    threads = torch.get_num_threads()
    flops = measure_matmul_peak("cpu", dtype)
    return Peak(flops, f"{cpu_model()}: measured peak of torch's {str(dtype).replace('torch.', '')} "
                       f"GEMM (1024² matmul, best of ~0.3 s) on {threads} thread(s) of this process")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------ text tower
@dataclass(frozen=True)
class TextShape:
    """What the text FLOPs depend on: a BERT-like encoder's widths and which layers train."""

    hidden: int
    intermediate: int
    layers: int
    frozen_layers: int  # frozen first layers (embeddings frozen too): no backward below the first trainable one
    embed_dim: int
    local_dim: int
    trainable_below: bool = True  # something trainable feeds the first trainable layer (the embeddings)

    @classmethod
    def of(cls, model: Any) -> TextShape:
        """From a DualEncoder (its text backbone's config and requires_grad flags)."""
        cfg = model.text.backbone.config
        stack = getattr(getattr(model.text.backbone, "encoder", None), "layer", None)
        layers = int(cfg.num_hidden_layers)
        if stack is None:  # not the BERT layout: count all layers as trainable unless all frozen
            frozen = layers if not any(p.requires_grad for p in model.text.backbone.parameters()) else 0
        else:
            frozen = 0
            for layer in stack:
                if any(p.requires_grad for p in layer.parameters()):
                    break
                frozen += 1
        emb = getattr(model.text.backbone, "embeddings", None)
        below = frozen == 0 and emb is not None and any(p.requires_grad for p in emb.parameters())
        return cls(hidden=int(cfg.hidden_size), intermediate=int(cfg.intermediate_size), layers=layers,
                   frozen_layers=frozen, embed_dim=int(model.config.embed_dim), local_dim=int(model.local_dim),
                   trainable_below=below)


def text_flops(shape: TextShape, tokens: float, tokens_sq: float, texts: float, word_tokens: float = 0.0,
               words: float = 0.0) -> tuple[float, float]:
    """(forward, backward) FLOPs of the text tower for texts with `tokens` = Σ L_i tokens,
    `tokens_sq` = Σ L_i², `texts` texts; the word features of originals with `word_tokens`
    (Σ over originals of W·L: the one-hot aggregation matmul) and `words` (Σ W: the projection)."""
    h, i = shape.hidden, shape.intermediate
    per_layer = 2.0 * (4 * h * h + 2 * h * i) * tokens + 4.0 * h * tokens_sq
    heads = 2.0 * h * shape.embed_dim * texts + 2.0 * h * word_tokens + 2.0 * h * shape.local_dim * words
    trainable = shape.layers - shape.frozen_layers
    fwd = per_layer * shape.layers + heads
    bwd = 2.0 * (per_layer * trainable + heads)  # frozen first layers: no backward at all
    if trainable and not shape.trainable_below:  # nor the Q/K/V input gradients of the first trainable one
        bwd -= 3 * 2.0 * h * h * tokens
    return fwd, bwd


# ----------------------------------------------------------------------------------- image tower
def measured_module_flops(module: torch.nn.Module, *inputs: torch.Tensor, **kwargs) -> tuple[float, float, Any]:
    """(forward FLOPs, backward FLOPs, the meta output) of `module(*inputs, **kwargs)` counted by
    FlopCounterMode on a meta-device copy (the module itself is not run; its requires_grad flags
    are kept). The backward is of the sum of every floating output."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(module).to("meta")
    args = [x.to("meta") for x in inputs]
    with FlopCounterMode(display=False) as counter:
        out = meta(*args, **kwargs)
    fwd = float(counter.get_total_flops())
    tensors = [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
    if not tensors:
        return fwd, 0.0, out
    with FlopCounterMode(display=False) as counter:
        sum(t.sum() for t in tensors).backward()
    return fwd, float(counter.get_total_flops()), out


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "__dataclass_fields__"):
        return [t for v in vars(out).values() for t in _tensors(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _tensors(v)]
    return []


# ---------------------------------------------------------------------------------------- losses
def local_loss_flops(b_img: int, b_txt: int, m: int, w: int, d: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of L_local's matmuls as `_LocalSimilarity` runs them (b_img images
    of M regions against b_txt reports of W word slots, padded ones included, width D):

        forward   P = R·Xᵀ  2·Bi·M·Bt·W·D,   G = R·Rᵀ  2·Bi·M²·D,   G·A  2·Bi·M²·Bt·W
        backward  the forward again (recomputed per chunk), then
                  dG = A·diag(dq)·Aᵀ  2·Bi·M²·Bt·W,   dG·R  2·Bi·M²·D,   dP·X and dPᵀ·R  2·2·Bi·M·Bt·W·D
    """
    fwd = 2.0 * b_img * m * b_txt * w * d + 2.0 * b_img * m * m * d + 2.0 * b_img * m * m * b_txt * w
    bwd = fwd + 2.0 * b_img * m * m * b_txt * w + 2.0 * b_img * m * m * d + 4.0 * b_img * m * b_txt * w * d
    return fwd, bwd


# --------------------------------------------------------------------------------------- counter
@dataclass
class FlopCounter:
    """The FLOPs of one micro-batch of a DualEncoder + loss preset: built once by `for_model`, then
    `batch_flops` is a few reductions over the batch's CPU masks (no device sync)."""

    text: TextShape
    image_fwd: float  # per image
    image_bwd: float
    image_size: int
    grid: tuple[int, int]  # region grid (M = h·w)
    need_local: bool
    need_perturbations: bool
    terms: tuple[str, ...]

    @classmethod
    def for_model(cls, model: Any, image_size: int, *, need_local: bool = True, need_perturbations: bool = True,
                  terms: tuple[str, ...] = ("global", "local", "pert")) -> FlopCounter:
        """Measure the image tower of `model` (a DualEncoder) at `image_size` and read its text shape."""
        # Two images (BatchNorm in training mode refuses one value per channel), counted per image.
        image = torch.zeros(2, 1, image_size, image_size)
        fwd, bwd, out = measured_module_flops(model.image, image, need_local=need_local)
        return cls(text=TextShape.of(model), image_fwd=fwd / 2, image_bwd=bwd / 2, image_size=int(image_size),
                   grid=tuple(int(g) for g in out.grid), need_local=need_local,
                   need_perturbations=need_perturbations, terms=tuple(terms))

    def batch_breakdown(self, batch: Any) -> dict[str, float]:
        """FLOPs of one micro-batch by part ("text_fwd", "text_bwd", "image_fwd", "image_bwd",
        "local_fwd", "local_bwd", "global", "pert") and the counts they come from."""
        b = int(batch.input_ids.shape[0])
        lengths = batch.attention_mask.sum(1).to(torch.float64)
        tokens, tokens_sq, texts = float(lengths.sum()), float((lengths * lengths).sum()), float(b)
        n_pert = 0.0
        if self.need_perturbations:
            valid = batch.pert_valid.to(torch.bool)
            plen = batch.pert_attention_mask.sum(-1).to(torch.float64)[valid]
            tokens += float(plen.sum())
            tokens_sq += float((plen * plen).sum())
            n_pert = float(plen.numel())
            texts += n_pert
        word_tokens = words = 0.0
        w = 0
        if self.need_local:
            w = max(1, int(batch.word_ids.max()) + 1)  # the word slots the model gives L_local
            words = float(b * w)
            word_tokens = float(w) * float(lengths.sum())
        t_fwd, t_bwd = text_flops(self.text, tokens, tokens_sq, texts, word_tokens, words)
        out = {
            "pairs": float(b), "texts": texts, "perturbations": n_pert, "tokens": tokens,
            "text_fwd": t_fwd, "text_bwd": t_bwd,
            "image_fwd": self.image_fwd * b, "image_bwd": self.image_bwd * b,
        }
        if self.need_local and "local" in self.terms:
            m = self.grid[0] * self.grid[1]
            out["word_slots"] = float(w)
            out["local_fwd"], out["local_bwd"] = local_loss_flops(b, b, m, w, self.text.local_dim)
        if "global" in self.terms:  # two [b, b] logit matrices (one rank's view), fwd + 2× bwd
            out["global"] = 3.0 * 2 * 2.0 * b * b * self.text.embed_dim
        if "pert" in self.terms and self.need_perturbations:
            out["pert"] = 3.0 * 2.0 * b * (1 + batch.pert_valid.shape[1]) * self.text.embed_dim
        return out

    @staticmethod
    def total(breakdown: dict[str, float]) -> float:
        """The FLOPs of a breakdown (its counts excluded)."""
        counts = {"pairs", "texts", "perturbations", "tokens", "word_slots"}
        return float(sum(v for k, v in breakdown.items() if k not in counts))

    def batch_flops(self, batch: Any) -> float:
        return self.total(self.batch_breakdown(batch))

    def report(self, batch: Any, peak: Peak | None = None) -> dict[str, Any]:
        """The run's accounting (RUN_DIR/flops.json): the model's shapes, the per-pair FLOPs of
        `batch` by part, and the peak MFU is measured against."""
        br = self.batch_breakdown(batch)
        pairs = br["pairs"]
        per_pair = {k: v / pairs for k, v in br.items() if k not in ("pairs",)}
        total = self.total(br)
        out = {
            "method": {
                "text": "analytic: 2(4H²+2HI) per token and layer + 4LH attention over the token's own text; "
                        "backward 2x forward for trainable layers, 0 for frozen first layers",
                "image": "measured: torch.utils.flop_counter.FlopCounterMode on a meta-device copy, "
                         "forward and forward+backward with the run's trainable parameters",
                "local": "analytic: the matmuls of pertvl.losses._LocalSimilarity, backward including its "
                         "recomputed forward",
                "unit": "FLOPs (multiply-add = 2), forward + backward",
            },
            "text_shape": asdict(self.text),
            "image": {"size": self.image_size, "fwd_per_image": self.image_fwd, "bwd_per_image": self.image_bwd,
                      "grid": list(self.grid)},
            "batch": {k: br[k] for k in ("pairs", "texts", "perturbations", "tokens") if k in br},
            "per_pair": {**per_pair, "total": total / pairs},
            "per_pair_gflop": {
                "text": (br["text_fwd"] + br["text_bwd"]) / pairs / 1e9,
                "image": (br["image_fwd"] + br["image_bwd"]) / pairs / 1e9,
                "local": (br.get("local_fwd", 0.0) + br.get("local_bwd", 0.0)) / pairs / 1e9,
                "global+pert": (br.get("global", 0.0) + br.get("pert", 0.0)) / pairs / 1e9,
                "total": total / pairs / 1e9,
            },
        }
        if peak is not None:
            out["peak"] = {"flops_per_s": peak.flops_per_s, "tflops": peak.flops_per_s / 1e12, "source": peak.source}
        return out
