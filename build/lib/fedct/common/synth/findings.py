"""Lung findings per class, and the knobs that make the classes overlap.

* COVID-19: bilateral, subpleural, posterior- and lower-predominant multifocal ground glass,
  sometimes crazy paving, consolidation growing with severity.  Severity 1-4 follows
  MosMedData CT-1..CT-4: the share of lung involved is <25%, 25-50%, 50-75%, >75%.
* Common pneumonia (CP): lobar or segmental consolidation, often one-sided, with a ground
  glass halo; the airways drawn afterwards give air bronchograms.
* Non-COVID abnormal (NCA): nodules, a mass, a cavity, emphysema, pleural effusion,
  plate atelectasis.
* Normal: nothing, or a minor incidental finding.

Diffuse findings are fields on the coarse grid (see :class:`~fedct.common.synth.phantom.Lesions`);
focal ones are capsules drawn at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
from scipy import ndimage

from fedct.common.synth.phantom import (
    Anatomy,
    Grid,
    Lesions,
    LungFields,
    Tube,
    lung_fields,
    smooth_noise,
)

Kind = Literal["normal", "covid", "cp", "nca"]
KINDS: tuple[Kind, ...] = ("normal", "covid", "cp", "nca")

# MosMedData CT-1..CT-4: the share of lung involved, drawn uniformly inside these bounds.
COVID_INVOLVEMENT = ((0.02, 0.22), (0.27, 0.47), (0.53, 0.72), (0.78, 0.92))


@dataclass(frozen=True)
class Difficulty:
    """How hard the classes are to tell apart (see docs/synthetic-cohorts.md).

    The defaults keep a good model below AUC 1.0: faint and small lesions, ground glass in
    some pneumonias, minor findings in some normal scans, scanner noise.
    """

    lesion_contrast: float = 1.0  # multiplies every lesion's density (1 = textbook)
    min_lesion_mm: float = 5.0  # smallest nodule diameter and ground-glass focus scale
    ggo_in_pneumonia: float = 0.35  # chance that a pneumonia also has patchy ground glass
    incidental_in_normal: float = 0.35  # chance that a normal scan has a minor finding
    faint_covid: float = 0.25  # chance that a COVID-19 scan's ground glass is 40% as dense
    atypical_covid: float = 0.15  # chance of a central or one-sided COVID-19 pattern
    noise_scale: float = 1.0  # multiplies each scanner's noise level

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0:
                raise ValueError(f"Difficulty.{f.name} must be >= 0, got {value}")
        for name in ("ggo_in_pneumonia", "incidental_in_normal", "faint_covid", "atypical_covid"):
            if getattr(self, name) > 1:
                raise ValueError(f"Difficulty.{name} is a probability, got {getattr(self, name)}")


def draw_lesions(
    kind: Kind,
    severity: int,
    rng: np.random.Generator,
    anatomy: Anatomy,
    grid: Grid,
    difficulty: Difficulty,
) -> Lesions | None:
    """The findings of one scan, or None for a normal scan without incidental findings.

    ``severity`` is 0 for normal scans and 1-4 otherwise: the MosMedData CT-k level for
    COVID-19, the extent (one segment .. several lobes) for CP, the number and size of
    findings for NCA.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "normal" and severity != 0:
        raise ValueError("a normal scan has severity 0")
    if kind != "normal" and severity not in (1, 2, 3, 4):
        raise ValueError(f"severity must be 1-4 for {kind}, got {severity}")
    coarse = grid.coarse()
    ctx = _Context(rng, anatomy, coarse, lung_fields(anatomy, coarse), difficulty)
    if kind == "covid":
        lesions = _covid(ctx, severity)
    elif kind == "cp":
        lesions = _pneumonia(ctx, severity)
    elif kind == "nca":
        lesions = _abnormal(ctx, severity)
    elif rng.random() < difficulty.incidental_in_normal:
        lesions = _incidental(ctx)
    else:
        return None
    opacity, lucency = (_smooth(f) for f in (lesions.opacity, lesions.lucency))
    if opacity is not None:
        opacity = np.clip(opacity * difficulty.lesion_contrast, 0, 1)
    return Lesions(opacity, lucency, lesions.solid, lesions.air, rng.uniform(0, 40))


def _smooth(field_: np.ndarray | None) -> np.ndarray | None:
    """Round off the coarse cells so that upsampled lesion edges do not show steps."""
    if field_ is None:
        return None
    return ndimage.gaussian_filter(field_.astype(np.float32), (0, 0.7, 0.7), mode="nearest")


@dataclass(frozen=True, eq=False)
class _Context:
    rng: np.random.Generator
    anatomy: Anatomy
    grid: Grid  # the coarse grid
    lung: LungFields
    difficulty: Difficulty

    def noise(self, sigma_mm: float) -> np.ndarray:
        return smooth_noise(self.rng, self.grid, sigma_mm)

    def side(self, sign: float) -> np.ndarray:
        """1 on the patient's right (sign < 0) or left (sign > 0) half of the grid."""
        x = self.grid.axes()[2]
        return (x * sign > 0).astype(np.float32)

    def points(self, n: int, weight: np.ndarray | float = 1.0) -> np.ndarray:
        """``n`` random (x, y, z) points well inside the lungs, drawn in proportion to weight."""
        w = np.broadcast_to((self.lung.fraction > 0.9) * weight, self.grid.shape).ravel()
        idx = self.rng.choice(w.size, size=n, p=w / w.sum())
        k, i, j = np.unravel_index(idx, self.grid.shape)
        z, y, x = (a.ravel() for a in self.grid.axes())
        centre = np.stack([x[j], y[i], z[k]], axis=1)
        cell = np.array([self.grid.spacing[2], self.grid.spacing[1], self.grid.spacing[0]])
        return centre + self.rng.uniform(-0.5, 0.5, size=(n, 3)) * cell

    def top_share(
        self, score: np.ndarray, share: float, weight: np.ndarray | float = 1.0
    ) -> np.ndarray:
        """Soft mask of the highest-``score`` lung holding ``share`` of the (weighted) lung."""
        w = np.broadcast_to(self.lung.fraction * weight, self.grid.shape).ravel()
        s = np.broadcast_to(score, self.grid.shape).ravel()
        order = np.argsort(s)[::-1]
        cumulative = np.cumsum(w[order])
        k = min(int(np.searchsorted(cumulative, share * cumulative[-1])), s.size - 1)
        return np.clip(0.5 + (score - s[order[k]]) / 0.3, 0, 1).astype(np.float32)


def _covid(ctx: _Context, severity: int) -> Lesions:
    rng, lung, d = ctx.rng, ctx.lung, ctx.difficulty
    share = rng.uniform(*COVID_INVOLVEMENT[severity - 1])
    focal = ctx.noise(max(d.min_lesion_mm, 2.0))
    score = ctx.noise(16.0) + 0.5 * focal
    if rng.random() < d.atypical_covid:
        if rng.random() < 0.5:
            score = score - 1.2 * lung.peripheral  # central
        else:
            score = score + 3 * ctx.side(rng.choice([-1.0, 1.0]))  # one-sided
    else:
        score = score + 1.6 * lung.peripheral + 1.0 * lung.posterior + 0.8 * lung.lower
    involved = ctx.top_share(score, share)
    density = rng.uniform(0.25, 0.42) * (0.4 if rng.random() < d.faint_covid else 1.0)
    opacity = involved * density * (1 + 0.2 * focal)
    if rng.random() < 0.1 + 0.1 * severity:
        # Crazy paving: thickened septal lines drawn over the ground glass.
        septa = np.clip(1 - np.abs(ctx.noise(3.0)) / 0.35, 0, 1)
        opacity += involved * 0.25 * septa
    consolidation = ctx.top_share(score, share * (0.03 + 0.08 * severity))
    opacity = np.maximum(opacity, consolidation * rng.uniform(0.8, 0.95))
    return Lesions(opacity=opacity.astype(np.float32))


def _lobes(ctx: _Context, sign: float) -> list[np.ndarray]:
    """Soft masks of the lobes of one lung: lower, upper and, on the right, middle.

    The oblique fissure runs from high at the back to low in front; the horizontal one
    splits the right non-lower lung at mid height.
    """
    height = 1 - ctx.lung.lower
    scale = ctx.anatomy.z_apex - ctx.anatomy.z_base
    px = ctx.grid.pixel
    oblique = 0.3 + 0.45 * (ctx.lung.posterior + 1) / 2
    lower = np.clip(0.5 + (oblique - height) * scale / px, 0, 1) * ctx.side(sign)
    rest = ctx.side(sign) - lower
    if sign > 0:
        return [lower, rest]
    upper = np.clip(0.5 + (height - 0.58) * scale / px, 0, 1)
    return [lower, rest * upper, rest * (1 - upper)]


def _pneumonia(ctx: _Context, severity: int) -> Lesions:
    rng, d = ctx.rng, ctx.difficulty
    right_first = rng.random() < 0.6
    sides = [-1.0 if right_first else 1.0]
    if severity == 4 or rng.random() < 0.3:
        sides.append(-sides[0])
    z, y, x = ctx.grid.axes()
    region = np.zeros(ctx.grid.shape, np.float32)
    n_regions = {1: 1, 2: 1, 3: 2, 4: 3}[severity]
    for i in range(n_regions):
        lobes = _lobes(ctx, sides[i % len(sides)])
        lobe = lobes[rng.choice(len(lobes), p=_lobe_odds(len(lobes)))]
        if severity == 1 or (severity == 3 and i == 1):
            # One segment: the part of the lobe near a point inside it.
            cx, cy, cz = ctx.points(1, lobe)[0]
            r = rng.uniform(25, 45)
            dist = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
            lobe = lobe * np.clip((r - dist) / 10 + 0.5, 0, 1)
        region = np.maximum(region, lobe)
    patchy = region * (1 + 0.3 * ctx.noise(10.0))
    consolidation = np.clip((patchy - 0.55) / 0.15, 0, 1) * rng.uniform(0.85, 1.0)
    sigma = [8.0 / s for s in ctx.grid.spacing]
    halo = 0.3 * ndimage.gaussian_filter(consolidation, sigma)
    opacity = np.maximum(consolidation, halo)
    if rng.random() < d.ggo_in_pneumonia:
        ggo = ctx.top_share(ctx.noise(14.0), rng.uniform(0.05, 0.2)) * rng.uniform(0.2, 0.35)
        opacity = np.maximum(opacity, ggo)
    return Lesions(opacity=opacity.astype(np.float32))


def _lobe_odds(n: int) -> np.ndarray:
    """Lower lobes are the commonest site of bacterial pneumonia."""
    odds = np.array([0.55, 0.3, 0.15][:n])
    return odds / odds.sum()


def _nodules(ctx: _Context, count: int, largest_mm: float) -> list[Tube]:
    """Lobulated nodules: each one to three overlapping spheres."""
    rng = ctx.rng
    tubes = []
    smallest = max(ctx.difficulty.min_lesion_mm, 3.0)
    for centre in ctx.points(count):
        r = rng.uniform(smallest, max(largest_mm, smallest)) / 2
        for _ in range(rng.integers(1, 4)):
            offset = rng.normal(0, 0.3 * r, 3)
            p = tuple(float(v) for v in centre + offset)
            tubes.append(Tube(p, p, r * rng.uniform(0.6, 1.0)))
    return tubes


def _abnormal(ctx: _Context, severity: int) -> Lesions:
    rng, lung = ctx.rng, ctx.lung
    choices = ("nodules", "mass", "cavity", "emphysema", "effusion", "atelectasis")
    picked = rng.choice(len(choices), size=min(3, 1 + max(0, severity - 2)), replace=False)
    solid: list[Tube] = []
    air: list[Tube] = []
    opacity = np.zeros(ctx.grid.shape, np.float32)
    lucency = None
    for name in sorted(choices[i] for i in picked):
        if name == "nodules":
            solid += _nodules(ctx, int(rng.integers(1, 3 + severity)), 8 + 4 * severity)
        elif name == "mass":
            solid += _nodules(ctx, 1, 25 + 8 * severity)
        elif name == "cavity":
            (centre,) = ctx.points(1)
            r = rng.uniform(10, 14 + 3 * severity)
            p = tuple(float(v) for v in centre)
            solid.append(Tube(p, p, r))
            inner = tuple(float(v) for v in centre + rng.normal(0, 0.15 * r, 3))
            air.append(Tube(inner, inner, r * rng.uniform(0.4, 0.7)))
        elif name == "emphysema":
            # Centrilobular holes, upper-lobe predominant, and a few subpleural bullae.
            score = ctx.noise(4.0) + 1.2 * (1 - lung.lower)
            holes = ctx.top_share(score, 0.05 + 0.06 * severity)
            lucency = holes * rng.uniform(0.35, 0.6)
            upper = 1 - lung.lower + lung.peripheral
            for centre in ctx.points(int(rng.integers(0, 2 + severity)), upper):
                p = tuple(float(v) for v in centre)
                air.append(Tube(p, p, rng.uniform(5, 12 + 3 * severity)))
        elif name == "effusion":
            # Fluid lies in the dependent, basal lung of one side (both when severe).
            signs = [-1.0, 1.0] if severity == 4 else [rng.choice([-1.0, 1.0])]
            for sign in signs:
                score = lung.posterior + 1.5 * lung.lower + 0.4 * lung.peripheral
                fluid = ctx.top_share(score, 0.04 + 0.04 * severity, ctx.side(sign))
                collapse = ndimage.gaussian_filter(fluid, [6.0 / s for s in ctx.grid.spacing])
                opacity = np.maximum(opacity, np.maximum(fluid, 0.5 * collapse))
        else:
            opacity = np.maximum(opacity, _plate_atelectasis(ctx, 0.8))
    return Lesions(opacity=opacity, lucency=lucency, solid=tuple(solid), air=tuple(air))


def _plate_atelectasis(ctx: _Context, density: float) -> np.ndarray:
    """A thin, slightly oblique band of collapsed lung in a lower lobe."""
    rng, an = ctx.rng, ctx.anatomy
    z, y, x = ctx.grid.axes()
    z0 = an.z_base + rng.uniform(0.2, 0.45) * (an.z_apex - an.z_base)
    tilt = rng.uniform(-0.3, 0.3)
    thickness = rng.uniform(3, 6)
    band = np.clip(0.5 + (thickness / 2 - np.abs(z - z0 - tilt * y)) / ctx.grid.slab, 0, 1)
    return (band * ctx.side(rng.choice([-1.0, 1.0])) * density).astype(np.float32)


def _incidental(ctx: _Context) -> Lesions:
    """One minor finding in an otherwise normal scan."""
    rng, lung = ctx.rng, ctx.lung
    choice = rng.integers(4)
    if choice == 0:
        return Lesions(solid=tuple(_nodules(ctx, 1, ctx.difficulty.min_lesion_mm + 3)))
    if choice == 1:
        return Lesions(opacity=_plate_atelectasis(ctx, 0.5))
    if choice == 2:
        # Dependent density: faint, posterior, basal; it looks like early ground glass.
        score = 2 * lung.posterior + lung.lower
        share = rng.uniform(0.02, 0.08)
        return Lesions(opacity=ctx.top_share(score, share) * rng.uniform(0.15, 0.25))
    holes = ctx.top_share(ctx.noise(4.0) + 1.2 * (1 - lung.lower), 0.03)
    return Lesions(lucency=holes * 0.3)
