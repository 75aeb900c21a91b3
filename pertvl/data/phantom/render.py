"""The renderer: a phantom chest radiograph drawn analytically from a sampled patient and its findings.

See pertvl.data.phantom for the anatomy, the image convention and the determinism rule.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pertvl.data.phantom.findings import Finding, as_findings

MIN_SIZE, MAX_SIZE = 64, 2048
PNG_COMPRESS_LEVEL = 6  # fixed so that the bytes of a PNG depend on its pixels only
# Image x of a patient side: x = 0.5 + sign * |offset from the midline| (patient's left = image right).
SIDE_SIGN = {"right": -1.0, "left": 1.0}
_SIDE_INDEX = {"right": 0, "left": 1}  # index into the per-side arrays of _Patient


@dataclass(frozen=True)
class _Patient:
    """One patient's anatomy. Lengths are fractions of the image side in 'anatomical' coordinates
    (midline x = 0.5, top y = 0); per-side arrays are [right lung (image left), left lung (image right)]."""

    scale: float
    angle: float  # radians, rotation of the patient in the image plane
    tx: float
    ty: float
    body_w: float
    m0: float  # medial border of the lung fields from the midline
    lung_w: tuple[float, float]
    y_top: tuple[float, float]
    y_cp: tuple[float, float]  # costophrenic angles
    dome_top: tuple[float, float]  # highest point of each hemidiaphragm
    ctr: float  # cardiothoracic ratio
    heart_cy: float
    heart_ry: float
    heart_shear: float
    hilum_y: tuple[float, float]
    med_w: float
    rib_r0: float
    rib_sp: float
    rib_th: float
    clav_y: float
    soft: float
    lo: float
    hi: float
    gamma: float
    noise: float
    mottle: float


def _sample_patient(rng: np.random.Generator) -> _Patient:
    u = rng.uniform
    wf = u(0.93, 1.07)
    lr = u(0.30, 0.335) * wf
    y_top = u(0.11, 0.15)
    y_cp_r = u(0.79, 0.85)
    y_cp_l = y_cp_r + u(0.0, 0.02)
    dome_r = y_cp_r - u(0.075, 0.105)
    dome_l = max(dome_r + u(0.01, 0.03), y_cp_l - 0.1)
    ry = u(0.19, 0.22)
    return _Patient(scale=u(0.9, 1.03), angle=math.radians(u(-4.0, 4.0)), tx=u(-0.02, 0.02),
                    ty=u(-0.015, 0.03), body_w=wf * u(0.98, 1.04), m0=0.045 * wf,
                    lung_w=(lr, lr * u(0.93, 1.0)), y_top=(y_top + u(-0.01, 0.01), y_top + u(-0.01, 0.01)),
                    y_cp=(y_cp_r, y_cp_l), dome_top=(dome_r, dome_l), ctr=u(0.40, 0.47),
                    heart_cy=0.5 * (dome_r + dome_l) + u(0.0, 0.03), heart_ry=ry, heart_shear=u(0.1, 0.3),
                    hilum_y=(u(0.41, 0.45), u(0.39, 0.43)), med_w=u(0.055, 0.07), rib_r0=u(0.085, 0.11),
                    rib_sp=u(0.063, 0.072), rib_th=u(0.0105, 0.0135), clav_y=u(0.15, 0.19),
                    soft=u(0.36, 0.42), lo=u(-0.03, 0.03), hi=u(0.66, 0.76), gamma=u(0.85, 1.15),
                    noise=u(0.008, 0.025), mottle=u(0.01, 0.03))


@cache
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1] (x right, y down), cached per size."""
    p = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(p, p)
    return x, y


def _f32(v: float) -> np.float32:
    return np.float32(v)


class _Canvas:
    """The pixel grid in anatomical coordinates, and the anti-aliased inside test on it."""

    def __init__(self, pt: _Patient, size: int) -> None:
        x, y = _pixel_grid(size)
        c, s = math.cos(pt.angle), math.sin(pt.angle)
        u = (x - _f32(0.5 + pt.tx)) / _f32(pt.scale)
        v = (y - _f32(0.5 + pt.ty)) / _f32(pt.scale)
        self.pt, self.size = pt, size
        self.xa = _f32(0.5) + _f32(c) * u + _f32(s) * v
        self.ya = _f32(0.5) - _f32(s) * u + _f32(c) * v
        self.d = self.xa - _f32(0.5)  # signed offset from the midline (+ = image right = patient left)
        self.ad = np.abs(self.d)
        self.right_img = (self.d > 0).astype(np.float32)  # 1 on the patient's LEFT side
        self.px = 1.0 / (size * pt.scale)  # one pixel in anatomical units
        self._inv = _f32(1.0 / (0.9 * self.px))

    def ramp(self, v: np.ndarray, width_px: float = 0.9) -> np.ndarray:
        """0 -> 1 across a band `width_px` pixels wide where `v` (anatomical units) crosses 0."""
        inv = self._inv if width_px == 0.9 else _f32(1.0 / (width_px * self.px))
        return np.clip(v * inv + _f32(0.5), _f32(0.0), _f32(1.0))

    def side_mask(self, side: str) -> np.ndarray:
        return self.ramp(self.d if side == "left" else -self.d, 1.5)

    def per_side(self, values: tuple[float, float]) -> np.ndarray:
        """Per-pixel parameter: values[0] on the patient's right half, values[1] on the left.
        (Arithmetic select: np.where with scalars is several times slower here.)"""
        return _f32(values[0]) + _f32(values[1] - values[0]) * self.right_img

    def to_pixels(self, xa: float, ya: float) -> tuple[float, float]:
        """Anatomical -> pixel coordinates (PIL's: pixel centres at integers). Plain floats: it is
        called per vessel segment, where numpy's per-call overhead would dominate."""
        pt = self.pt
        c, s = math.cos(pt.angle), math.sin(pt.angle)
        u, v = xa - 0.5, ya - 0.5
        x = 0.5 + pt.tx + pt.scale * (c * u - s * v)
        y = 0.5 + pt.ty + pt.scale * (s * u + c * v)
        return x * self.size - 0.5, y * self.size - 0.5


Param = np.ndarray | float  # a shape parameter: one value, or one per pixel (per-side values)


@dataclass(frozen=True)
class _Lung:
    """The geometry of one or both lung fields on the canvas."""

    mask: np.ndarray  # 0..1 inside the lung field
    t: np.ndarray  # 0 at the apex, 1 at the costophrenic angle
    y_dome: np.ndarray  # the hemidiaphragm height at each x


def _lung_shape(cv: _Canvas, ad: np.ndarray, ya: np.ndarray, m0: float, L: Param, y_top: Param, y_cp: Param,
                dome_top: Param, width_px: float = 0.9) -> _Lung:
    """A lung field as an implicit shape (rounded apex, convex lateral wall, domed base), evaluated
    vectorized on any (rotated, scaled) coordinate grid."""
    H = y_cp - y_top
    t = (ya - y_top) / H
    c = m0 + _f32(0.42) * L
    g_lat = np.sin(_f32(math.pi / 2) * np.clip(t * _f32(1 / 0.85), 0, 1)) ** _f32(0.6)
    g_med = np.sqrt(np.clip(t * _f32(1 / 0.3), 0, 1))
    x_lat = c + _f32(0.58) * L * g_lat
    x_med = c - _f32(0.42) * L * g_med
    cd = m0 + _f32(0.45) * L
    k = (y_cp - dome_top) / (m0 + L - cd) ** 2
    # Steep laterally (the costophrenic angle), flat medially (the heart sits on the dome there).
    y_dome = dome_top + k * (ad - cd) ** 2 * (_f32(1.0) - _f32(0.75) * (ad < cd))
    mask = (cv.ramp(x_lat - ad, width_px) * cv.ramp(ad - x_med, width_px)
            * cv.ramp(y_dome - ya, width_px) * cv.ramp(ya - y_top, width_px))
    return _Lung(mask, t, y_dome)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise (about unit variance): a cells x cells Gaussian field upsampled bicubically."""
    small = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32), mode="F")
    return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _vessels(cv: _Canvas, lung: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Branching, tapering vessel markings from each hilum (random-walk trees drawn with PIL), clipped
    to the lung fields; 0..1."""
    pt, size = cv.pt, cv.size
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    px_per_unit = size * pt.scale
    inside = lung > 0.5
    for k, sign in ((0, -1.0), (1, 1.0)):
        L = pt.lung_w[k]
        hx, hy = 0.5 + sign * (pt.m0 + 0.15 * L), pt.hilum_y[k]
        step, w0 = 0.024 * L / 0.32, 0.0105
        # Trunks leave the hilum from points along it, fanning up, out and down.
        angles = np.linspace(-1.75, 1.45, 7) + rng.normal(0, 0.12, 7)
        stack = [(hx + sign * rng.uniform(0, 0.02), hy + 0.09 * (th / 3.2) + rng.normal(0, 0.01), float(th), w0, 11)
                 for th in angles]
        while stack:
            x, y, th, w, n = stack.pop()
            x0, y0 = cv.to_pixels(x, y)
            for _ in range(n):
                th += rng.normal(0.0, 0.16)
                nx, ny = x + sign * step * math.cos(th), y + step * math.sin(th)
                x1, y1 = cv.to_pixels(nx, ny)
                ix, iy = int(round(x1)), int(round(y1))
                if not (0 <= ix < size and 0 <= iy < size and inside[iy, ix]):
                    break
                width = max(1, int(round(w * px_per_unit)))
                draw.line([(x0, y0), (x1, y1)], fill=int(70 + 150 * min(1.0, w / w0)), width=width)
                if n > 3 and rng.random() < 0.4:  # bifurcation: the branches part to both sides
                    turn = rng.uniform(0.3, 0.6) * (1 if rng.random() < 0.5 else -1)
                    stack.append((nx, ny, th + turn, w * 0.75, n - 2))
                    th -= 0.4 * turn
                x, y, x0, y0, w, n = nx, ny, x1, y1, w * 0.86, n - 1
    img = img.filter(ImageFilter.GaussianBlur(radius=0.25 + 0.45 * size / 224))
    return np.asarray(img, dtype=np.float32) * _f32(1 / 255)


def _band(t: np.ndarray, a: float, b: float, soft: float = 0.05) -> np.ndarray:
    return np.clip((t - a) / soft, 0, 1) * np.clip((b - t) / soft, 0, 1)


def _lobe_zone(cv: _Canvas, lung: _Lung, lobe: str, pt: _Patient, soft: float = 0.0) -> np.ndarray:
    """Where a lobe projects on a PA film (upper zone, lower zone, or the middle lobe beside the right
    heart border); `soft` widens the edges (an envelope for opacities)."""
    side, level, _ = lobe.split(" ")
    L = pt.lung_w[_SIDE_INDEX[side]]
    e = 0.05 + soft
    if level == "upper":
        z = _band(lung.t, 0.06 - soft, 0.42 + soft, e)
    elif level == "middle":
        z = _band(lung.t, 0.52 - soft, 0.86 + soft, e) * np.clip((pt.m0 + (0.5 + soft) * L - cv.ad) / (e * L), 0, 1)
    else:
        z = _band(lung.t, 0.6 - soft, 1.1, e)
        if side == "right":
            z = z * np.clip((cv.ad - (pt.m0 + (0.4 - soft) * L)) / (e * L), 0, 1)
    return z * cv.side_mask(side)


def _pick_pixel(rng: np.random.Generator, weight: np.ndarray, thresh: float) -> tuple[int, int]:
    """A random pixel (row, col) among those with weight > thresh (best one if none)."""
    flat = np.flatnonzero(weight.ravel() > thresh)
    i = int(flat[rng.integers(len(flat))]) if len(flat) else int(np.argmax(weight))
    return divmod(i, weight.shape[1])


@dataclass
class _Scene:
    """Per-pixel layers of one phantom: the fixed anatomy plus what findings change (`lung_eff`: aerated
    lung each ray crosses; `vessel_gain`: scale of the vessel markings; `extra`: density added)."""

    cv: _Canvas
    lung: _Lung
    thick: np.ndarray  # blurred lung mask: ~1 deep inside a lung field
    heart: np.ndarray
    fine: np.ndarray  # band-limited noise fields for texture
    blotch: np.ndarray
    lung_eff: np.ndarray
    vessel_gain: np.ndarray
    extra: np.ndarray


def _adjust_anatomy(pt: _Patient, fs: dict[str, Finding], rngs: Mapping[str, np.random.Generator]) -> _Patient:
    """Findings that change the anatomy itself: atelectasis lifts a hemidiaphragm; cardiomegaly sets a
    cardiothoracic ratio of 0.56-0.72 (normal 0.40-0.47). `rngs`: each finding type's generator."""
    if "atelectasis" in fs:
        rng = rngs["atelectasis"]
        f = fs["atelectasis"]
        k = _SIDE_INDEX[f.side]
        lift = (0.02 if f.severity == "mild" else 0.045) + rng.uniform(0, 0.01)
        dome, ycp = list(pt.dome_top), list(pt.y_cp)
        dome[k] -= lift
        ycp[k] -= lift
        pt = replace(pt, dome_top=(dome[0], dome[1]), y_cp=(ycp[0], ycp[1]))
    if "cardiomegaly" in fs:
        rng = rngs["cardiomegaly"]
        lo, hi = {"mild": (0.56, 0.59), "moderate": (0.61, 0.65), "severe": (0.67, 0.72)}[fs["cardiomegaly"].severity]
        ctr = rng.uniform(lo, hi)
        pt = replace(pt, ctr=ctr, heart_ry=pt.heart_ry * (1 + 0.5 * (ctr - 0.44)))
    return pt


def _draw_effusion(s: _Scene, f: Finding, rng: np.random.Generator) -> np.ndarray:
    """Dense fluid at the base climbing the lateral wall (meniscus): a small effusion blunts the
    costophrenic angle, a large one hides the dome. Returns the fluid inside the lung fields (0..1)."""
    cv, pt = s.cv, s.cv.pt
    footprint = np.zeros_like(cv.xa)
    for side in (("left", "right") if f.side == "bilateral" else (f.side,)):
        k = _SIDE_INDEX[side]
        H = pt.y_cp[k] - pt.y_top[k]
        # Fluid height at the lateral wall (fraction of the lung height), and the meniscus height.
        frac = {"small": 0.2, "moderate": 0.38, "large": 0.6}[f.severity] + rng.uniform(-0.02, 0.03)
        men = {"small": 0.075, "moderate": 0.065, "large": 0.05}[f.severity]
        lat = np.clip((cv.ad - _f32(pt.m0)) * _f32(1 / pt.lung_w[k]), 0, 1)
        y_f = _f32(pt.y_cp[k] - frac * H + men) - _f32(men) * lat * lat
        fluid = np.clip((cv.ya - y_f) * _f32(1 / 0.012) + _f32(0.3), 0, 1) * cv.side_mask(side)
        s.lung_eff *= 1 - _f32(0.94) * fluid
        s.extra += _f32(0.05) * fluid * np.clip((cv.ya - y_f) * _f32(1 / H), 0, 1) * s.lung.mask
        footprint = np.maximum(footprint, fluid * s.lung.mask)
    return footprint


def _draw_pneumothorax(s: _Scene, f: Finding, rng: np.random.Generator) -> np.ndarray:
    """The lung collapses toward its base and hilum; the space between is darker, without markings, and
    the visceral pleural line shows. Returns the air space (0..1)."""
    cv, pt = s.cv, s.cv.pt
    k = _SIDE_INDEX[f.side]
    sy = {"small": 0.85, "moderate": 0.71, "large": 0.55}[f.severity] + rng.uniform(-0.03, 0.03)
    sx = {"small": 0.965, "moderate": 0.84, "large": 0.62}[f.severity] + rng.uniform(-0.015, 0.015)
    Lk, H = pt.lung_w[k], pt.y_cp[k] - pt.y_top[k]
    ax, ay = pt.m0 + 0.3 * Lk, pt.y_cp[k] - 0.06 * H
    col = _lung_shape(cv, _f32(ax) + (cv.ad - _f32(ax)) * _f32(1 / sx), _f32(ay) + (cv.ya - _f32(ay)) * _f32(1 / sy),
                      pt.m0, Lk, pt.y_top[k], pt.y_cp[k], pt.dome_top[k], width_px=1.8 / min(sx, sy)).mask
    side = cv.side_mask(f.side)
    lung_side = s.lung.mask * side
    space = lung_side * (1 - col)
    line = 4 * col * (1 - col) * np.clip(lung_side * 3 - 2, 0, 1) * cv.ramp(_f32(ay - 0.02) - cv.ya, 4)
    s.vessel_gain *= 1 - space
    s.lung_eff *= 1 - _f32(0.12) * col * side
    s.extra += _f32(-0.07) * space + _f32(0.17) * line
    return space


def _draw_consolidation(s: _Scene, f: Finding, rng: np.random.Generator) -> np.ndarray:
    """Dense patchy airspace opacity in its lobe (markings hidden); the right upper lobe one stops
    sharply at the minor fissure. Returns the opacity (0..1)."""
    cv, pt = s.cv, s.cv.pt
    r, c = _pick_pixel(rng, _lobe_zone(cv, s.lung, f.location, pt) * s.lung.mask * (1 - s.heart), 0.9)
    cx, cy = float(cv.xa[r, c]), float(cv.ya[r, c])
    n_blobs, sig, spread = (5, 0.038, 0.03) if f.severity == "small" else (9, 0.052, 0.055)
    acc = np.zeros_like(cv.xa)
    for _ in range(n_blobs):
        bx, by = cx + rng.normal(0, spread), cy + rng.normal(0, spread * 0.8)
        sg = sig * rng.uniform(0.7, 1.2)
        acc += np.exp(((cv.xa - _f32(bx)) ** 2 + (cv.ya - _f32(by)) ** 2) * _f32(-1 / (2 * sg * sg)))
    cons = np.clip(acc * _f32(2.6) - _f32(0.15) + _f32(0.25) * s.fine, 0, 1)
    cons *= np.clip(_lobe_zone(cv, s.lung, f.location, pt, soft=0.1) * 2.0, 0, 1) * s.lung.mask
    if f.location == "right upper lobe":
        kr = _SIDE_INDEX["right"]
        cons *= cv.ramp(_f32(pt.y_top[kr] + 0.44 * (pt.y_cp[kr] - pt.y_top[kr])) - cv.ya, 1.2)
    s.lung_eff *= 1 - _f32(0.88) * cons
    s.vessel_gain *= 1 - cons
    return cons


def _draw_nodule(s: _Scene, f: Finding, rng: np.random.Generator) -> np.ndarray:
    """A round, well-defined soft-tissue density in its lobe, clear of the heart and lung edges.
    Returns the disk (0..1)."""
    cv, pt = s.cv, s.cv.pt
    rad = rng.uniform(0.016, 0.022) if f.severity == "small" else rng.uniform(0.03, 0.04)
    room = (s.thick > 0.97).astype(np.float32)  # neighbourhood all lung
    r, c = _pick_pixel(rng, _lobe_zone(cv, s.lung, f.location, pt) * room * (1 - s.heart), 0.95)
    cx, cy = float(cv.xa[r, c]), float(cv.ya[r, c])
    ell = rng.uniform(0.85, 1.15)
    dist = np.sqrt(((cv.xa - _f32(cx)) * _f32(ell)) ** 2 + ((cv.ya - _f32(cy)) / _f32(ell)) ** 2)
    disk = cv.ramp(_f32(rad) - dist, 1.2)
    s.lung_eff *= 1 - _f32(0.92) * disk
    s.extra += _f32(0.06) * disk
    s.vessel_gain *= 1 - disk
    return disk


def _draw_atelectasis(s: _Scene, f: Finding, rng: np.random.Generator) -> np.ndarray:
    """Plate-like linear basal opacities (the dome was lifted in _adjust_anatomy), plus a wedge of
    collapsed lower lobe when moderate. Returns the plates and wedge (0..1)."""
    cv, pt = s.cv, s.cv.pt
    xa, ya = cv.xa, cv.ya
    k = _SIDE_INDEX[f.side]
    sign, Lk, H = SIDE_SIGN[f.side], pt.lung_w[k], pt.y_cp[k] - pt.y_top[k]
    th = 0.0095 if f.severity == "mild" else 0.013
    plates = np.zeros_like(xa)
    for _ in range(2):
        bx = 0.5 + sign * (pt.m0 + rng.uniform(0.4, 0.62) * Lk)
        by = pt.y_top[k] + rng.uniform(0.68, 0.82) * H
        phi = rng.uniform(-0.2, 0.2) * sign
        half = rng.uniform(0.08, 0.12)
        uu = (xa - _f32(bx)) * _f32(math.cos(phi)) + (ya - _f32(by)) * _f32(math.sin(phi))
        vv = -(xa - _f32(bx)) * _f32(math.sin(phi)) + (ya - _f32(by)) * _f32(math.cos(phi))
        plates = np.maximum(plates, cv.ramp(_f32(half) - np.abs(uu), 6) * cv.ramp(_f32(th) - np.abs(vv), 1.2))
    if f.severity == "moderate":
        wx, wy = 0.5 + sign * (pt.m0 + 0.3 * Lk), pt.y_top[k] + 0.9 * H
        wedge = np.exp(-((xa - _f32(wx)) / _f32(0.06)) ** 2 - ((ya - _f32(wy)) / _f32(0.045)) ** 2)
        plates = np.maximum(plates, _f32(0.8) * wedge)
    plates *= s.lung.mask * cv.side_mask(f.side)
    s.lung_eff *= 1 - _f32(0.85) * plates
    s.vessel_gain *= 1 - plates
    return plates


def _draw_edema(s: _Scene, f: Finding, rng: np.random.Generator) -> np.ndarray:
    """Bilateral perihilar haze, prominent vessels and a reticular pattern, growing with severity.
    Returns the perihilar haze inside the lung fields (0..1)."""
    cv, pt = s.cv, s.cv.pt
    e = {"mild": 1, "moderate": 2, "severe": 3}[f.severity]
    amp = (0.4, 0.6, 0.8)[e - 1]
    sx, sy = 0.075 + 0.025 * e, 0.1 + 0.035 * e
    hx_ad = cv.per_side((pt.m0 + 0.2 * pt.lung_w[0], pt.m0 + 0.2 * pt.lung_w[1]))
    haze = np.exp(-((cv.ad - hx_ad) / _f32(sx)) ** 2 - ((cv.ya - cv.per_side(pt.hilum_y)) / _f32(sy)) ** 2)
    haze = np.clip(haze * (_f32(0.85) + _f32(0.3) * s.blotch), 0, 1)
    s.lung_eff *= (1 - _f32(amp) * haze) * _f32(1 - 0.05 * e)
    net = np.exp(-((s.fine * _f32(1 / 0.22)) ** 2))  # zero-level lines of smooth noise: a network
    s.extra += _f32(0.035 * e) * net * s.lung_eff
    s.vessel_gain *= _f32(1 + 0.35 * e)
    return haze * s.lung.mask


# Drawn in this order (the findings generator is consumed in it).
_DRAW = {"pleural_effusion": _draw_effusion, "pneumothorax": _draw_pneumothorax,
         "consolidation": _draw_consolidation, "nodule": _draw_nodule, "atelectasis": _draw_atelectasis,
         "edema": _draw_edema}


@dataclass
class _Prepared:
    """What the image and the finding masks share: the scene with every finding drawn (the patient,
    canvas, lungs and heart in it), the mediastinum, the vessels, each drawer's footprint, and the
    generator of the noise."""

    scene: _Scene
    med: np.ndarray
    vessels: np.ndarray
    footprints: dict[str, np.ndarray]
    r_noise: np.random.Generator


def _prepare(findings: Sequence[Finding | dict[str, Any]], size: int, rng: np.random.Generator,
             finding_rngs: Mapping[str, np.random.Generator] | None = None) -> _Prepared:
    """Everything up to the drawn findings, the generator streams consumed as render_phantom always
    has (anatomy, vessels, findings, noise), so the image and the masks agree."""
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"phantom size must be {MIN_SIZE}..{MAX_SIZE} pixels, got {size}")
    size = int(size)
    fs = {f.type: f for f in as_findings(findings)}
    r_anat, r_vessel, r_find, r_noise = rng.spawn(4)
    rngs = {t: r_find for t in fs} if finding_rngs is None else finding_rngs
    pt = _adjust_anatomy(_sample_patient(r_anat), fs, rngs)
    cv = _Canvas(pt, size)
    xa, ya, d, ad = cv.xa, cv.ya, cv.d, cv.ad
    L = cv.per_side(pt.lung_w)
    lung = _lung_shape(cv, ad, ya, pt.m0, L, cv.per_side(pt.y_top), cv.per_side(pt.y_cp), cv.per_side(pt.dome_top))
    thorax_w = 2 * pt.m0 + pt.lung_w[0] + pt.lung_w[1]
    # Depth of lung each ray crosses: thinner near the edges of the field (blurred mask).
    thick = np.asarray(Image.fromarray((lung.mask * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(radius=0.035 * size * pt.scale)), dtype=np.float32) * _f32(1 / 255)
    lung_depth = lung.mask * (_f32(0.55) + _f32(0.45) * np.clip(thick * _f32(1.6), 0, 1))

    # Heart: the upper half of a sheared ellipse centred at the level of the domes, so that it sits
    # on the diaphragm, widest at its base, apex to the image right (the patient's left); its width
    # is the cardiothoracic ratio times the thorax width.
    rx = 0.5 * pt.ctr * thorax_w
    cy, ry = _f32(pt.heart_cy), _f32(pt.heart_ry)
    xs = xa - _f32(0.5 + 0.34 * rx) - _f32(pt.heart_shear) * (ya - cy)
    heart = cv.ramp((1 - np.sqrt((xs / _f32(rx)) ** 2 + ((ya - cy) / ry) ** 2)) * _f32(min(rx, pt.heart_ry)), 1.2)
    # Superior mediastinum: SVC border on the image left, aortic knob on the image right.
    top_h = pt.heart_cy - pt.heart_ry
    mw = _f32(pt.med_w) + _f32(0.025) * np.clip((ya - _f32(0.15)) * _f32(1 / max(top_h - 0.15, 0.05)), 0, 1)
    med = cv.ramp(mw - np.abs(d - _f32(0.004)), 1.2) * cv.ramp(cy - ya, 2)
    knob = cv.ramp(_f32(0.03) - np.sqrt(((xa - _f32(0.5 + pt.med_w + 0.012)) * _f32(1.1)) ** 2
                                        + (ya - _f32(top_h - 0.055)) ** 2), 1.2)
    med = np.maximum(med, knob)

    vessels = _vessels(cv, lung.mask, r_vessel)
    scene = _Scene(
        cv=cv, lung=lung, thick=thick, heart=heart,
        fine=_smooth_noise(r_vessel, size, 24), blotch=_smooth_noise(r_vessel, size, 9),
        lung_eff=lung_depth * (1 - _f32(0.93) * heart) * (1 - _f32(0.93) * med),  # minus what lies in front
        vessel_gain=np.ones_like(xa), extra=np.zeros_like(xa),
    )
    footprints = {ftype: draw(scene, fs[ftype], rngs[ftype]) for ftype, draw in _DRAW.items() if ftype in fs}
    if "cardiomegaly" in fs:  # drawn as anatomy (_adjust_anatomy): the enlarged heart is its place
        footprints["cardiomegaly"] = heart
    return _Prepared(scene, med, vessels, footprints, r_noise)


MASK_LEVEL = 0.5  # a pixel belongs to a finding where its drawn layer reaches half strength


def finding_masks(findings: Sequence[Finding | dict[str, Any]], size: int, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
    """Where each finding of a phantom is drawn: {type: bool [size, size]}.

    With the generator state `render_phantom` got (same findings and size), it reproduces the patient and
    the findings' placement from the same streams without composing the image; a pixel is in a mask where
    the layer the finding's drawer adds (its footprint; for cardiomegaly the enlarged heart) reaches
    MASK_LEVEL.
    """
    prep = _prepare(findings, size, rng)
    return {t: fp >= _f32(MASK_LEVEL) for t, fp in prep.footprints.items()}


def render_phantom(findings: Sequence[Finding | dict[str, Any]], size: int, rng: np.random.Generator,
                   finding_rngs: Mapping[str, np.random.Generator] | None = None) -> np.ndarray:
    """One PA chest radiograph phantom, uint8 [size, size] (0 black air, 255 white bone/fluid;
    the patient's left on the image right).

    `rng` is split into independent streams (anatomy, vessels, findings, noise), so the same state with
    and without a finding differs by the finding itself. `finding_rngs` (one generator per finding type)
    replaces the shared findings stream, so two images differing in one finding draw every other finding
    identically (the twin phantoms).
    """
    prep = _prepare(findings, size, rng, finding_rngs)
    size = int(size)
    scene, med, r_noise = prep.scene, prep.med, prep.r_noise
    cv, lung, heart = scene.cv, scene.lung, scene.heart
    pt, xa, ya, d, ad = cv.pt, cv.xa, cv.ya, cv.d, cv.ad
    L = cv.per_side(pt.lung_w)
    top_h = pt.heart_cy - pt.heart_ry

    # Body outline: neck, sloping shoulders, chest wall widening slightly downward.
    wall = _f32(0.465 * pt.body_w) + _f32(0.02) * np.clip(ya - _f32(0.3), 0, 1)
    sh = np.clip((ya - _f32(pt.y_top[0] - 0.13)) * _f32(1 / 0.2), 0, 1)
    body = cv.ramp(np.maximum(_f32(0.1), wall * (1 - (1 - sh) ** 2) ** _f32(0.7)) - ad, 2.5)
    abdomen = cv.ramp(ya - lung.y_dome, 1.5) * body
    bubble_r = np.sqrt(((xa - _f32(0.5 + pt.m0 + 0.35 * pt.lung_w[1])) * _f32(1 / 0.045)) ** 2
                       + ((ya - _f32(pt.dome_top[1] + 0.05)) * _f32(1 / 0.026)) ** 2)
    bubble = cv.ramp((1 - bubble_r) * _f32(0.026), 2) * abdomen  # gastric air under the LEFT dome
    trachea = cv.ramp(_f32(0.012) - np.abs(d + _f32(0.003)), 1.5) * cv.ramp(_f32(top_h - 0.03) - ya, 3)

    # Bones: spine with vertebral bodies, clavicles, posterior ribs curving down laterally, faint
    # anterior ribs sloping down medially (bands of a warped periodic coordinate: all ribs at once).
    spine = cv.ramp(_f32(0.032) - ad, 1.5) * (_f32(0.9) + _f32(0.1) * np.cos(ya * _f32(2 * math.pi / 0.05)) ** 2)
    yc = _f32(pt.clav_y) - _f32(0.3) * (ad - _f32(0.05)) + _f32(0.45) * (ad - _f32(0.05)) ** 2
    clav = cv.ramp(_f32(0.0125) - np.abs(ya - yc), 1.5) * cv.ramp(ad - _f32(0.03), 2) * cv.ramp(_f32(0.31) - ad, 6)
    cage = (cv.ramp(pt.m0 + L + _f32(0.02) - ad, 2) * cv.ramp(ad - _f32(0.028), 1.5)
            * cv.ramp(ya - _f32(pt.rib_r0 - 0.03), 4)) * body
    q = (ya - _f32(1.15) * (ad - _f32(0.09)) ** 2 - _f32(pt.rib_r0)) * _f32(1 / pt.rib_sp)
    q = q - _f32(0.006) * q * q  # spacing widens downward
    p = (q - np.round(q)) * _f32(pt.rib_sp / pt.rib_th) / (_f32(1) - _f32(0.8) * np.clip(ad - _f32(0.1), 0, _f32(0.4)))
    p2 = p * p
    ribs = np.exp(-(p2 * p2)) * (_f32(0.75) + _f32(0.25) * np.minimum(p2, 1)) * (q > -0.5) * (q < 10.5)
    qa = (ya + _f32(0.38) * ad - _f32(pt.rib_r0 + 0.12)) * _f32(1 / 0.085)
    pa = (qa - np.round(qa)) * _f32(0.085 / 0.016)
    pa2 = pa * pa
    ribs_a = np.exp(-(pa2 * pa2)) * (qa > -0.5) * (qa < 5.5) * cv.ramp(ad - _f32(0.13), 8)
    bones = (_f32(0.07) * ribs + _f32(0.035) * ribs_a) * cage * (_f32(0.45) + _f32(0.55) * lung.mask)
    hil = np.zeros_like(xa)
    for k, sign in ((0, -1.0), (1, 1.0)):
        hx = 0.5 + sign * (pt.m0 + 0.13 * pt.lung_w[k])
        hil += np.exp(((xa - _f32(hx)) ** 2 + (ya - _f32(pt.hilum_y[k])) ** 2) * _f32(-1 / (2 * 0.026**2)))

    vessels = prep.vessels
    # Density (~ attenuation) -> brightness: air black, soft tissue grey, heart/abdomen/bone white.
    # Heart, mediastinum and abdomen are all soft tissue: where they overlap take the densest.
    solid = np.maximum(np.maximum(_f32(0.2) * abdomen, _f32(0.17) * heart), _f32(0.14) * med)
    lung_eff = scene.lung_eff
    D = (_f32(pt.soft) * body + solid - _f32(0.12) * bubble
         - _f32(0.26) * lung_eff + _f32(0.17) * vessels * scene.vessel_gain * lung_eff + _f32(0.07) * hil * lung.mask
         + bones + _f32(0.1) * clav + _f32(0.06) * spine - _f32(0.1) * trachea + scene.extra)
    D += _f32(0.02) * (scene.fine + scene.blotch) * lung.mask  # parenchymal texture
    for _ in range(max(1, round(size / 224))):  # [1 2 1]/4 blur: the soft edges of a real film
        D[1:-1] = _f32(0.5) * D[1:-1] + _f32(0.25) * (D[:-2] + D[2:])
        D[:, 1:-1] = _f32(0.5) * D[:, 1:-1] + _f32(0.25) * (D[:, :-2] + D[:, 2:])
    img = np.clip((D - _f32(pt.lo)) * _f32(1 / (pt.hi - pt.lo)), 0, 1) ** _f32(pt.gamma)
    img += _f32(pt.mottle) * _smooth_noise(r_noise, size, 6) * body
    img += _f32(pt.noise) * r_noise.standard_normal((size, size), dtype=np.float32)
    return (np.clip(img, 0, 1) * _f32(255) + _f32(0.5)).astype(np.uint8)


def encode_png(img: np.ndarray) -> bytes:
    """8-bit grayscale PNG bytes with fixed settings (no timestamp or text chunks)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()
