"""FLAIR -> DWI registration (SimpleITK, Mattes mutual information, rigid then affine).

In ISLES'22 (and in clinical exports) the FLAIR has its own grid - often 0.45x0.45x5 mm or 1 mm - and is not
registered to the DWI. :func:`register_to` estimates the transform from the fixed (DWI) world to the moving
(FLAIR) world and returns the moving image resampled onto the fixed grid.

Method (chosen to be reproducible and fast: ~4-6 s of CPU for a 2 mm DWI against a 0.45x0.45x5 mm or 1 mm
FLAIR):

* metric: Mattes mutual information (50 bins), so the two contrasts need not look alike;
* sampling: ~50 000 random points per resolution level drawn with a *fixed seed* (all voxels at the coarse
  level), so a run is reproducible (to ~1e-5 mm: ITK's multithreaded sums are not bit-identical);
* the optimiser works on a copy of the moving image bin-averaged to about the fixed spacing (a 0.45 mm
  in-plane FLAIR carries detail a 2 mm metric cannot use); the final resampling uses the original;
* initialisation: Euler3D centred by ``CenteredTransformInitializer`` with MOMENTS and with GEOMETRY; the one
  with the better metric is kept;
* stage 1: rigid (Euler3D), shrink factors 4/2/1, smoothing sigmas 2/1/0 mm, regular-step gradient descent
  with scales from physical shift;
* stage 2: affine (12 parameters) started from the rigid result, shrink 2/1, sigmas 1/0 mm, with gradients by
  central differences at the sample points (the precomputed gradient image of a thick-slice FLAIR made this
  stage drift away from the optimum in our tests);
* choice: the affine result is kept only when it improves the full-resolution mutual information by at least
  ``AFFINE_MIN_GAIN`` (2 %) over the rigid one; otherwise the rigid result is used. ``info["transform"]``
  says which. (Same-session motion is rigid; without this rule the affine stage fitted ~1 % scalings to
  thick-slice partial-volume effects and doubled the error);
* interpolation: linear, both while optimising and for the final resampling (outside the moving field of
  view -> 0).

Accuracy measured on synthetic FLAIR-like images (known rigid/affine motion, 1x1x4 / 0.9x0.9x5 /
0.45x0.45x5 mm thick-slice grids, inverted non-linear contrast, noise): 0.1-0.3 mm mean and < 0.8 mm max
displacement error over the brain; see tests/test_register.py.

There is no silent fallback: an optimiser exception, a NaN metric, a metric that shows (almost) no shared
information, an implausible scale or a fixed brain that lands mostly outside the moving field of view all
raise :class:`~deepisles.errors.DeepIslesError`.

**A moving image already on the fixed grid** (:func:`align_to`, what ``segment`` calls). Registering and
resampling an image that is already aligned is not a no-op: the optimiser settles ~0.05-0.5 degree / ~0.1 mm
away from the identity (MI is flat there; measured on the FACTORIZER fixture's FLAIR, on MNI and on a real
ISLES'22 DWI), and the linear re-interpolation blurs the image. On the ensemble fixture that changed
FACTORIZER's probability by up to 0.33 (mask Dice 0.85). So when the moving image's voxel centres are the fixed
grid's (same shape and affine, or the same grid stored with its axes reordered/flipped), :func:`align_to` still
runs the registration - a FLAIR can share the DWI's planning geometry and yet be moved, or have been put on the
DWI grid by its header only - but only as a check: when its estimate moves no fixed foreground voxel by more
than :data:`PASS_THROUGH_MM`, or the identity has at least as good a metric, the image is passed through
unchanged (values cast to float32, no interpolation). Otherwise the registered image is used. With
``assume_registered=True`` (``--flair-registered``) no registration runs: an image on the fixed grid is passed
through, one on another grid is resampled onto it in physical space (identity transform, linear).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import numpy as np
import SimpleITK as sitk

from deepisles.errors import DeepIslesError
from deepisles.io.image import RAS_FROM_LPS, Image

__all__ = ["align_to", "register_to", "SEED", "PASS_THROUGH_MM"]

#: Seed of the random metric sampling: fixed so that a registration is reproducible.
SEED = 22
#: Mattes MI is reported negated by ITK (lower is better). A final value above ``-MIN_MUTUAL_INFORMATION``
#: means the images share (almost) no information: the registration is not trusted.
MIN_MUTUAL_INFORMATION = 0.05
#: The affine part may scale each axis by this factor at most (same patient, same session).
MAX_SCALE = 1.33
#: The affine result replaces the rigid one only when it improves the mutual information by this fraction.
#: Same-session FLAIR -> DWI motion is rigid; in our tests the affine stage otherwise fitted ~1 % scalings to
#: thick-slice partial-volume effects (rigid: < 0.5 mm max error, affine: up to 1.4 mm).
AFFINE_MIN_GAIN = 0.02
#: At least this fraction of the fixed foreground must land inside the moving field of view.
MIN_FOV_OVERLAP = 0.5
#: :func:`align_to`: a moving image on the fixed grid is passed through unchanged when the registration's
#: estimate moves no corner of the fixed foreground's bounding box by more than this (mm). Above the spurious
#: motion the registration finds on already aligned images (0.04-0.47 mm in our trials: the FACTORIZER fixture's
#: FLAIR, MNI and a real ISLES'22 DWI, with FLAIR-like images registered once and then again) and about its own
#: error on known motions (< 0.8 mm): a smaller correction cannot be told from registration noise, while the
#: re-interpolation it costs is certain. A real motion below it stays uncorrected (< half a 2 mm voxel).
PASS_THROUGH_MM = 1.0

#: Multi-resolution settings of the two stages (shrink factors in voxels, smoothing sigmas in mm).
RIGID_STAGE = dict(
    shrink=[4, 2, 1], sigmas=[2.0, 1.0, 0.0], iterations=200, samples=50_000, gradient_filter=True
)
AFFINE_STAGE = dict(shrink=[2, 1], sigmas=[1.0, 0.0], iterations=100, samples=50_000, gradient_filter=False)



@contextmanager
def reproducible_itk():
    """Run ITK single-threaded inside the block: its multithreaded metric and filters sum in a run-dependent
    order, so two runs on the same images gave transforms differing by ~1e-5 (and a resampled FLAIR by ~4e-6).
    Single-threaded, the same inputs give the same transform bit for bit (measured: the MNI registration 1.3 s ->
    1.7 s on 2 cores). Both registrations (FLAIR -> DWI, DWI -> MNI) run inside it."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


@reproducible_itk()
def register_to(
    moving: Image,
    fixed: Image,
    *,
    fixed_mask: np.ndarray | None = None,
) -> tuple[Image, dict]:
    """Register ``moving`` (e.g. FLAIR) to ``fixed`` (e.g. DWI); return it resampled on the fixed grid.

    ``fixed_mask`` (bool array on the fixed grid, e.g. a brain mask) restricts where the metric is sampled.

    Returns ``(image, info)``: ``image`` has ``fixed``'s shape and affine (float32, 0 outside the moving field
    of view). ``info`` holds:

    * ``transform``: "rigid" or "affine", the one used; ``matrix_ras``: its 4x4, mapping a fixed-world RAS
      point (mm) to the matching moving-world point; ``metric``: its Mattes MI over the whole fixed grid
      (negative, lower is better);
    * ``metric_initial``, ``metric_rigid``, ``metric_affine``, ``affine_gain``, ``initializer``
      (MOMENTS/GEOMETRY); ``metric_identity``: the metric of the identity transform, i.e. of the alignment the
      two headers give (None when the images do not overlap);
    * ``rigid``: ``rotation_deg`` (Euler angles about the RAS x, y, z axes, composed Rz Rx Ry as in ITK's
      Euler3D), ``rotation_angle_deg`` (total), ``translation_mm`` (RAS displacement of the rotation centre);
    * ``rigid_ras``, ``affine_ras`` (the 4x4 of each stage), ``affine_scales`` (singular values of the linear
      part used), ``iterations`` (per stage and level), ``stop_conditions``, ``fov_overlap``, ``seconds``,
      ``seconds_per_step``.

    Raises :class:`DeepIslesError` when the registration fails or its result is not plausible.
    """
    t0 = time.perf_counter()
    name = moving.source or "moving image"
    f_img = _as_sitk(fixed)
    m_img = _as_sitk(moving)
    mask_img = None
    if fixed_mask is not None:
        fixed_mask = np.asarray(fixed_mask, dtype=bool)
        if fixed_mask.shape != fixed.shape[:3]:
            raise ValueError(
                f"fixed_mask shape {fixed_mask.shape} does not match the fixed grid {fixed.shape[:3]}"
            )
        if not fixed_mask.any():
            raise DeepIslesError(f"cannot register {name}: the fixed mask is empty")
        mask_img = Image(fixed_mask.astype(np.uint8), fixed.affine).to_sitk()
    for img, what in ((fixed, "fixed"), (moving, "moving")):
        vals = np.asarray(img.data)
        if not np.any(vals) or float(np.nanmax(vals)) == float(np.nanmin(vals)):
            raise DeepIslesError(f"cannot register {name}: the {what} image is empty or constant")

    n_fixed = int(fixed_mask.sum()) if fixed_mask is not None else int(np.prod(fixed.shape[:3]))
    m_work = _working_copy(m_img, min(f_img.GetSpacing()))
    try:
        # --- initialisation: centre of mass vs. image centre, keep the better metric ---------------
        candidates = {}
        for label, mode in (
            ("MOMENTS", sitk.CenteredTransformInitializerFilter.MOMENTS),
            ("GEOMETRY", sitk.CenteredTransformInitializerFilter.GEOMETRY),
        ):
            tx = sitk.Euler3DTransform(
                sitk.CenteredTransformInitializer(f_img, m_work, sitk.Euler3DTransform(), mode)
            )
            candidates[label] = (_evaluate(f_img, m_work, tx, mask_img), tx)
        finite = {k: v for k, v in candidates.items() if math.isfinite(v[0])}
        if not finite:
            raise DeepIslesError(
                f"cannot register {name}: the images do not overlap in physical space after centring"
            )
        initializer = min(finite, key=lambda k: finite[k][0])
        metric_initial, rigid0 = finite[initializer]
        metric_identity = _evaluate(f_img, m_work, sitk.AffineTransform(3), mask_img)  # the headers' alignment
        t_init = time.perf_counter()

        # --- stage 1: rigid --------------------------------------------------------------------------
        rigid, it_rigid, stop_rigid = _optimise(f_img, m_work, rigid0, mask_img, n_fixed, **RIGID_STAGE)
        metric_rigid = _evaluate(f_img, m_work, rigid, mask_img)
        t_rigid = time.perf_counter()

        # --- stage 2: affine, started from the rigid result ------------------------------------------
        affine0 = sitk.AffineTransform(3)
        affine0.SetCenter(rigid.GetCenter())
        affine0.SetMatrix(rigid.GetMatrix())
        affine0.SetTranslation(rigid.GetTranslation())
        affine, it_affine, stop_affine = _optimise(f_img, m_work, affine0, mask_img, n_fixed, **AFFINE_STAGE)
        metric_affine = _evaluate(f_img, m_work, affine, mask_img)
        t_affine = time.perf_counter()
    except RuntimeError as exc:  # ITK exceptions, e.g. "All samples map outside moving image buffer"
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DeepIslesError(f"registration of {name} failed: {first}") from exc

    # --- rigid or affine: the 6 extra parameters must explain clearly more ----------------------------
    gain = (metric_rigid - metric_affine) / abs(metric_rigid) if metric_rigid else math.nan
    use_affine = math.isfinite(metric_affine) and (not math.isfinite(metric_rigid) or gain >= AFFINE_MIN_GAIN)
    final = affine if use_affine else affine0  # affine0 is the rigid result as an AffineTransform
    metric = metric_affine if use_affine else metric_rigid

    # --- plausibility guards (no silent fallback) ---------------------------------------------------
    if not math.isfinite(metric):
        raise DeepIslesError(f"registration of {name} failed: the final metric is not a number")
    if metric > -MIN_MUTUAL_INFORMATION:
        raise DeepIslesError(
            f"registration of {name} failed: final mutual information {-metric:.3f} < {MIN_MUTUAL_INFORMATION} "
            "(the images share almost no information; is it the same patient and a brain image?)"
        )
    scales = np.linalg.svd(np.array(final.GetMatrix()).reshape(3, 3), compute_uv=False)
    if scales.max() > MAX_SCALE or scales.min() < 1.0 / MAX_SCALE:
        raise DeepIslesError(
            f"registration of {name} failed: implausible affine scaling {np.round(scales, 2).tolist()} "
            f"(allowed 1/{MAX_SCALE}..{MAX_SCALE})"
        )
    final_ras = ras_matrix(final)
    foreground = fixed_mask if fixed_mask is not None else np.asarray(fixed.data) != 0
    overlap = _fov_overlap(foreground, fixed.affine, final_ras, moving)
    if overlap < MIN_FOV_OVERLAP:
        raise DeepIslesError(
            f"registration of {name} failed: only {overlap:.0%} of the fixed image's foreground lands inside "
            f"the moving field of view"
        )

    out = sitk.Resample(m_img, f_img, final, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    data = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    registered = Image(np.ascontiguousarray(data), fixed.affine.copy(), moving.source, dict(moving.meta))

    rigid_ras = ras_matrix(rigid)
    rot = rigid_ras[:3, :3]
    angle = math.degrees(math.acos(float(np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0))))
    info = {
        "method": "SimpleITK Mattes MI, rigid (Euler3D) then affine, multi-resolution",
        "metric": float(metric),
        "metric_initial": float(metric_initial),
        "metric_identity": float(metric_identity) if math.isfinite(metric_identity) else None,
        "metric_rigid": float(metric_rigid),
        "initializer": initializer,
        "rigid": {
            # ITK Euler3D (R = Rz Rx Ry) angles expressed about the RAS axes: LPS -> RAS negates x and y
            "rotation_deg": [
                math.degrees(a) * sgn for a, sgn in zip(rigid.GetParameters()[:3], (-1, -1, 1), strict=True)
            ],
            "rotation_angle_deg": angle,
            "translation_mm": [float(v) for v in RAS_FROM_LPS[:3, :3] @ np.array(rigid.GetTranslation())],
        },
        "rigid_ras": rigid_ras.tolist(),
        "transform": "affine" if use_affine else "rigid",
        "matrix_ras": final_ras.tolist(),
        "affine_ras": ras_matrix(affine).tolist(),
        "metric_affine": float(metric_affine),
        "affine_gain": float(gain),
        "affine_scales": [float(s) for s in scales],
        "iterations": {"rigid": it_rigid, "affine": it_affine},
        "stop_conditions": {"rigid": stop_rigid, "affine": stop_affine},
        "fov_overlap": float(overlap),
        "seed": SEED,
        "seconds": time.perf_counter() - t0,
        "seconds_per_step": {
            "initialise": t_init - t0,
            "rigid": t_rigid - t_init,
            "affine": t_affine - t_rigid,
            "resample": time.perf_counter() - t_affine,
        },
    }
    return registered, info


def align_to(
    moving: Image,
    fixed: Image,
    *,
    assume_registered: bool = False,
    fixed_mask: np.ndarray | None = None,
    fixed_name: str = "DWI",
) -> tuple[Image, dict]:
    """``moving`` on ``fixed``'s grid, registered only where that is needed (see the module docstring).

    * moving on another grid: :func:`register_to`;
    * moving on the fixed grid (same voxel centres: :func:`on_grid`): :func:`register_to` as a check; passed
      through unchanged when its estimate moves no corner of the fixed foreground's bounding box by more than
      :data:`PASS_THROUGH_MM` or the identity's metric is at least as good, else the registered image;
    * ``assume_registered``: no registration; passed through when on the fixed grid, else resampled onto it in
      physical space (identity transform, linear, 0 outside the moving field of view).

    Returns ``(image, info)``; ``image`` has ``fixed``'s shape and affine, float32. ``info``: ``action``
    ("registered", "passed_through" or "resampled"), ``summary`` (one sentence naming the fixed image
    ``fixed_name``), ``grid`` ("same", "same, axes reordered" or "other"), ``assume_registered``; after a
    registration its :func:`register_to` info (at the top level when used, under ``estimate`` when not) and, on
    the fixed grid, ``max_displacement_mm`` and ``pass_through_mm``.
    """
    from deepisles.preprocess.resample import resample_to

    fix = fixed_name
    grid = on_grid(moving, fixed)
    base = {"grid": grid or "other", "assume_registered": bool(assume_registered)}
    if assume_registered:
        t0 = time.perf_counter()
        out = _float32(resample_to(moving, fixed, order=1, fill=0.0))  # exact when on the grid
        if grid is not None:
            summary = f"passed through (--flair-registered): already on the {fix} grid"
        else:
            summary = (
                f"not registered (--flair-registered): resampled linearly onto the {fix} grid in physical space "
                "(identity transform)"
            )
        action = "passed_through" if grid is not None else "resampled"
        return out, {**base, "action": action, "summary": summary, "seconds": time.perf_counter() - t0}

    registered, info = register_to(moving, fixed, fixed_mask=fixed_mask)
    angle = info["rigid"]["rotation_angle_deg"]
    shift = float(np.linalg.norm(info["rigid"]["translation_mm"]))
    estimate = f"{info['transform']}, {angle:.2f} deg / {shift:.2f} mm"
    if grid is None:
        summary = f"registered to the {fix}: {estimate}"
        return registered, {**base, "action": "registered", "summary": summary, **info}

    foreground = fixed_mask if fixed_mask is not None else np.asarray(fixed.data) != 0
    disp = _max_displacement(np.asarray(foreground, dtype=bool), fixed.affine, np.asarray(info["matrix_ras"]))
    checked = {**base, "max_displacement_mm": disp, "pass_through_mm": PASS_THROUGH_MM}
    identity_as_good = info["metric_identity"] is not None and info["metric_identity"] <= info["metric"]
    if disp <= PASS_THROUGH_MM:
        why = f"the registration's estimate ({estimate}) moves the {fix} foreground by at most {disp:.2f} mm"
    elif identity_as_good:
        why = f"the registration's estimate ({estimate}, up to {disp:.2f} mm) has no better metric than the identity"
    else:
        summary = f"registered to the {fix}: on its grid but moved by up to {disp:.2f} mm ({estimate})"
        return registered, {**checked, "action": "registered", "summary": summary, **info}
    out = _float32(resample_to(moving, fixed, order=1, fill=0.0))  # exact: a copy, or the axes reordered
    summary = f"passed through: already on the {fix} grid and aligned ({why})"
    return out, {**checked, "action": "passed_through", "summary": summary, "estimate": info}


def on_grid(moving: Image, fixed: Image) -> str | None:
    """Whether ``moving`` has exactly ``fixed``'s voxel centres: "same" (in the same order), "same, axes
    reordered" (its axes stored in another order or flipped), None otherwise (other shape, spacing, position,
    a rotation). Within the exact-resampling tolerance of :func:`deepisles.preprocess.resample.grid_permutation`
    (10^-3 voxel)."""
    from deepisles.preprocess.resample import grid_permutation

    perm = grid_permutation(moving, fixed)
    if perm is None:
        return None
    axes, signs, offsets = perm
    for j in range(3):
        n, i = int(fixed.shape[j]), axes[j]
        if int(moving.shape[i]) != n or offsets[i] != (0 if signs[j] > 0 else n - 1):
            return None  # another field of view: some fixed voxels have no moving voxel
    return "same" if axes == (0, 1, 2) and all(sg > 0 for sg in signs) else "same, axes reordered"


# --- helpers ------------------------------------------------------------------------------------------
def _float32(img: Image) -> Image:
    return img.with_data(np.asarray(img.data, dtype=np.float32))


def _max_displacement(foreground: np.ndarray, affine: np.ndarray, ras: np.ndarray) -> float:
    """Largest distance (mm) a corner of the foreground's bounding box (the whole grid if it is empty) moves
    under the 4x4 RAS map ``ras``; an upper bound of the distance any foreground voxel moves (the distance is
    convex in the position)."""
    idx = np.argwhere(foreground)
    lo, hi = (idx.min(0), idx.max(0)) if len(idx) else (np.zeros(3), np.array(foreground.shape) - 1)
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    world = affine @ corners.T
    return float(np.linalg.norm((ras @ world - world)[:3], axis=0).max())


def _as_sitk(img: Image) -> sitk.Image:
    data = np.asarray(img.data, dtype=np.float32)
    if data.ndim != 3:
        raise DeepIslesError(
            f"{img.source or 'image'}: registration needs a 3D image, got shape {data.shape}"
        )
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return img.with_data(data).to_sitk()


def _working_copy(m_img: sitk.Image, fixed_spacing: float) -> sitk.Image:
    """The moving image as the optimiser sees it: axes finer than the fixed grid are bin-averaged.

    A 0.45 mm in-plane or 1 mm isotropic FLAIR registered to a 2 mm DWI carries detail the metric cannot
    use; averaging bins up to the fixed spacing (e.g. 4x4 in-plane for 0.45 mm) makes every optimiser step
    several times cheaper. The final resampling uses the original image.
    """
    factors = [max(1, int(fixed_spacing / sp + 1e-6)) for sp in m_img.GetSpacing()]
    return sitk.BinShrink(m_img, factors) if max(factors) > 1 else m_img


def mi_method(mask: sitk.Image | None, bins: int = 50) -> sitk.ImageRegistrationMethod:
    """The one registration setup of deepisles (FLAIR -> DWI here, DWI -> MNI in postprocess/atlas.py): Mattes
    mutual information over the fixed mask, linear interpolation."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    reg.SetInterpolator(sitk.sitkLinear)
    if mask is not None:
        reg.SetMetricFixedMask(mask)
    return reg


def set_gradient_descent(reg: sitk.ImageRegistrationMethod, iterations: int, shrink, sigmas) -> None:
    """Regular-step gradient descent with physical-shift scales over a multi-resolution pyramid (``shrink``
    factors, smoothing ``sigmas`` in mm): the optimiser both registrations use."""
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=iterations, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )  # fmt: skip
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()


def metric_of(f_img: sitk.Image, m_img: sitk.Image, tx: sitk.Transform, mask: sitk.Image | None,
              bins: int = 50) -> float:  # fmt: skip
    """Metric of ``tx`` over every fixed voxel (in the mask): deterministic, comparable between transforms;
    raises ``RuntimeError`` when ITK cannot evaluate it."""
    reg = mi_method(mask, bins)
    reg.SetInitialTransform(tx, inPlace=False)
    return float(reg.MetricEvaluate(f_img, m_img))


def _evaluate(f_img: sitk.Image, m_img: sitk.Image, tx: sitk.Transform, mask: sitk.Image | None) -> float:
    """Metric of ``tx`` over every fixed voxel (in the mask): deterministic, comparable between transforms."""
    try:
        return metric_of(f_img, m_img, tx, mask)
    except RuntimeError:
        return math.nan


def _optimise(
    f_img, m_img, tx, mask, n_fixed, *, shrink, sigmas, iterations, samples, gradient_filter
) -> tuple:
    reg = mi_method(mask)
    # random samples (fixed seed) per level: about ``samples`` points, all voxels at coarse levels
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel(
        [min(1.0, samples / max(1.0, n_fixed / float(f) ** 3)) for f in shrink], SEED
    )
    if not gradient_filter:
        # Gradients by central differences at each sample point instead of a precomputed gradient image of
        # the (often 4-5 mm thick-slice) moving image: slower, but consistent with the interpolated values.
        # With the gradient image the affine stage walked *away* from the optimum in our tests.
        reg.MetricUseMovingImageGradientFilterOff()
        reg.MetricUseFixedImageGradientFilterOff()
    set_gradient_descent(reg, iterations, shrink, sigmas)
    tx = type(tx)(tx)  # optimised in place, on a copy
    reg.SetInitialTransform(tx, inPlace=True)
    per_level: list[int] = []

    def _on_level() -> None:
        per_level.append(0)

    def _on_iteration() -> None:
        if per_level:
            per_level[-1] += 1

    reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, _on_level)
    reg.AddCommand(sitk.sitkIterationEvent, _on_iteration)
    reg.Execute(f_img, m_img)
    return tx, per_level, reg.GetOptimizerStopConditionDescription()


def ras_matrix(tx: sitk.Transform) -> np.ndarray:
    """4x4 matrix of a matrix+offset ITK transform (fixed LPS -> moving LPS), expressed in RAS."""
    m = np.array(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.array(tx.GetCenter(), dtype=np.float64)
    t = np.array(tx.GetTranslation(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = m
    lps[:3, 3] = t + c - m @ c
    return RAS_FROM_LPS @ lps @ RAS_FROM_LPS


def _fov_overlap(foreground: np.ndarray, fixed_affine: np.ndarray, ras: np.ndarray, moving: Image) -> float:
    """Fraction of the fixed foreground voxels whose mapped position lies inside the moving grid."""
    idx = np.argwhere(foreground)
    if len(idx) == 0:
        return 0.0
    if len(idx) > 200_000:  # a regular subsample is plenty for a fraction
        idx = idx[:: len(idx) // 200_000 + 1]
    world = fixed_affine[:3, :3] @ idx.T.astype(np.float64) + fixed_affine[:3, 3:4]
    mapped = ras[:3, :3] @ world + ras[:3, 3:4]
    inv = np.linalg.inv(moving.affine)
    vox = inv[:3, :3] @ mapped + inv[:3, 3:4]
    shape = np.array(moving.shape[:3], dtype=np.float64)[:, None]
    inside = np.all((vox >= -0.5) & (vox <= shape - 0.5), axis=0)
    return float(inside.mean())
