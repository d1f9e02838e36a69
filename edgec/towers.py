"""What compile ships beside the image model: the teacher's text tower (fp32, with its tokenizer files)
and the zero-shot variant (the image model with the label text embeddings folded in, logits out).

Both read the backend record (:mod:`edgec.backends`): its text-tower export, its head folding, its
suffix and its device notes; nothing here names a backend.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from .errors import InputError
from .manifest import file_record

ZERO_SHOT_NAME = "model.zeroshot"


def torch_ids(ids):
    import torch

    return torch.from_numpy(ids.astype("int64"))


def text_tower(name: str, teacher, target, backend, folder: Path, texts: list[str], log) -> dict:
    """The teacher's text tower (fp32, int32 token ids, no ArgMax) and its tokenizer files in ``folder/tokenizer``.

    fp32 because it runs once per label set (or per query), not per image: its latency matters little and
    int8 would only cost agreement. Returns {"built": True, "record": artifact record} or {"built": False,
    "reason": ...} (the image artifact ships either way; the reason goes into the manifest)."""
    from .models.text_export import ship_tokenizer, text_export_module
    from .runtime.tokenize import tokenize

    if target.constraints.fully_integer or target.constraints.supported_ops:
        reason = (f"target {name} runs fully integer image models on an accelerator; a text tower (token "
                  "embedding gather, LayerNorm, attention) does not map onto it. Compile the text tower for cpu, "
                  "android or ios; for zero-shot use ship text_embeddings.npy (written here)")
        log(f"text tower not built: {reason}")
        return {"built": False, "reason": reason}
    if backend.export_text is None:
        reason = f"the {backend.name} backend has no text-tower export"
        log(f"text tower not built: {reason}")
        return {"built": False, "reason": reason}
    tok_dir = folder / "tokenizer"
    path = folder / f"text.fp32{backend.suffix}"
    try:
        module, pooling = text_export_module(teacher)
        tokenizer = ship_tokenizer(teacher, tok_dir, check=texts)
        length = pooling["context_length"]
        io_records = backend.export_text(module, length, path, spec=target)
    except InputError:  # asked for and not buildable for this target: refused (exit 2), naming why
        shutil.rmtree(tok_dir, ignore_errors=True)
        for f in folder.glob("text.fp32.*"):
            f.unlink()
        raise
    # the artifact in its own runtime against the eager teacher, on every text the tokenizer was checked on
    from .runtime.runners import open_runner

    ids = tokenize(teacher.tokenizer, texts)
    got = open_runner(path, target.runtime)(ids)
    ref = teacher.encode_text(torch_ids(ids)).numpy()
    cos = np.sum(got * ref, axis=1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    check = {"texts": len(texts), "max_abs_diff": float(np.abs(got - ref).max()), "cosine_min": float(cos.min())}
    log(f"text tower: fp32 {path.name} ({path.stat().st_size / 1e6:.2f} MB), int32 ids of length {length}, "
        f"pooling: {pooling['how']}; vs eager teacher on {len(texts)} texts: max |diff| {check['max_abs_diff']:.2e}")
    record = file_record(path, folder, format=backend.format, runtime=target.runtime, precision="fp32",
                         tower="text", inputs=io_records["inputs"], outputs=io_records["outputs"], tokenizer=tokenizer,
                         pooling=pooling, check=check)
    if io_records.get("delegation"):
        record["delegation"] = io_records["delegation"]
    note = backend.text_note(path, target) if backend.text_note else None
    if note:
        record["engine_not_built"] = note
    return {"built": True, "record": record, "artifact": path.name}


def zero_shot_variant(name: str, target, backend, encoder, shape, shipped: Path, precision: str, text, teacher,
                      quantize, options: dict, folder: Path, log) -> dict:
    """The image model with the head folded in: logits = logit_scale * normalize(image) @ text.T (+ logit_bias).

    ``text`` are the label embeddings as shipped in text_embeddings.npy (fp16, widened), so the logits
    artifact decides exactly as an app using the embedding artifact and the head files. Where the backend
    folds a head into a built artifact (ONNX), the shipped graph gets the nodes appended (same image part,
    int8 Q/DQ included); other backends build the wrapped model again at the shipped precision through
    ``quantize`` (re-quantized: top-1 may differ on near-ties)."""
    if text is None:
        reason = "no label text embeddings (the eval/train folder has no class sub-folders, or the teacher no text tower)"
    elif target.constraints.fully_integer:
        reason = (f"target {name} must stay fully integer, and the folded head normalises in float; "
                  "apply text_embeddings.npy in the app")
    else:
        reason = None
    if reason:
        log(f"zero-shot variant not built: {reason}")
        return {"built": False, "reason": reason}
    matrix = np.asarray(text, np.float16).astype(np.float32)  # (C, D), exactly text_embeddings.npy
    bias = teacher.logit_bias
    inputs = None
    if backend.fold_head is not None:
        path = folder / f"{ZERO_SHOT_NAME}{backend.suffix}"
        backend.fold_head(shipped, path, matrix, teacher.logit_scale, bias, normalize=not target.normalize_output)
        expected = 1.0
    else:
        import torch

        from .backends.wrappers import ZeroShotLogits

        spec = dataclasses.replace(target, precisions=[precision], normalize_output=False)
        work = folder / ".zeroshot"
        work.mkdir()
        module = ZeroShotLogits(encoder, torch.from_numpy(matrix), teacher.logit_scale, bias).eval()
        built = backend.build(module, shape, spec=spec, work=work, quantize=quantize, options=options, log=lambda _: None)
        src = built.candidates[precision]
        path = folder / f"{ZERO_SHOT_NAME}{src.suffix}"
        for f in backend.artifact_files(src):
            f.replace(folder / f"{ZERO_SHOT_NAME}{f.suffix}")
        shutil.rmtree(work)
        expected = 0.97 if precision == "int8" else 1.0
        if backend.io_records is not None:
            inputs = backend.io_records(path, built.io, spec)["inputs"]
    log(f"zero-shot variant: {path.name} ({precision}, {len(matrix)} labels folded in, logits out)")
    record = file_record(path, folder, format=backend.format, runtime=target.runtime, precision=precision,
                         tower="zero-shot", labels="labels.json",
                         outputs=[{"name": "logits", "shape": [1, len(matrix)], "dtype": "float32"}],
                         expected_logits_agreement=expected)
    if inputs is not None:
        record["inputs"] = inputs
    return {"built": True, "record": record, "artifact": path.name}
