"""The dual encoder of pertvl (paper §III-A): contract in docs/ARCHITECTURE.md, "Model contract"."""

from pertvl.model.dual import DualEncoder, DualEncoderConfig, DualOutput, create_model
from pertvl.model.image import IMAGE_ARCHS, ImageEncoder, ImageOutput
from pertvl.model.text import TextEncoder, TextOutput, aggregate_words

__all__ = [
    "IMAGE_ARCHS",
    "DualEncoder",
    "DualEncoderConfig",
    "DualOutput",
    "ImageEncoder",
    "ImageOutput",
    "TextEncoder",
    "TextOutput",
    "aggregate_words",
    "create_model",
]
