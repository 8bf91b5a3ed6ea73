"""Chest-CT phantoms in Hounsfield units, drawn on a scan's voxel grid.

The anatomy is analytic: ellipses and ellipsoids with partial-volume edges, capsules
("tubes") for the great vessels, airways and pulmonary vessel trees, a diaphragm height map
under each lung, and smooth noise computed on a coarse grid and upsampled for texture.
Arrays are ``(slice, row, column)`` as a DICOM series shows them: slice 0 is the most
inferior, rows run anterior to posterior and columns from the patient's right to left.
Coordinates are millimetres from the grid centre: x towards the patient's left, y towards
the back, z towards the head (the DICOM LPS axes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

AIR_HU = -1000.0
FAT_HU = -95.0
MUSCLE_HU = 45.0
BLOOD_HU = 40.0
MEDIASTINAL_FAT_HU = -80.0
CORTICAL_BONE_HU = 950.0
RIB_HU = 650.0
STERNUM_HU = 450.0
DISC_HU = 85.0
CSF_HU = 15.0
TABLE_HU = -250.0
AIRWAY_WALL_HU = 30.0

Axes = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Grid:
    """The voxel grid of one axial series: shape ``(S, rows, cols)``, spacing ``(z, y, x)`` mm."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    thickness: float | None = None  # reconstructed slice thickness; None = slice spacing

    @property
    def slab(self) -> float:
        """Thickness of the slab each slice averages (its partial-volume extent in z)."""
        return self.thickness or self.spacing[0]

    @property
    def pixel(self) -> float:
        return max(self.spacing[1], self.spacing[2])

    def axes(self) -> Axes:
        """Voxel-centre coordinates in mm, shaped to broadcast: z (S,1,1), y (1,R,1), x (1,1,C)."""
        z, y, x = (
            ((np.arange(n) - (n - 1) / 2) * d).astype(np.float32)
            for n, d in zip(self.shape, self.spacing, strict=True)
        )
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def coarse(self) -> Grid:
        """The grid of the smooth fields: the same slices, about 64 pixels across."""
        f = _coarse_factor(self.shape[1:])
        s, r, c = self.shape
        dz, dy, dx = self.spacing
        return Grid((s, r // f, c // f), (dz, dy * f, dx * f), self.thickness)


def _coarse_factor(plane: tuple[int, ...]) -> int:
    """The largest of 8, 4, 2 dividing both in-plane sizes and leaving >= 48 pixels, else 1."""
    for f in (8, 4, 2):
        if all(n % f == 0 and n // f >= 48 for n in plane):
            return f
    return 1


@lru_cache(maxsize=32)
def _interpolation(n_fine: int, n_coarse: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower neighbour and weight of linear interpolation from coarse to fine cell centres."""
    u = np.clip((np.arange(n_fine) + 0.5) * n_coarse / n_fine - 0.5, 0, n_coarse - 1)
    lower = np.minimum(np.floor(u).astype(np.intp), max(n_coarse - 2, 0))
    weight = (u - lower).astype(np.float32)
    return lower, weight


def _interpolate(
    values: np.ndarray, axis: int, lower: np.ndarray, weight: np.ndarray
) -> np.ndarray:
    """Linear interpolation of ``values`` along ``axis`` (plain numpy, no BLAS threads)."""
    below = np.take(values, lower, axis=axis)
    if values.shape[axis] == 1:
        return below
    above = np.take(values, lower + 1, axis=axis)
    shape = [1] * values.ndim
    shape[axis] = -1
    above -= below
    above *= weight.reshape(shape)
    above += below
    return above


def upsample(
    coarse: np.ndarray,
    shape: tuple[int, int, int],
    rows: slice = slice(None),
    cols: slice = slice(None),
) -> np.ndarray:
    """Bilinear in-plane upsampling of a coarse ``(S, r, c)`` field to ``shape[rows, cols]``."""
    values = coarse.astype(np.float32, copy=False)
    lower, weight = (a[cols] for a in _interpolation(shape[2], coarse.shape[2]))
    values = _interpolate(values, 2, lower, weight)
    lower, weight = (a[rows] for a in _interpolation(shape[1], coarse.shape[1]))
    return _interpolate(values, 1, lower, weight)


def smooth_noise(rng: np.random.Generator, grid: Grid, sigma_mm: float) -> np.ndarray:
    """Gaussian-correlated noise with unit standard deviation (float32, ``grid.shape``)."""
    white = rng.standard_normal(grid.shape, dtype=np.float32)
    smooth = ndimage.gaussian_filter(white, [sigma_mm / d for d in grid.spacing], mode="wrap")
    return smooth / max(float(smooth.std()), 1e-6)


def soft(margin_mm: np.ndarray, width_mm: float) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre lies ``margin_mm`` inside an edge."""
    alpha = np.asarray(margin_mm * np.float32(1 / width_mm) + np.float32(0.5), np.float32)
    return np.clip(alpha, 0.0, 1.0, out=alpha)


def _ellipse_margin(u: np.ndarray, v: np.ndarray, a: float, b: np.ndarray | float) -> np.ndarray:
    """Approximate signed distance (mm, positive inside) to the ellipse (u/a)^2 + (v/b)^2 = 1."""
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    grad = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2)
    return (1 - r) * r / np.maximum(grad, 1e-3)


@dataclass(frozen=True)
class Tube:
    """A capsule from ``p0`` to ``p1`` (x, y, z mm) of radius ``r`` mm; p0 == p1 is a sphere."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r: float


def tube_alpha(
    tube: Tube, axes: Axes, pixel: float, slab: float
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """The partial-volume fraction of ``tube`` in its bounding box, or None off the grid.

    A slab thicker than the tube sees it wherever the tube passes within the slab, diluted
    by the share of the slab it fills.
    """
    p0, p1 = np.asarray(tube.p0, np.float32), np.asarray(tube.p1, np.float32)
    pad = np.array([tube.r + pixel, tube.r + pixel, tube.r + slab], np.float32)
    lo, hi = np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad
    box = []
    for k, axis in zip((2, 1, 0), axes, strict=True):  # axes are z, y, x; points x, y, z
        line = axis.ravel()
        start, stop = np.searchsorted(line, lo[k]), np.searchsorted(line, hi[k], "right")
        if start >= stop:
            return None
        box.append(slice(int(start), int(stop)))
    z, y, x = axes[0][box[0]], axes[1][:, box[1]], axes[2][..., box[2]]
    d = p1 - p0
    length2 = float(d @ d)
    qx, qy, qz = x - p0[0], y - p0[1], z - p0[2]
    if length2 > 0:
        t = np.clip((qx * d[0] + qy * d[1] + qz * d[2]) / length2, 0, 1)
        qx, qy, qz = qx - t * d[0], qy - t * d[1], qz - t * d[2]
    qz = np.maximum(np.abs(qz) - max(0.0, slab / 2 - tube.r), 0)
    dist = np.sqrt(qx**2 + qy**2 + qz**2)
    along_z = abs(float(d[2])) / np.sqrt(length2) if length2 > 0 else 0.0
    dilution = min(1.0, 2 * tube.r / slab + along_z)
    return (box[0], box[1], box[2]), soft(tube.r - dist, pixel) * np.float32(dilution)


@dataclass(frozen=True, eq=False)
class Anatomy:
    """One patient's body, drawn by :func:`sample_anatomy`; all lengths in mm."""

    body_a: float  # half width of the trunk
    body_b: tuple[float, float]  # half depth in front of / behind its centre
    body_y: float
    fat: float
    muscle: float
    cav_a: float  # the thoracic cavity inside the ribs
    cav_b: tuple[float, float]
    med: float  # half width of the mediastinum between the lungs
    z_apex: float
    z_shoulder: float  # where the lung apex starts to narrow
    z_base: float  # the deepest (posterior) costophrenic recess
    domes: tuple[float, float]  # top of the right and of the left diaphragm dome
    z_carina: float
    heart: tuple[float, float, float, float, float, float]  # centre x, y, z and radii
    spine_y: float
    vert_r: float
    lung_hu: float
    lung_gradient: float  # how much denser the dependent (posterior) lung is
    ribs: tuple[float, float, float]  # pitch, anterior drop, phase
    trabecular_hu: float
    liver_hu: float
    mediastinum: tuple[Tube, ...] = ()  # aorta, caval vein, pulmonary trunk, oesophagus
    vessels: tuple[Tube, ...] = ()
    airways: tuple[Tube, ...] = ()
    gas_bubble: tuple[Tube, ...] = ()  # under the left dome, in about half of the patients


@dataclass(frozen=True, eq=False)
class LungFields:
    """Lung occupancy and position descriptors on a grid (arrays broadcastable to it).

    ``peripheral`` is 0 near the mediastinum and 1 at the chest wall, ``posterior`` runs
    from -1 (front) to 1 (back), ``lower`` from 0 at the apex to 1 at the deepest recess.
    """

    fraction: np.ndarray
    peripheral: np.ndarray
    posterior: np.ndarray
    lower: np.ndarray
    above_diaphragm: np.ndarray


def lung_fields(an: Anatomy, grid: Grid) -> LungFields:
    """Where the lungs are on ``grid``, with partial-volume edges."""
    return _lung_fields(an, grid.axes(), grid.pixel, grid.slab)


def _lung_fields(an: Anatomy, axes: Axes, px: float, slab: float) -> LungFields:
    """The fields on broadcastable ``axes``: a grid's (z, y, x) or points along axis 0.

    The apex, diaphragm and heart terms are evaluated only on the slices they can reach.
    """
    z, y, x = axes
    v = y - an.body_y
    b = np.where(v < 0, an.cav_b[0], an.cav_b[1]).astype(np.float32)
    half = (an.cav_a - an.med) / 2
    hemi_x = np.where(x < 0, -1.0, 1.0).astype(np.float32) * (an.med + half)
    cavity = soft(_ellipse_margin(x, v, an.cav_a, b), px)
    shape = np.broadcast_shapes(z.shape, y.shape, x.shape)
    fraction = np.empty(shape, np.float32)
    fraction[...] = cavity * soft(np.abs(x) - an.med, px)
    above = np.ones(shape, np.float32)

    sel = _where_z(z > an.z_shoulder)
    if sel is not None:
        # Apex: the hemithorax section shrinks like an ellipsoid cap above the shoulders.
        r_hemi = np.sqrt(((x - hemi_x) / half) ** 2 + (v / b) ** 2)
        cap = np.minimum((z[sel] - an.z_shoulder) / (an.z_apex - an.z_shoulder), 1)
        taper = 1.2 * np.sqrt(1 - cap**2)
        fraction[sel] *= soft((taper - _pick(r_hemi, sel)) * min(half, an.cav_b[0]), px)

    sel = _where_z(z < max(an.domes) + slab)
    if sel is not None:
        # Diaphragm: a dome per side, highest in front of centre, lowest in the posterior recess.
        top = np.where(x < 0, an.domes[0], an.domes[1]).astype(np.float32)
        q = ((x - hemi_x) / half) ** 2 + ((v + 0.15 * an.cav_b[0]) / b) ** 2
        drop = np.clip(0.55 * q + 0.4 * np.clip(v / an.cav_b[1], 0, 1), 0, 1)
        dome = top - (top - an.z_base) * drop
        above[sel] = soft(z[sel] - _pick(dome, sel), slab)
        fraction[sel] *= above[sel]

    hx, hy, hz, ha, hb, hc = an.heart
    sel = _where_z(np.abs(z - hz) < hc + px)
    if sel is not None:
        r_xy = ((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2
        r = np.sqrt(_pick(r_xy, sel) + ((z[sel] - hz) / hc) ** 2)
        fraction[sel] *= soft((r - 1) * hb, px)

    r_cav = np.sqrt((x / an.cav_a) ** 2 + (v / b) ** 2)
    return LungFields(
        fraction=fraction,
        peripheral=np.clip((r_cav - 0.35) / 0.65, 0, 1),
        posterior=np.clip(v / b, -1, 1),
        lower=np.clip((an.z_apex - z) / (an.z_apex - an.z_base), 0, 1),
        above_diaphragm=above,
    )


def _where_z(condition: np.ndarray) -> slice | np.ndarray | None:
    """The axis-0 entries where ``condition`` (shaped like the z axis) holds: a slice when
    they are contiguous (sorted grid slices), an index array otherwise, None when empty."""
    idx = np.flatnonzero(condition.ravel())
    if idx.size == 0:
        return None
    if idx[-1] - idx[0] + 1 == idx.size:
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _pick(field_: np.ndarray, sel: slice | np.ndarray) -> np.ndarray:
    """``field_`` restricted to the selected axis-0 entries when it varies along axis 0."""
    return field_[sel] if field_.shape[0] > 1 else field_


def _lung_points(rng: np.random.Generator, an: Anatomy, side: float, n: int) -> np.ndarray:
    """``n`` points (x, y, z) well inside one lung, by rejection from its bounding box."""
    inner, outer = side * an.med, side * an.cav_a
    lo = np.array([min(inner, outer), an.body_y - an.cav_b[0], an.z_base])
    hi = np.array([max(inner, outer), an.body_y + an.cav_b[1], an.z_apex])
    found = np.empty((0, 3), np.float32)
    while len(found) < n:
        cand = rng.uniform(lo, hi, size=(4 * n, 3)).astype(np.float32)
        axes = tuple(cand[:, k].reshape(-1, 1, 1) for k in (2, 1, 0))
        inside = _lung_fields(an, axes, 8.0, 8.0).fraction.ravel() > 0.95
        found = np.concatenate([found, cand[inside]])
    return found[:n]


def _branch(
    rng: np.random.Generator, start: np.ndarray, points: np.ndarray, r: float, depth: int
) -> list[Tube]:
    """A tree from ``start`` filling ``points``: each node splits its cloud at the median of
    its widest coordinate; radii follow Murray's law for the share of the cloud supplied."""
    centre = points.mean(axis=0)
    if depth == 0 or len(points) < 4:
        return [Tube(tuple(start), tuple(centre), r)]
    end = start + rng.uniform(0.35, 0.6) * (centre - start)
    proj = points[:, int(np.argmax(points.var(axis=0)))]
    cut = np.median(proj)
    tubes = [Tube(tuple(start), tuple(end), r)]
    for part in (points[proj <= cut], points[proj > cut]):
        share = len(part) / len(points)
        tubes += _branch(rng, end, part, max(r * share ** (1 / 3), 0.6), depth - 1)
    return tubes


def sample_anatomy(rng: np.random.Generator, grid: Grid) -> Anatomy:
    """Draw one patient's anatomy, sized to fit ``grid``'s field of view."""
    n_slices, rows, cols = grid.shape
    dz, dy, dx = grid.spacing
    fov = 0.5 * min(rows * dy, cols * dx)  # radius of the reconstruction circle
    size = rng.uniform(0.86, 1.12)
    body_a = min(165 * size * rng.uniform(0.94, 1.06), 0.88 * fov)
    b_ant = body_a * rng.uniform(0.62, 0.74)
    b_post = b_ant * rng.uniform(1.0, 1.1)
    body_y = rng.uniform(-12, 12)
    fit = min(1.0, 0.9 * fov / (max(b_ant, b_post) + abs(body_y)))
    b_ant, b_post = b_ant * fit, b_post * fit
    fat = rng.uniform(6, 26) * min(1.0, body_a / 150)
    muscle = rng.uniform(8, 14)
    cav_a = body_a - fat - muscle - 6
    cav_b = (b_ant - fat - muscle - 4, b_post - 0.6 * fat - rng.uniform(22, 32))
    med = rng.uniform(16, 24)

    height = rng.uniform(215, 270) * np.sqrt(size)
    z_mid = rng.uniform(-0.05, 0.05) * n_slices * dz
    z_apex, z_base = z_mid + height / 2, z_mid - height / 2
    dome_r = z_base + rng.uniform(0.22, 0.32) * height
    dome_l = dome_r - rng.uniform(8, 20)
    ha, hb, hc = rng.uniform(52, 64) * size, rng.uniform(42, 52) * size, rng.uniform(45, 58)
    hy = body_y - cav_b[0] + hb * rng.uniform(0.95, 1.15)
    heart = (rng.uniform(12, 28), hy, dome_l + 0.75 * hc, ha, hb, hc)
    vert_r = rng.uniform(15, 19) * size
    spine_y = body_y + cav_b[1] - 1.6 * vert_r
    an = Anatomy(
        body_a=body_a, body_b=(b_ant, b_post), body_y=body_y, fat=fat, muscle=muscle,
        cav_a=cav_a, cav_b=cav_b, med=med, z_apex=z_apex,
        z_shoulder=z_apex - rng.uniform(0.28, 0.36) * height, z_base=z_base,
        domes=(dome_r, dome_l), z_carina=z_apex - rng.uniform(0.30, 0.38) * height,
        heart=heart, spine_y=spine_y, vert_r=vert_r, lung_hu=rng.uniform(-900, -835),
        lung_gradient=rng.uniform(20, 70),
        ribs=(rng.uniform(26, 32), rng.uniform(70, 110), rng.uniform(0, 30)),
        trabecular_hu=rng.uniform(230, 330), liver_hu=rng.uniform(52, 66),
    )  # fmt: skip
    return dataclasses.replace(an, **_tubes(rng, an, grid.pixel))


def _tubes(rng: np.random.Generator, an: Anatomy, pixel: float) -> dict[str, tuple[Tube, ...]]:
    """Great vessels, oesophagus, airway and pulmonary vessel trees, stomach gas."""
    hx, hy, hz, ha, hb, hc = an.heart
    top, bottom = an.z_apex + 80.0, an.z_base - 150.0
    r_ao = rng.uniform(11, 15)
    arch_z = an.z_carina + rng.uniform(15, 28)
    asc = (-rng.uniform(4, 14), hy - 0.25 * hb)
    desc = (0.7 * an.vert_r + 0.7 * r_ao, an.spine_y - 0.7 * an.vert_r)
    mid = (0.5 * desc[0], 0.5 * (asc[1] + desc[1]))
    heart_top = hz + 0.5 * hc
    oes_y = an.spine_y - an.vert_r - 5
    mediastinum = (
        Tube((*asc, heart_top), (*asc, arch_z - r_ao), r_ao),
        Tube((*asc, arch_z - r_ao), (*mid, arch_z), r_ao),
        Tube((*mid, arch_z), (*desc, arch_z - r_ao), r_ao),
        Tube((*desc, arch_z - r_ao), (*desc, bottom), 0.85 * r_ao),
        Tube((asc[0] - r_ao - 8, asc[1] + 4, heart_top), (asc[0] - r_ao - 8, asc[1] + 4, top), 9),
        Tube((hx - 10, hy - 0.2 * hb, heart_top - 10), (8.0, hy, an.z_carina - 12), 13.0),
        Tube((6.0, oes_y, top), (12.0, oes_y + 2, an.domes[1] - 10), 7.0),
    )
    depth = 6 if pixel <= 1.0 else 5 if pixel <= 1.6 else 4 if pixel <= 2.5 else 3
    trachea_y = an.spine_y - an.vert_r - rng.uniform(16, 24)
    airways = [Tube((0.0, trachea_y, top), (0.0, trachea_y, an.z_carina), rng.uniform(8, 10.5))]
    vessels: list[Tube] = []
    hilum_z = an.z_carina - rng.uniform(10, 22)
    for side in (-1.0, 1.0):
        arteries = _lung_points(rng, an, side, 2 ** (depth + 3))
        veins = _lung_points(rng, an, side, 2 ** (depth + 2))
        hilum = np.array([side * (an.med + 14), an.body_y - 0.1 * an.cav_b[0], hilum_z])
        vessels += _branch(rng, hilum, arteries, rng.uniform(7, 9), depth)
        vessels += _branch(rng, hilum + [-6 * side, -10, -30], veins, rng.uniform(6, 8), depth)
        main = np.array([side * (an.med + 6), trachea_y + 8, an.z_carina - 16])
        airways.append(Tube((0.0, trachea_y, an.z_carina), tuple(main), 6.5 if side < 0 else 5.5))
        airways += _branch(rng, main, arteries[::2], 5.0, depth - 1)
    gas: tuple[Tube, ...] = ()
    if rng.random() < 0.5:
        r = rng.uniform(12, 24)
        centre = (0.45 * an.cav_a, an.body_y - 0.2 * an.cav_b[0], an.domes[1] - r - 15)
        gas = (Tube(centre, centre, r),)
    return {
        "mediastinum": mediastinum,
        "vessels": tuple(vessels),
        "airways": tuple(airways),
        "gas_bubble": gas,
    }


def _ellipsoid_alpha(
    centre: tuple[float, float, float], radii: tuple[float, float, float], axes: Axes, px: float
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Partial-volume fraction of an ellipsoid (x, y, z centre and radii) in its bounding box."""
    box = []
    for k, axis in zip((2, 1, 0), axes, strict=True):
        line = axis.ravel()
        start = np.searchsorted(line, centre[k] - radii[k] - px)
        stop = np.searchsorted(line, centre[k] + radii[k] + px, "right")
        if start >= stop:
            return None
        box.append(slice(int(start), int(stop)))
    z, y, x = axes[0][box[0]], axes[1][:, box[1]], axes[2][..., box[2]]
    r = np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2)
    r = np.sqrt(r**2 + ((z - centre[2]) / radii[2]) ** 2)
    return (box[0], box[1], box[2]), soft((1 - r) * min(radii), px)


@dataclass(frozen=True, eq=False)
class Lesions:
    """What findings add to the lungs (drawn by :mod:`fedct.common.synth.findings`).

    ``opacity`` and ``lucency`` are fields on ``grid.coarse()``: the share of each lung
    voxel turned into ``target_hu`` (ground glass, consolidation, effusion) or into air
    (emphysema).  ``solid`` capsules (nodules, masses, cavity walls) are fully dense;
    ``air`` capsules (cavities, bullae) are air and drawn last.
    """

    opacity: np.ndarray | None = None
    lucency: np.ndarray | None = None
    solid: tuple[Tube, ...] = ()
    air: tuple[Tube, ...] = ()
    target_hu: float = 20.0


@dataclass(frozen=True, eq=False)
class Phantom:
    """A noiseless scan: HU, the lung share of each voxel, a bone mask, the lesion share."""

    grid: Grid
    anatomy: Anatomy
    hu: np.ndarray
    lung: np.ndarray
    bone: np.ndarray
    opacity: np.ndarray | None


def build_phantom(
    an: Anatomy, grid: Grid, rng: np.random.Generator, lesions: Lesions | None = None
) -> Phantom:
    """Draw ``an`` (and ``lesions``) on ``grid`` as float32 HU without scanner noise."""
    axes = grid.axes()
    px, slab = grid.pixel, grid.slab
    y2, x2 = axes[1][0], axes[2][0]
    hu = np.empty(grid.shape, np.float32)
    hu[:] = _chest_wall(an, y2, x2, px)
    lung = np.zeros(grid.shape, np.float32)
    bone = np.zeros(grid.shape, bool)
    cavity = soft(_ellipse_margin(x2, y2 - an.body_y, an.cav_a, _depths(an.cav_b, an, y2)), px)
    rows, cols = (slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(cavity))
    _fill_cavity(hu, lung, an, grid, rng, cavity[rows, cols], rows, cols)
    _paint_ribs_and_sternum(hu, bone, an, axes, px, slab)
    _paint_spine(hu, lung, bone, an, axes, px, slab)

    def paint(tubes: tuple[Tube, ...], value: float, gate_by_lung: bool, carve: bool) -> None:
        for tube in tubes:
            hit = tube_alpha(tube, axes, px, slab)
            if hit is None:
                continue
            box, alpha = hit
            if gate_by_lung:
                alpha = alpha * lung[box]
            hu[box] += alpha * (value - hu[box])
            if carve:
                lung[box] *= 1 - alpha

    hx, hy, hz, ha, hb, hc = an.heart
    for pad, value in ((4.0, MEDIASTINAL_FAT_HU), (0.0, BLOOD_HU + 5)):
        hit = _ellipsoid_alpha((hx, hy, hz), (ha + pad, hb + pad, hc + pad), axes, px)
        if hit is not None:
            box, alpha = hit
            hu[box] += alpha * (value - hu[box])
            lung[box] *= 1 - alpha
    paint(an.mediastinum, BLOOD_HU, gate_by_lung=False, carve=True)
    paint(an.vessels, BLOOD_HU, gate_by_lung=True, carve=False)
    walls = tuple(Tube(t.p0, t.p1, 1.15 * t.r + 0.3) for t in an.airways)
    paint(walls, AIRWAY_WALL_HU, gate_by_lung=False, carve=False)
    opacity = _apply_lesions(hu, lung, grid, axes, lesions, rows, cols) if lesions else None
    paint(an.airways, AIR_HU, gate_by_lung=False, carve=False)
    paint(an.gas_bubble, AIR_HU, gate_by_lung=False, carve=False)
    if lesions:
        paint(lesions.air, AIR_HU, gate_by_lung=False, carve=False)
    return Phantom(grid, an, hu, lung, bone, opacity)


def _depths(depths: tuple[float, float], an: Anatomy, y: np.ndarray) -> np.ndarray:
    """Half depth in front of or behind the trunk centre, per row."""
    return np.where(y < an.body_y, depths[0], depths[1]).astype(np.float32)


def _chest_wall(an: Anatomy, y: np.ndarray, x: np.ndarray, px: float) -> np.ndarray:
    """The (rows, cols) section outside the ribs: air, couch, skin and fat, muscle."""
    v = y - an.body_y
    body = soft(_ellipse_margin(x, v, an.body_a, _depths(an.body_b, an, y)), px)
    inner_b = _depths((an.body_b[0] - an.fat, an.body_b[1] - 0.6 * an.fat), an, y)
    muscle = soft(_ellipse_margin(x, v, an.body_a - an.fat, inner_b), px)
    wall = AIR_HU + body * (FAT_HU - AIR_HU)
    wall += muscle * (MUSCLE_HU - wall)
    couch_top = an.body_y + an.body_b[1] + 3 - 0.0006 * x**2
    couch = soft(y - couch_top, px) * soft(couch_top + 9 - y, px)
    couch *= soft(an.body_a + 15 - np.abs(x), px) * (1 - body)
    wall += couch * (TABLE_HU - wall)
    return wall


def _fill_cavity(
    hu: np.ndarray,
    lung: np.ndarray,
    an: Anatomy,
    grid: Grid,
    rng: np.random.Generator,
    cavity: np.ndarray,
    rows: slice,
    cols: slice,
) -> None:
    """Lungs, mediastinal fat above the diaphragm and liver / spleen below it."""
    z, y, x = grid.axes()
    fields = _lung_fields(an, (z, y[:, rows], x[..., cols]), grid.pixel, grid.slab)
    organ = np.where(x[..., cols] < 25, an.liver_hu, 42.0).astype(np.float32)
    inside = fields.above_diaphragm * (MEDIASTINAL_FAT_HU - organ)
    inside += organ
    coarse = grid.coarse()
    # Parenchyma: denser in the dependent (posterior) lung, with a faint texture.
    posterior = np.clip((coarse.axes()[1] - an.body_y) / an.cav_b[1], -1, 1)
    parenchyma = an.lung_hu + an.lung_gradient * posterior + 12 * smooth_noise(rng, coarse, 3.0)
    parenchyma = upsample(parenchyma, grid.shape, rows, cols)
    parenchyma -= inside
    parenchyma *= fields.fraction
    inside += parenchyma
    block = hu[:, rows, cols]
    inside -= block
    inside *= cavity
    block += inside
    lung[:, rows, cols] = fields.fraction


def _slab_overlap(distance: np.ndarray, height: float, slab: float) -> np.ndarray:
    """Share of a slice slab covered by a band ``height`` mm tall, centred ``distance`` away."""
    return np.clip((slab + height) / 2 - distance, 0, min(slab, height)) / slab


def _paint_ribs_and_sternum(
    hu: np.ndarray, bone: np.ndarray, an: Anatomy, axes: Axes, px: float, slab: float
) -> None:
    z, y, x = axes
    y2, x2 = np.broadcast_arrays(y[0], x[0])
    v = y2 - an.body_y
    b = _depths(an.cav_b, an, y2)
    margin = _ellipse_margin(x2, v, an.cav_a, b)
    # Around the cavity, from near the spine to the costal cartilages in front.
    theta = np.arctan2(np.abs(x2) / an.cav_a, v / b) / np.pi  # 0 at the back, 1 in front
    arc = np.pi * an.cav_a
    ring = soft(-margin, px) * soft(margin + 9, px)
    ring *= soft((theta - 0.08) * arc, px) * soft((0.8 - theta) * arc, px)
    idx = np.flatnonzero(ring)
    pitch, drop, phase = an.ribs
    # Ribs slope down towards the front: each is a band in z shifted by the angle.
    w = ((z[:, 0, :] - phase + drop * theta.ravel()[idx]) / pitch) % 1
    coverage = _slab_overlap(np.minimum(w, 1 - w) * pitch, 11.0, slab)
    span = soft(z[:, 0, :] - an.z_base + 30, slab) * soft(an.z_apex + 5 - z[:, 0, :], slab)
    alpha = ring.ravel()[idx] * coverage * span
    flat = hu.reshape(hu.shape[0], -1)
    flat[:, idx] += alpha * (RIB_HU - flat[:, idx])
    bone.reshape(hu.shape[0], -1)[:, idx] |= alpha > 0.5

    sternum_y = an.body_y - an.cav_b[0] - 7
    plate = soft(_ellipse_margin(x2, y2 - sternum_y, 15.0, 7.0), px)
    rows, cols = (slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(plate))
    span = soft(z - an.domes[1] + 20, slab) * soft(an.z_apex - 20 - z, slab)
    alpha = plate[None, rows, cols] * span
    block = hu[:, rows, cols]
    block += alpha * (STERNUM_HU - block)
    bone[:, rows, cols] |= alpha > 0.5


def _paint_spine(
    hu: np.ndarray,
    lung: np.ndarray,
    bone: np.ndarray,
    an: Anatomy,
    axes: Axes,
    px: float,
    slab: float,
) -> None:
    """Vertebral bodies with discs between them, the canal, the posterior arch and the
    paraspinal muscles, which indent the back of the cavity so the lungs wrap the spine."""
    z, y, x = axes
    r = an.vert_r
    canal_y = an.spine_y + 0.85 * r + 8
    muscle_a = r + 24
    rows = slice(*(int(i) for i in np.searchsorted(y.ravel(), [an.spine_y - r - px, canal_y + 40])))
    cols = slice(*(int(i) for i in np.searchsorted(x.ravel(), [-muscle_a - px, muscle_a + px])))
    yb, xb = y[0, rows], x[0, :, cols]
    v = yb - an.spine_y
    muscle = soft(_ellipse_margin(xb, yb - canal_y - 10, muscle_a, 22.0), px)
    body = soft(_ellipse_margin(xb, v, r, 0.85 * r), px)
    core = soft(_ellipse_margin(xb, v, r - 2.5, 0.85 * r - 2.5), px)
    to_canal = np.sqrt(xb**2 + (yb - canal_y) ** 2)
    canal = soft(7 - to_canal, px)
    arch = np.clip(soft(12 - to_canal, px) - canal, 0, 1)
    arch = np.maximum(arch, soft(_ellipse_margin(xb, yb - canal_y - 18, 5.0, 12.0), px))
    value = CORTICAL_BONE_HU + core * (an.trabecular_hu - CORTICAL_BONE_HU)
    # A 6 mm disc every 27 mm of spine.
    w = ((z - an.ribs[2]) / 27.0) % 1
    disc = _slab_overlap(np.minimum(w, 1 - w) * 27.0, 6.0, slab)
    value = value + disc * (DISC_HU - value)
    block = hu[:, rows, cols]
    block += muscle * (MUSCLE_HU - block)
    block += body * (value - block)
    block += canal * (CSF_HU - block)
    block += arch * (0.7 * CORTICAL_BONE_HU - block)
    lung[:, rows, cols] *= (1 - body) * (1 - muscle)
    bone[:, rows, cols] |= ((body > 0.5) & (disc < 0.5)) | (arch > 0.5)


def _apply_lesions(
    hu: np.ndarray,
    lung: np.ndarray,
    grid: Grid,
    axes: Axes,
    lesions: Lesions,
    rows: slice,
    cols: slice,
) -> np.ndarray:
    """Blend lesion fields into the lungs; returns the lesion share of each voxel."""
    opacity = np.zeros(grid.shape, np.float32)
    if lesions.lucency is not None:
        lucent = upsample(lesions.lucency, grid.shape, rows, cols) * lung[:, rows, cols]
        block = hu[:, rows, cols]
        block += lucent * (AIR_HU - block)
    if lesions.opacity is not None:
        opacity[:, rows, cols] = upsample(lesions.opacity, grid.shape, rows, cols)
        opacity[:, rows, cols] *= lung[:, rows, cols]
    for tube in lesions.solid:
        hit = tube_alpha(tube, axes, grid.pixel, grid.slab)
        if hit is not None:
            box, alpha = hit
            np.maximum(opacity[box], alpha, out=opacity[box])
    block = hu[:, rows, cols]  # lesions lie in the lungs, inside the cavity's box
    block += opacity[:, rows, cols] * (lesions.target_hu - block)
    return opacity
