"""Example inputs of the export: chest-radiograph-like images and real report sentences.

They are the tracing examples (pertvl.export.graphs) and the parity cases (pertvl.export.parity).
numpy only.
"""

from __future__ import annotations

import numpy as np

from pertvl.export import ExportError

# Real report sentences for the parity check (Open-I-style findings; cleaned before use).
REAL_REPORTS = (
    "The lungs are clear. There is no pleural effusion or pneumothorax.",
    "Heart size is normal. The mediastinal contours are within normal limits.",
    "Mild cardiomegaly. Small bilateral pleural effusions with bibasilar atelectasis.",
    "Right upper lobe opacity concerning for pneumonia; follow-up radiograph is recommended.",
    "No acute cardiopulmonary abnormality. Degenerative changes of the thoracic spine.",
    "Stable appearance of the chest. XXXX sternotomy wires are intact. No focal consolidation, "
    "pleural effusion or pneumothorax is seen.",
    "Interval increase in the size of the left-sided pleural effusion. The right lung is clear. "
    "Cardiomediastinal silhouette is enlarged but stable compared to the prior examination of 2.5 "
    "years ago. Calcified granuloma in the left lower lobe. Osseous structures are intact. "
    "Endotracheal tube terminates 4 cm above the carina. Nasogastric tube courses below the diaphragm.",
    "Low lung volumes.",
)


def phantom_like_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Chest-radiograph-like test images [n, 1, size, size] float32 in [0, 1]: dark lung fields
    in a brighter body, a heart shadow, rib arcs, a random opacity and noise. Deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        img = 0.15 + 0.55 * np.exp(-(((xx - 0.5) / 0.42) ** 2 + ((yy - 0.55) / 0.55) ** 2) ** 2)
        for cx in (0.32, 0.68):  # lungs
            lung = ((xx - cx + rng.normal(0, 0.01)) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
            img = np.where(lung, img - 0.3, img)
        heart = ((xx - 0.55) / (0.13 + rng.uniform(0, 0.06))) ** 2 + ((yy - 0.65) / 0.12) ** 2 < 1
        img = np.where(heart, img + 0.25, img)
        img += 0.06 * (np.sin(yy * 40 + 6 * (xx - 0.5) ** 2) > 0.7)  # ribs
        if rng.random() < 0.6:  # an opacity (effusion / consolidation)
            cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.4, 0.8), rng.uniform(0.04, 0.12)
            img += 0.3 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
        img += rng.normal(0, 0.02, img.shape)
        out[i, 0] = np.clip(img, 0, 1)
    return out


def random_vocab_texts(tokenizer, n: int, words: int, seed: int = 0) -> list[str]:
    """`n` texts of `words` random whole-word vocabulary entries (lower-case alphabetic, no "##")."""
    from pertvl.data.tokenize import backend_of

    vocab = sorted(w for w in backend_of(tokenizer).get_vocab() if w.isalpha() and w.islower() and len(w) > 1)
    if not vocab:
        raise ExportError("tokenizer vocabulary has no lower-case whole words to build random texts from")
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, size=words)) for _ in range(n)]
