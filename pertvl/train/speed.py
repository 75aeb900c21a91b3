"""Speed levers of the training step, switched by the run config (`train.compile`,
`train.channels_last`, `train.attention_fp32`); each is off by default and changes no number
beyond rounding.

compile: "off" | "text" | "all"
    torch.compile (inductor) of the text transformer ("text"), and of the image tower too ("all").
    `nn.Module.compile` compiles in place: the module keeps its class and its state_dict keys (no
    `_orig_mod.` prefix), so checkpoints, resume and export see the same model as without it.
    The packed text batch changes shape every step (rows and row length); `dynamic=True` makes one
    graph serve every shape, so the step does not recompile (docs/PERFORMANCE.md counts it).
attention_fp32: the attention of the trainable text layers computes in fp32 when the weights are
    16-bit on a CPU (pertvl.model.text._sdpa_fp32_grad): much faster where the attention has no
    dropout (torch's fused kernel has a slow bf16 backward), the same numbers and a few casts fewer
    where it has (the math kernel); frozen layers keep the bf16 kernel.
channels_last: the image tower's convolutions run on NHWC activations (the input is converted
    once; the weights stay as DeepSpeed flattened them).
"""

from __future__ import annotations

from torch import nn


def apply_levers(model: nn.Module, compile: str = "off", channels_last: bool = False,
                 attention_fp32: bool = False) -> None:
    """Turn the levers on in `model` (a DualEncoder), before DeepSpeed wraps it; `compile` is
    checked by TrainConfig."""
    from pertvl.model.text import use_fp32_trained_attention

    model.image.channels_last = bool(channels_last)
    if attention_fp32:
        use_fp32_trained_attention(model.text.backbone)
    if compile in ("text", "all"):
        model.text.backbone.compile(dynamic=True)
    if compile == "all":
        model.image.compile(dynamic=True)

