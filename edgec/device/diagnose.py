"""edgec diagnose: the first layers where a compiled artifact stops agreeing with the float model.

The float model (the student or teacher image tower the target was compiled from, checked
against the manifest's source hashes) runs on a few golden inputs with a hook on every module;
the artifact runs in its runtime with every intermediate tensor kept (the backend reads them:
:func:`edgec.backends.diagnose.artifact_taps`; a format whose runtime shows none, such as an
XNNPACK-delegated .pte, gives a rebuild of its program instead, and the shipped file's whole
output is then compared too, in the report's ``whole_output``). Each artifact tensor is attributed to the module
it was made in; a module's artifact output is the last tensor made inside it. Modules are listed
in the order the float model finishes them, with the cosine between the two outputs; the first
ones below the threshold are where the artifact diverges, named as in the PyTorch model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..errors import InputError

DEFAULT_THRESHOLD = 0.99
DEFAULT_IMAGES = 8


def _cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean per-sample cosine of two (N, ...) arrays of the same size per sample (NHWC vs NCHW tried); None if
    they are not the same tensor."""
    if a.shape[0] != b.shape[0] or a[0].size != b[0].size:
        return None
    if a.shape != b.shape:
        squeezed = [d for d in a.shape[1:] if d != 1] == [d for d in b.shape[1:] if d != 1]
        if a.ndim == 4 and b.ndim == 4 and a.shape == tuple(b.shape[i] for i in (0, 2, 3, 1)):
            b = b.transpose(0, 2, 3, 1)  # NCHW float model, NHWC artifact
        elif a.ndim == 4 and b.ndim == 4 and a.shape == tuple(b.shape[i] for i in (0, 3, 1, 2)):
            b = b.transpose(0, 3, 1, 2)
        elif not squeezed:  # the same elements in another order, or another tensor: not comparable
            return None
    fa, fb = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(fa, axis=1), np.linalg.norm(fb, axis=1)
    ok = (na > 1e-12) & (nb > 1e-12)
    if not ok.any():
        return None
    return float(np.mean(np.sum(fa[ok] * fb[ok], axis=1) / (na[ok] * nb[ok])))


def resolve(tokens: list[str], paths: dict[str, list[str]], cls: str | None = None,
            classes: dict[str, str] | None = None) -> str | None:
    """The module path whose tokens end with the longest run of ``tokens`` (wrapper prefixes and container levels
    the converters leave out do not matter), of class ``cls`` when the artifact records it; None when no module or
    several match equally well."""
    best, best_k, tie = None, 0, False
    for path, ptoks in paths.items():
        if cls is not None and classes is not None and classes.get(path) != cls:
            continue
        k = 0
        while k < min(len(tokens), len(ptoks)) and tokens[-1 - k] == ptoks[-1 - k]:
            k += 1
        if k > best_k or (k == best_k and k and best is not None and len(ptoks) < len(paths[best])):
            best, best_k, tie = path, k, False
        elif k == best_k and k and len(ptoks) == len(paths[best]):
            tie = True
    return None if tie or best_k == 0 else best


def float_outputs(module, x) -> tuple[dict[str, np.ndarray], list[str], dict[str, str]]:
    """Every module's tensor output on ``x`` (NCHW float32), the order the modules finish in, and their classes."""
    import torch

    outputs: dict[str, np.ndarray] = {}
    order: list[str] = []
    classes: dict[str, str] = {}
    hooks = []
    for name, m in module.named_modules():
        classes[name] = type(m).__name__

        def hook(_m, _inp, out, name=name):
            if isinstance(out, torch.Tensor) and out.is_floating_point() and name not in outputs:
                outputs[name] = out.detach().float().cpu().numpy()
                order.append(name)

        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(torch.from_numpy(np.ascontiguousarray(x)))
    finally:
        for h in hooks:
            h.remove()
    return outputs, order, classes


def float_encoder(cfg, manifest: dict, target: str):
    """The image encoder the target was compiled from: its student (found as compile finds it) or the teacher's
    image tower, refused when its hash is not the one in the manifest."""
    from ..models.intake import load_image_source

    sources = manifest.get("sources") or {}
    if cfg.model is None:
        raise InputError("edgec.toml has no [model] section", hint="run diagnose with the edgec.toml the target was built from")
    teacher = dataclasses.replace(cfg.model, path=str(cfg.resolve(cfg.model.path)))
    student = None
    if sources.get("student"):
        from ..distill import DistillConfig

        student = DistillConfig.from_edgec(cfg, target=target).out / "student"  # where compile distils it
    src = load_image_source(teacher, "student" if student else "teacher", student)
    for key in ("teacher", "student"):
        if sources.get(key) and src.sources.get(key) != sources[key]:
            raise InputError(f"the {key} that edgec.toml points at is not the one {target} was compiled from "
                             f"(sha256 {str(src.sources.get(key))[:12]}... vs {sources[key][:12]}... in the manifest)",
                             hint="pass the --config the target was built with, or compile the target again")
    return src.encoder.eval()


def diagnose(folder: str | Path, cfg, *, golden: str | Path | None = None, images: int = DEFAULT_IMAGES,
             threshold: float = DEFAULT_THRESHOLD, show: int = 5, log=print) -> dict:
    """Compare the target's image artifact with its float model layer by layer on ``images`` golden inputs."""
    from ..backends.diagnose import Rebuild, _relative, artifact_taps
    from ..data.preprocess import Preprocess
    from ..manifest import read_manifest
    from ..verify.golden import load_golden
    from ..verify.run import _checked, golden_inputs
    from .bundle import stratified

    folder = Path(folder)
    manifest = read_manifest(folder)
    target = manifest.get("target") or folder.name
    art = next((a for a in manifest["artifacts"] if a.get("tower", "image") == "image"), None)
    if art is None:
        raise InputError(f"{folder} has no image artifact to diagnose")
    path = _checked(folder, art)
    from ..backends.diagnose import TAPS

    if art["format"] not in TAPS:  # before the float model is loaded
        artifact_taps(path, art["format"], np.zeros(0, np.float32))
    gold = load_golden(Path(golden) if golden else folder.parent / "golden")
    pre = manifest["inputs"][0]["preprocess"]
    keep = stratified(gold.label_ids, images)
    subset = dataclasses.replace(gold, images=np.asarray(gold.images[keep]))
    x_art = golden_inputs(subset, Preprocess.from_json(pre))
    x_float = golden_inputs(subset, Preprocess.from_json({**pre, "layout": "NCHW"}))
    log(f"diagnose: {target}/{art['path']} vs the float model on {len(keep)} golden images")
    encoder = float_encoder(cfg, manifest, target)
    ref, order, classes = float_outputs(encoder, x_float)
    rebuild = Rebuild(encoder, manifest, art, lambda: _calibration(cfg, Preprocess.from_json(pre)), log)
    taps, notes = artifact_taps(path, art["format"], x_art, rebuild)
    whole = None
    if "artifact_output" in notes:  # the per-layer run is not the artifact: the shipped file, whole, is compared too
        shipped, rebuilt = notes.pop("artifact_output"), notes.pop("rebuilt_output")
        whole = {k: None if c is None else round(c, 6) for k, c in (
            ("artifact_vs_float", _cosine(shipped, ref[""])), ("rebuilt_vs_float", _cosine(rebuilt, ref[""])),
            ("artifact_vs_rebuilt", _cosine(shipped, rebuilt)))}
        log(f"diagnose: {notes['per_layer_run']}")
        w = notes.get("weights") or {}
        if w:
            log(f"diagnose: {w['from_artifact']} of the rebuilt program's {w['weight_tensors']} weight tensors matched in "
                f"{art['path']} (by XNNPACK's content hash) and run with its bytes, {w['differ_from_rebuild']} of them "
                "different from the rebuild's; the others run as rebuilt")
        log(f"diagnose: whole outputs, cosine to the float model: the shipped {art['path']} "
            f"{whole['artifact_vs_float']}, the rebuilt program {whole['rebuilt_vs_float']} (to each other "
            f"{whole['artifact_vs_rebuilt']})")
        if whole["artifact_vs_rebuilt"] is not None and whole["artifact_vs_rebuilt"] < threshold:
            log(f"diagnose: warning: the rebuilt program does not reproduce {art['path']} (cosine "
                f"{whole['artifact_vs_rebuilt']} < {threshold:g}): the layer figures describe the rebuild; compile the "
                "target again with this edgec.toml, or diagnose the same model compiled for cpu or android-tflite")
    paths = {p: p.split(".") if p else [] for p in ref}
    last: dict[str, np.ndarray] = {}  # module -> last artifact tensor made inside it (or in a child)
    for tokens, cls, value in taps:
        owner = resolve(tokens, paths, cls, classes)
        if owner is None:
            continue
        parts = owner.split(".")
        for i in range(len(parts), 0, -1):  # the module and every module around it (not the root: converters put
            last[".".join(parts[:i])] = value  # wrappers' ops, such as the output normalisation, outside any module)
    rows = []
    for i, name in enumerate(order):
        if name not in last:
            continue
        cos = _cosine(ref[name], last[name])
        if cos is None:
            continue
        fused = None
        if cos < threshold:  # converters fold a BatchNorm or activation into the op before it: that op's tensor is
            for nxt in order[i + 1:i + 4]:  # then the output of a following module that made no tensor of its own
                if nxt in last:
                    break
                c = _cosine(ref[nxt], last[name])
                if c is not None and c > cos:
                    cos, fused = c, nxt
        rows.append({"layer": _relative(name), "module": name, "class": classes.get(name),
                     "cosine": round(cos, 6), "diverges": cos < threshold,
                     "fused_with": _relative(fused) if fused else None})
    if not rows:
        raise InputError(f"no layer of {art['path']} could be matched with the float model",
                         hint="the artifact's tensor names carry no module paths")
    first = [r for r in rows if r["diverges"]][:show]
    fix = _fix(target, art, first)
    report = {"target": target, "artifact": art["path"], "precision": art.get("precision"), "images": len(keep),
              "threshold": threshold, "layers": rows, "first_divergent": first, "fix": fix, **notes}
    if whole is not None:
        report["whole_output"] = whole
    return report


def _calibration(cfg, preprocess):
    """The calibration set as compile loads it from edgec.toml (for a backend that rebuilds the int8 program)."""
    from ..quantize.calibration import CalibrationSpec, load_calibration

    if not cfg.calibration.path:
        raise InputError("edgec.toml has no [calibration] path, which the int8 program was calibrated with",
                         hint="run diagnose with the edgec.toml the target was built from")
    spec = CalibrationSpec(cfg.resolve(cfg.calibration.path), cfg.calibration.num_images, cfg.calibration.min_images,
                           cfg.calibration.seed, cfg.data.max_bad_fraction)
    return load_calibration(spec, preprocess)


def _fix(target: str, art: dict, first: list[dict]) -> str:
    if not first:
        return "every matched layer agrees with the float model above the threshold"
    layer = first[0]["layer"]
    if art.get("precision") == "int8":
        return (f"keep {layer} and the most sensitive layers in float: set [quantize.targets.{target}] tolerance = "
                f"0.002 (the accuracy-aware fallback), or try another calibration method ([quantize] method = "
                f"percentile); if the outputs are good enough, relax the gate")
    return (f"{layer} diverges in a float artifact: a conversion problem, not quantization; compare the layer's ops "
            f"('edgec inspect {art['path']}') or relax the gate's tolerance")


__all__ = ["diagnose", "resolve", "float_outputs", "DEFAULT_THRESHOLD"]
