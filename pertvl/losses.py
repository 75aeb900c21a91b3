"""The three pretraining losses of the paper (§III-B) and their weighted sum.

    L = L_global + α·L_local + β·L_pert            (paper Eq. 1–3; α = β = 0.1, τ = 0.07)

A contrastive loss combines its image→text and text→image cross-entropies by "mean" (CLIP's, the
paper's L_global) or "sum" (GLoRIA's, the paper's "Addition" for L_local). L_local is GLoRIA's
word→region loss over the whole B×B matrix at once (`_LocalSimilarity`); `loss.local_form:
printed` is the paper's printed equations. All losses run in float32 (inputs upcast, autocast
off), so 16-bit engines get fp32's numbers; LossConfig validates the options once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from pertvl.config import from_mapping
from pertvl.data.records import PERTURBATION_TYPES

if TYPE_CHECKING:
    from pertvl.model.dual import DualOutput

_EPS = 1e-8  # GLoRIA's cosine_similarity clamps |a|·|b| at 1e-8
# A contrastive loss's reduction -> the factor on CE(image→text) + CE(text→image).
REDUCTIONS = {"mean": 0.5, "sum": 1.0}


def _temperature(temperature: float | torch.Tensor) -> float | torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        return _upcast(temperature).reshape(())
    return float(temperature)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (fp64 stays fp64 for exact checks)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _zero_with_grad(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0 that is connected to the inputs' graph (so backward() and DDP see every input)."""
    return sum(t.sum() for t in tensors) * 0.0


# -- L_global ----------------------------------------------------------------------------------------
def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` concatenated along dim 0; the gradient flows back to every rank's slice
    (torch.distributed.nn's all_gather: reduce-scatter on NCCL, all-to-all + sum on gloo)."""
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def global_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
                            temperature: float | torch.Tensor = 0.07, rank: int = 0, world_size: int = 1,
                            reduction: str = "mean") -> torch.Tensor:
    """L_global (paper §III-B 1): symmetric InfoNCE on L2-normalized [b, D] embeddings,

        L = ½ [CE(cos(v_i, t_j)/τ → j=i) + CE(cos(t_i, v_j)/τ → j=i)]   ("mean", CLIP's; "sum": GLoRIA's)

    With `world_size` > 1 this rank's rows are scored against every rank's (gathered with
    gradient; the same b on every rank): the mean over ranks is the one-process loss on the whole
    batch. `temperature`: τ, a float or a one-element tensor. Returns a float32 scalar.
    """
    factor = REDUCTIONS[reduction]
    tau = _temperature(temperature)
    with torch.autocast(image_emb.device.type, enabled=False):
        img = F.normalize(_upcast(image_emb), dim=-1)
        txt = F.normalize(_upcast(text_emb).to(img.dtype), dim=-1)
        b = img.shape[0]
        if world_size > 1:
            all_img, all_txt = _gather_with_grad(img), _gather_with_grad(txt)
        else:
            all_img, all_txt = img, txt
        labels = torch.arange(b, device=img.device) + rank * b
        logits_per_image = img @ all_txt.T / tau  # [b, N·b]
        logits_per_text = txt @ all_img.T / tau
        return factor * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


# -- L_local (GLoRIA), batched -----------------------------------------------------------------------
LOCAL_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # loss.local_dtype: the matmuls' input dtype
# loss.local_form: "gloria" (the cited reference: softmax over words, then γ1-softmax over regions,
# γ2-scaled cosines, logits γ3·S) or "printed" (the paper's equations: one softmax, logits S/τ).
LOCAL_FORMS = ("gloria", "printed")
AGGREGATIONS = {"sum": False, "mean": True}  # loss.local_aggregation -> S averages over words (log-mean-exp)


def _mm(a: torch.Tensor, b: torch.Tensor, lp: torch.dtype | None) -> torch.Tensor:
    """a @ b (torch.mm, or torch.bmm for 3-D inputs); with `lp` (bf16) the inputs are rounded to it
    and the fp32 product returned (on CPU the product is rounded to bf16 first: no CPU kernel writes
    fp32 from bf16 inputs)."""
    mm = torch.mm if a.dim() == 2 else torch.bmm
    if lp is None:
        return mm(a, b)
    a, b = a.to(lp), b.to(lp)
    if a.is_cuda:
        try:
            return mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without mm(out_dtype)
            pass
    return mm(a, b).float()


def _pair_terms(r: torch.Tensor, g: torch.Tensor, x: torch.Tensor, pad: torch.Tensor, gamma1: float,
                lp: torch.dtype | None = None):
    """Attention terms of images r [c, M, D] (Gram g [c, M, M]) against all reports x [B, W, D]
    (pad True on padded words), laid out [c, M, B, W]: P (word·region), A1 (softmax over words),
    A (γ1-softmax over regions), GA = G·A, n = word·context and q = |context|² [c, B, W]."""
    c, m, d = r.shape
    b, w, _ = x.shape
    p = _mm(r.reshape(c * m, d), x.reshape(b * w, d).T, lp).view(c, m, b, w)
    a1 = torch.softmax(p.masked_fill(pad, float("-inf")), dim=-1)  # over the report's words
    a = torch.softmax(a1 * gamma1, dim=1)  # over regions, per word
    ga = _mm(g, a.view(c, m, b * w), lp).view(c, m, b, w)
    n = (a * p).sum(1)  # word_w · context_w = Σ_m a_mw (r_m · word_w): reuses P
    q = (a * ga).sum(1)  # |context_w|² = a_w^T (R Rᵀ) a_w
    return p, a1, a, ga, n, q


def _chunk_images(b: int, m: int, w: int, max_elements: int) -> int:
    return max(1, min(b, max_elements // max(1, b * m * w)))


class _LocalSimilarity(torch.autograd.Function):
    """S[j, i] = log Σ_w exp(γ2·cos(word_iw, context_jiw)) for every image j and report i, without
    building the contexts (word·context reuses P, |context|² the Gram matrices RRᵀ); forward and
    hand-written backward over chunks of images (at most `max_elements` floats per temporary)."""

    @staticmethod
    def forward(ctx, regions, words, pad, gamma1, gamma2, mean, max_elements, lp=None):
        # Model outputs are often transposed views (conv maps); copy once, not once per chunk.
        regions, words = regions.contiguous(), words.contiguous()
        b_img, m, _ = regions.shape
        b_txt, w, _ = words.shape
        xnorm = words.norm(dim=-1)  # [B, W]
        log_count = (~pad).sum(-1).clamp(min=1).to(regions.dtype).log() if mean else None
        step = _chunk_images(b_txt, m, w, max_elements)
        pad4 = pad.view(1, 1, b_txt, w)
        out = regions.new_empty(b_img, b_txt)
        for j0 in range(0, b_img, step):
            r = regions[j0 : j0 + step]
            g = _mm(r, r.transpose(1, 2), lp)
            _, _, _, _, n, q = _pair_terms(r, g, words, pad4, gamma1, lp)
            cos = n / (xnorm * q.clamp(min=0).sqrt()).clamp(min=_EPS)
            s = torch.logsumexp((gamma2 * cos).masked_fill(pad, float("-inf")), dim=-1)
            out[j0 : j0 + step] = s - log_count if mean else s
        ctx.save_for_backward(regions, words, pad, xnorm)
        ctx.gammas, ctx.step, ctx.lp = (gamma1, gamma2), step, lp
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s):
        regions, words, pad, xnorm = ctx.saved_tensors
        gamma1, gamma2 = ctx.gammas
        step, lp = ctx.step, ctx.lp
        b_img, m, d = regions.shape
        b_txt, w, _ = words.shape
        pad4 = pad.view(1, 1, b_txt, w)
        grad_r = torch.zeros_like(regions)
        grad_x = torch.zeros_like(words)
        grad_xnorm = torch.zeros_like(xnorm)
        x2 = words.reshape(b_txt * w, d)
        for j0 in range(0, b_img, step):
            r = regions[j0 : j0 + step]
            c = r.shape[0]
            g = _mm(r, r.transpose(1, 2), lp)
            p, a1, a, ga, n, q = _pair_terms(r, g, words, pad4, gamma1, lp)
            denom = xnorm * q.clamp(min=0).sqrt()
            free = denom > _EPS  # where GLoRIA's clamp is inactive, cos depends on |x| and |c|
            cos = n / denom.clamp(min=_EPS)
            # S = logsumexp_w(γ2·cos)  ->  dS/dcos_w = γ2·softmax_w(γ2·cos) (same for the mean)
            dcos = torch.softmax((gamma2 * cos).masked_fill(pad, float("-inf")), dim=-1)
            dcos.mul_(grad_s[j0 : j0 + step, :, None] * gamma2)
            dn = dcos / denom.clamp(min=_EPS)
            coef = torch.where(free, dcos * cos, torch.zeros_like(cos))
            dq = -coef / (2 * q.clamp(min=torch.finfo(q.dtype).tiny))  # coef = 0 where q may be 0
            grad_xnorm -= (coef / xnorm.clamp(min=_EPS)).sum(0)
            # |c|² = aᵀ G a  ->  dG = Σ_w dq_w a_w a_wᵀ,  dR += 2·dG·R  (G = R Rᵀ is symmetric)
            a2 = a.view(c, m, b_txt * w)
            dg = _mm(a2 * dq.view(c, 1, b_txt * w), a2.transpose(1, 2), lp)
            grad_r[j0 : j0 + step] += 2 * _mm(dg, r, lp)
            # dA from n = Σ_m a·p and from q = aᵀ G a
            da = dn.unsqueeze(1) * p
            da.add_(ga * (2 * dq).unsqueeze(1))
            del ga
            # A = softmax_m(γ1·A1)
            da.sub_((a * da).sum(1, keepdim=True)).mul_(a).mul_(gamma1)  # = dA1
            # A1 = softmax_w(P) (padded words are 0 in A1, so they get no gradient)
            dp = a1 * (da - (a1 * da).sum(-1, keepdim=True))
            dp.add_(dn.unsqueeze(1) * a)  # from n = Σ_m a·p
            dp2 = dp.view(c * m, b_txt * w)
            grad_r[j0 : j0 + step] += _mm(dp2, x2, lp).view(c, m, d)
            if ctx.needs_input_grad[1]:
                grad_x += _mm(dp2.T, r.reshape(c * m, d), lp).view(b_txt, w, d)
        grad_x += grad_xnorm.unsqueeze(-1) * words / xnorm.clamp(min=_EPS).unsqueeze(-1)
        return grad_r, grad_x, None, None, None, None, None, None


def local_similarity(region_feats: torch.Tensor, word_feats: torch.Tensor, word_mask: torch.Tensor,
                     gamma1: float = 4.0, gamma2: float = 5.0, aggregation: str = "sum", *,
                     max_chunk_elements: int = 1 << 22, matmul_dtype: str = "fp32") -> torch.Tensor:
    """GLoRIA's image–report similarity S(I_j, T_i) for every pair (paper §III-B 2):

        a_wm  = softmax_m( γ1 · softmax_w'( r_m · x_w' )_w )      (first over words, then regions)
        c_w   = Σ_m a_wm r_m
        S     = log Σ_w exp(γ2 · cos(x_w, c_w))                  ("sum"; "mean": log mean_w exp)

    region_feats [B, M, D], word_feats [B, W, D], word_mask [B, W] (True on real words) ->
    [B_images, B_reports] float32. Padded words are out of both softmaxes and the aggregation; a
    report with no words gets S = -inf. `matmul_dtype` "bf16": bf16 matmul inputs with fp32
    accumulation (agrees with fp32 to 2^-8 relative); `max_chunk_elements` bounds memory.
    """
    with torch.autocast(region_feats.device.type, enabled=False):
        has_words = word_mask.any(-1)
        # A report without words would make the masked softmax NaN; compute it unmasked and
        # set its similarity to -inf afterwards (it is then out of every softmax of the loss).
        pad = ~(word_mask | ~has_words.unsqueeze(-1))
        regions = _upcast(region_feats)
        s = _LocalSimilarity.apply(
            regions, _upcast(word_feats).to(regions.dtype), pad, float(gamma1), float(gamma2),
            AGGREGATIONS[aggregation], int(max_chunk_elements), LOCAL_DTYPES[matmul_dtype],
        )
        return s.masked_fill(~has_words.unsqueeze(0), float("-inf"))


def printed_local_similarity(region_feats: torch.Tensor, word_feats: torch.Tensor, word_mask: torch.Tensor,
                             aggregation: str = "sum") -> torch.Tensor:
    """S(I_j, T_i) as the paper prints it (§III-B 2), for every image j and report i:

        a_wm = exp(r_m · x_w) / Σ_l exp(r_l · x_w)        (one softmax, over the M regions)
        c_w  = Σ_m a_wm r_m
        S    = log Σ_w exp(c_w · x_w)                     ("sum"; "mean": log mean_w exp)

    Plain autograd over [B, B, M, W] (~3·B²·M·W floats kept): for paper- and demo-sized batches.
    """
    with torch.autocast(region_feats.device.type, enabled=False):
        r, x = _upcast(region_feats), _upcast(word_feats)
        p = torch.einsum("jmd,iwd->jimw", r, x.to(r.dtype))  # r_m · x_w for every image j, report i
        n = (torch.softmax(p, dim=2) * p).sum(2)  # c_w · x_w = Σ_m a_wm (r_m · x_w)  [j, i, w]
        s = torch.logsumexp(n.masked_fill(~word_mask.unsqueeze(0), float("-inf")), dim=-1)
        if AGGREGATIONS[aggregation]:
            s = s - word_mask.sum(-1).clamp(min=1).to(s.dtype).log()
        return s.masked_fill(~word_mask.any(-1).unsqueeze(0), float("-inf"))


def local_attentive_loss(region_feats: torch.Tensor, word_feats: torch.Tensor, word_mask: torch.Tensor,
                         gamma1: float = 4.0, gamma2: float = 5.0, gamma3: float = 10.0,
                         aggregation: str = "sum", reduction: str = "sum", matmul_dtype: str = "fp32",
                         form: str = "gloria", temperature: float = 0.07) -> torch.Tensor:
    """L_local (paper §III-B 2, GLoRIA's local_loss up to rounding): cross-entropy image→report and
    report→image over logits γ3·S (form "gloria") or S/τ (form "printed"), combined by `reduction`.
    A report with no word is out of every softmax and the mean; with no word at all the loss is 0
    (still connected to the graph)."""
    factor = REDUCTIONS[reduction]
    with torch.autocast(region_feats.device.type, enabled=False):
        if form == "printed":
            logits = printed_local_similarity(region_feats, word_feats, word_mask, aggregation) / temperature
        elif form != "gloria":
            raise ValueError(f"local_attentive_loss: expected form in {list(LOCAL_FORMS)}, got {form!r}")
        else:
            s = local_similarity(region_feats, word_feats, word_mask, gamma1, gamma2, aggregation,
                                 matmul_dtype=matmul_dtype)
            logits = gamma3 * s  # [images, reports]
        ok = word_mask.any(-1)
        if not bool(ok.all()):
            if not bool(ok.any()):
                return _zero_with_grad(_upcast(region_feats), _upcast(word_feats))
            idx = ok.nonzero().squeeze(1)
            return factor * (F.cross_entropy(logits[idx], idx) + F.cross_entropy(logits.T[idx], idx))
        labels = torch.arange(logits.shape[0], device=logits.device)
        return factor * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# -- L_pert ------------------------------------------------------------------------------------------
def perturbation_loss(image_emb: torch.Tensor, original_emb: torch.Tensor, perturbed_emb: torch.Tensor,
                      valid: torch.Tensor, temperature: float | torch.Tensor = 0.07) -> torch.Tensor:
    """L_pert (paper §III-B 3): for each image i, cross-entropy of

        softmax( [cos(v_i, t_i), cos(v_i, t̃_i1), …, cos(v_i, t̃_iK)] / τ )  with target t_i,

    over the valid perturbations t̃ ([B, K, D], `valid` [B, K] bool). Invalid slots are out of
    the softmax whatever they hold; images with none are out of the mean; with none anywhere the
    loss is 0 (still connected to the graph).
    """
    tau = _temperature(temperature)
    with torch.autocast(image_emb.device.type, enabled=False):
        img = F.normalize(_upcast(image_emb), dim=-1)
        # Invalid slots are replaced before anything touches them: whatever they hold (even NaN)
        # changes neither the loss nor any gradient.
        pert = torch.where(valid.unsqueeze(-1), _upcast(perturbed_emb).to(img.dtype), 0.0)
        txt = F.normalize(torch.cat([_upcast(original_emb).to(img.dtype).unsqueeze(1), pert], dim=1), dim=-1)
        logits = torch.einsum("bd,bkd->bk", img, txt) / tau  # [B, 1+K], column 0 = original
        keep = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        logits = logits.masked_fill(~keep, float("-inf"))
        rows = valid.any(-1)
        # Rows with only the original would give loss 0; they are left out of the mean instead.
        nll = -torch.log_softmax(logits, dim=-1)[:, 0]
        n = rows.sum()
        if not bool(n):
            return _zero_with_grad(img, txt)
        return torch.where(rows, nll, torch.zeros_like(nll)).sum() / n


# -- named terms, presets, and the weighted sum ------------------------------------------------------
# The forward keywords of `DualEncoder.forward` that turn on a feature beyond the global embeddings.
NEEDS = ("need_local", "need_perturbations")


@dataclass(frozen=True)
class LossTerm:
    """One named term: `fn(out, config, rank, world_size)` -> a float32 scalar; `weight` None
    (unscaled as L_global in Eq. 1, unless `LossConfig.weights` names it) or the LossConfig field
    holding it; `needs`: the forward keywords whose features it reads."""

    fn: Callable[[DualOutput, LossConfig, int, int], torch.Tensor]
    weight: str | None
    needs: tuple[str, ...] = ()


def _global_term(out: DualOutput, cfg: LossConfig, rank: int, world_size: int) -> torch.Tensor:
    tau: float | torch.Tensor = cfg.temperature
    if out.logit_scale is not None:  # learnable temperature replaces τ in L_global only
        tau = 1.0 / out.logit_scale.float()
    return global_contrastive_loss(out.image.global_emb, out.text.global_emb, tau, rank=rank,
                                   world_size=world_size, reduction=cfg.global_reduction)


def _local_term(out: DualOutput, cfg: LossConfig, rank: int, world_size: int) -> torch.Tensor:
    # Each rank's own batch: L_local over the global batch would need every rank's region maps.
    return local_attentive_loss(out.image.regions, out.text.words, out.text.word_mask, cfg.gamma1, cfg.gamma2,
                                cfg.gamma3, cfg.local_aggregation, cfg.local_reduction, cfg.local_dtype,
                                cfg.local_form, cfg.temperature)


def _pert_term(out: DualOutput, cfg: LossConfig, rank: int, world_size: int) -> torch.Tensor:
    # No cross-sample term: each rank's own batch, whose columns are loss.pert_types.
    return perturbation_loss(out.image.global_emb, out.text.global_emb, out.pert_emb, out.pert_valid,
                             cfg.pert_temperature)


# The paper's three terms (§III-B 1-3). A new term: its function above and one line here.
LOSS_TERMS = {
    "global": LossTerm(_global_term, None),
    "local": LossTerm(_local_term, "alpha", ("need_local",)),
    "pert": LossTerm(_pert_term, "beta", ("need_perturbations",)),
}
# `loss.preset` -> the terms it sums, in this order (the order is part of the numerics), and its
# row label in reports; the paper's ablations (Tables II-IV) in its row order.
LOSS_PRESETS = {
    "convirt": (("global",), "ConVIRT-like"),
    "gloria": (("global", "local"), "GLoRIA-like"),
    "no_local": (("global", "pert"), "Ours w/o local"),
    "full": (("global", "local", "pert"), "Ours"),  # the paper's method
}


def preset_label(name: str) -> str:
    """The report label of a preset ("Ours"); the name itself for an unknown one."""
    return LOSS_PRESETS[name][1] if name in LOSS_PRESETS else name


def _check_pert_types(value: Any) -> list[str]:
    """`loss.pert_types` validated: a non-empty list of distinct types, returned in the batch's column
    order (PERTURBATION_TYPES order, then counterfactual types in COUNTERFACTUAL_TYPES order)."""
    from pertvl.data.counterfactual import COUNTERFACTUAL_TYPES

    known = PERTURBATION_TYPES

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"LossConfig: expected pert_types to be a list of perturbation type names "
                         f"(some of {list(known)}, optionally counterfactual types "
                         f"{list(COUNTERFACTUAL_TYPES)}), got {value!r}")
    if not value:
        raise ValueError("LossConfig: pert_types is empty; L_pert needs at least one type (for no L_pert, "
                         "use a preset without it: convirt or gloria)")
    if len(set(value)) != len(value):
        raise ValueError(f"LossConfig: pert_types repeats a type: {list(value)}")
    unknown = [t for t in value if t not in known and t not in COUNTERFACTUAL_TYPES]
    if unknown:
        raise ValueError(f"LossConfig: unknown pert_types {unknown}; the training batch carries {list(known)} "
                         f"and, on request, the counterfactual types {list(COUNTERFACTUAL_TYPES)}")
    return [t for t in (*known, *COUNTERFACTUAL_TYPES) if t in value]


@dataclass
class LossConfig:
    """Weights and temperatures of L = L_global + α·L_local + β·L_pert (paper Eq. 1). `weights`:
    the weight of a term without a field of its own (L_global's), by name; a learnable temperature
    replaces `temperature` in L_global only; `pert_types`: L_pert's types, exactly the batch's
    columns (default: the paper's nine; counterfactual types after them)."""

    preset: str = "full"
    alpha: float = 0.1
    beta: float = 0.1
    temperature: float = 0.07
    pert_temperature: float = 0.07
    gamma1: float = 4.0
    gamma2: float = 5.0
    gamma3: float = 10.0
    local_aggregation: str = "sum"
    global_reduction: str = "mean"
    local_reduction: str = "sum"
    local_dtype: str = "fp32"  # L_local's matmul inputs: fp32 | bf16 (tensor cores; fp32 accumulation)
    local_form: str = "gloria"  # gloria (GLoRIA's, the cited reference) | printed (the paper's equations; LOCAL_FORMS)
    weights: dict[str, float] = field(default_factory=dict)
    pert_types: list[str] = field(default_factory=lambda: list(PERTURBATION_TYPES))

    def __post_init__(self) -> None:
        self.pert_types = _check_pert_types(self.pert_types)
        if self.preset not in LOSS_PRESETS:
            raise ValueError(f"LossConfig: expected preset in {sorted(LOSS_PRESETS)}, got {self.preset!r}")
        if self.local_aggregation not in AGGREGATIONS:
            raise ValueError(f"LossConfig: expected local_aggregation 'sum' or 'mean', got {self.local_aggregation!r}")
        if self.local_dtype not in LOCAL_DTYPES:
            raise ValueError(f"LossConfig: expected local_dtype in {sorted(LOCAL_DTYPES)}, got {self.local_dtype!r}")
        if self.local_form not in LOCAL_FORMS:
            raise ValueError(f"LossConfig: expected local_form in {list(LOCAL_FORMS)}, got {self.local_form!r}")
        if self.local_form == "printed" and self.local_dtype != "fp32":
            raise ValueError("LossConfig: local_dtype applies to local_form 'gloria' only (the printed form "
                             "runs in fp32)")
        for name in ("global_reduction", "local_reduction"):
            if getattr(self, name) not in REDUCTIONS:
                raise ValueError(f"LossConfig: expected {name} 'mean' or 'sum' (of the image→text and text→image "
                                 f"cross-entropies), got {getattr(self, name)!r}")
        for name in ("alpha", "beta"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"LossConfig: expected {name} >= 0, got {getattr(self, name)}")
        for name in ("temperature", "pert_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LossConfig: expected {name} > 0, got {getattr(self, name)}")
        self.weights = dict(self.weights or {})
        for name, value in self.weights.items():
            term = LOSS_TERMS.get(name)
            if term is None:
                raise ValueError(f"LossConfig: weights names unknown term {name!r}; terms: {list(LOSS_TERMS)}")
            if term.weight is not None:
                raise ValueError(f"LossConfig: the weight of term {name!r} is loss.{term.weight}, not weights.{name}")
            if not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"LossConfig: expected weights.{name} to be a number >= 0, got {value!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | LossConfig | None) -> LossConfig:
        return from_mapping(cls, d)

    @property
    def terms(self) -> tuple[str, ...]:
        return LOSS_PRESETS[self.preset][0]

    def weight(self, name: str) -> float | None:
        field_name = LOSS_TERMS[name].weight
        if field_name is not None:
            return getattr(self, field_name)
        return float(self.weights[name]) if name in self.weights else None

    def needs(self, keyword: str) -> bool:
        return any(keyword in LOSS_TERMS[t].needs for t in self.terms)

    @property
    def uses_perturbations(self) -> bool:
        return self.needs("need_perturbations")


@dataclass
class LossOutput:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]

    def stacked(self, names: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.total if n == "total" else self.terms[n] for n in names])


class PretrainLoss:
    """L = Σ over the preset's terms of weight·term (paper Eq. 1), in the preset's order; `names`
    ("total", then the terms) is the order of the engine's log."""

    def __init__(self, config: LossConfig | dict[str, Any] | None = None) -> None:
        self.config = LossConfig.from_dict(config)
        self.terms = self.config.terms

    @property
    def names(self) -> tuple[str, ...]:
        return ("total", *self.terms)

    def model_kwargs(self) -> dict[str, bool]:
        return {k: self.config.needs(k) for k in NEEDS}

    def __call__(self, out: DualOutput, rank: int = 0, world_size: int = 1) -> LossOutput:
        cfg = self.config
        values: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for name in self.terms:
            value = values[name] = LOSS_TERMS[name].fn(out, cfg, rank, world_size)
            weight = cfg.weight(name)
            weighted = value if weight is None else weight * value
            total = weighted if total is None else total + weighted
        assert total is not None  # a preset has at least one term
        return LossOutput(total=total, terms=values)
