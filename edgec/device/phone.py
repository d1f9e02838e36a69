"""Checks that travel to phones inside a bundle (``phone/``), and the same checks run wherever the bundle is verified.

* ``.pte``: an ExecuTorch BundledProgram (``<stem>.bpte``): the program plus golden inputs and the outputs
  ExecuTorch gave for them when the bundle was written, with tolerances. ExecuTorch's bundled runner
  (``executor_runner --bundleio_program_path``, built with the bundled-program extension) or an app
  checks it on the phone; ``edgec verify BUNDLE`` runs the same check through ExecuTorch's Python runtime.
* ``.tflite``: raw input tensors exactly as the interpreter takes them (quantized, NHWC) and the raw
  expected output tensors, with ``tensors.json`` and a README holding the ``adb`` recipe;
  ``edgec verify BUNDLE`` feeds the same files to LiteRT and compares.

Expected outputs are the artifact's own outputs when the bundle was written (not the teacher's): the
phone check asks "does this runtime compute what the verified one did", the gates ask the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..manifest import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

PHONE = "phone"
MAX_CASES = 8
ATOL = 5e-3  # on L2-normalised embeddings (elements ~0.06 at 256-d): a different program fails, another CPU passes
RTOL = 1e-2


def _inputs(root: Path, target: str, manifest: dict) -> np.ndarray:
    import dataclasses

    from ..data.preprocess import Preprocess
    from ..verify.golden import load_golden
    from ..verify.run import golden_inputs

    golden = load_golden(root / "golden")
    golden = dataclasses.replace(golden, images=np.asarray(golden.images[:MAX_CASES]))
    return golden_inputs(golden, Preprocess.from_json(manifest["inputs"][0]["preprocess"]))


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


# --------------------------------------------------------------------------------- ExecuTorch BundledProgram


def write_bundled_program(path: Path, x: np.ndarray, out: Path, log) -> dict:
    try:
        import torch
        from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
        from executorch.devtools.bundled_program.core import BundledProgram
        from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer
        from executorch.runtime import Runtime
    except ImportError as exc:
        return {"artifact": path.name, "kind": "executorch-bundled-program", "written": False,
                "reason": f"ExecuTorch's devtools are not installed here ({exc}); pip install executorch"}
    method = Runtime.get().load_program(str(path)).load_method("forward")
    cases, expected = [], []
    for i in range(len(x)):
        xi = torch.from_numpy(np.ascontiguousarray(x[i:i + 1]))
        yi = method.execute([xi])[0]
        cases.append(MethodTestCase(inputs=[xi], expected_outputs=[yi]))
        expected.append(yi.numpy())
    program = BundledProgram(None, [MethodTestSuite(method_name="forward", test_cases=cases)], pte_file_path=str(path))
    name = f"{_stem(path.name)}.bpte"
    atomic_write_bytes(out / name, serialize_from_bundled_program_to_flatbuffer(program))
    np.save(out / f"{_stem(path.name)}.expected.npy", np.concatenate(expected).astype(np.float32), allow_pickle=False)
    log(f"bundle: ExecuTorch BundledProgram {PHONE}/{name} ({len(cases)} golden inputs, rtol {RTOL:g}, atol {ATOL:g})")
    return {"artifact": path.name, "kind": "executorch-bundled-program", "written": True, "file": f"{PHONE}/{name}",
            "expected": f"{PHONE}/{_stem(path.name)}.expected.npy", "cases": len(cases), "rtol": RTOL, "atol": ATOL}


def check_bundled_program(root: Path, entry: dict) -> dict:
    from ..errors import require_module

    pl = require_module("executorch.extension.pybindings.portable_lib", install="executorch",
                        purpose="checking an ExecuTorch BundledProgram")
    bundled = pl._load_bundled_program_from_buffer((root / entry["file"]).read_bytes())
    expected = np.load(root / entry["expected"], allow_pickle=False)
    failed, diff = [], 0.0
    for i in range(entry["cases"]):
        try:
            outs = bundled.verify_result_with_bundled_expected_output("forward", i, entry["rtol"], entry["atol"])
        except RuntimeError:
            failed.append(i)
            continue
        got = outs[0].numpy() if hasattr(outs[0], "numpy") else np.asarray(outs[0])
        diff = max(diff, float(np.abs(got.reshape(-1) - expected[i].reshape(-1)).max()))
    return {"artifact": entry["artifact"], "kind": entry["kind"], "cases": entry["cases"], "failed_cases": failed,
            "max_abs_diff": diff, "passed": not failed, "checked_by": "ExecuTorch BundledProgram "
            "(verify_result_with_bundled_expected_output)"}


# --------------------------------------------------------------------------------- LiteRT raw tensors


def _interpreter(path: Path):
    from ..runtime.inspect import litert_interpreter_module

    mod = litert_interpreter_module()
    interp = mod.Interpreter(model_path=str(path))
    interp.allocate_tensors()
    return interp


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    if scale:
        info = np.iinfo(detail["dtype"])
        x = np.clip(np.round(x / scale + zero), info.min, info.max)
    return x.astype(detail["dtype"])


def _record(detail: dict) -> dict:
    scale, zero = detail["quantization"]
    return {"name": detail["name"], "shape": [int(d) for d in detail["shape"]], "dtype": np.dtype(detail["dtype"]).name,
            "quantization": {"scale": float(scale), "zero_point": int(zero)} if scale else None}


def write_raw_tensors(path: Path, x: np.ndarray, out: Path, log) -> dict:
    interp = _interpreter(path)
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    folder = out / _stem(path.name)
    for i in range(len(x)):
        xi = _quantize(x[i:i + 1], inp)
        interp.set_tensor(inp["index"], xi)
        interp.invoke()
        atomic_write_bytes(folder / f"input_{i}.raw", xi.tobytes())
        atomic_write_bytes(folder / f"expected_{i}.raw", interp.get_tensor(outp["index"]).tobytes())
    scale = outp["quantization"][0]
    tensors = {"artifact": path.name, "input": _record(inp), "output": _record(outp), "cases": len(x),
               "atol": max(ATOL, 2 * scale) if scale else ATOL}
    atomic_write_json(folder / "tensors.json", tensors)
    atomic_write_text(folder / "README.md", adb_recipe(path.parent.name, path.name, tensors))
    log(f"bundle: {len(x)} raw input/expected-output tensor pairs for {path.name} in {PHONE}/{folder.name}/ (adb recipe "
        "in its README.md)")
    return {"artifact": path.name, "kind": "tflite-raw-tensors", "written": True, "folder": f"{PHONE}/{folder.name}",
            "cases": len(x), "atol": tensors["atol"]}


def _dequantize(raw: np.ndarray, rec: dict) -> np.ndarray:
    q = rec["quantization"]
    return (raw.astype(np.float32) - q["zero_point"]) * q["scale"] if q else raw.astype(np.float32)


def check_raw_tensors(root: Path, entry: dict) -> dict:
    folder = root / entry["folder"]
    tensors = json.loads((folder / "tensors.json").read_text(encoding="utf-8"))
    interp = _interpreter(root / read_json(root / "bundle.json")["target"] / tensors["artifact"])
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    failed, diff = [], 0.0
    for i in range(tensors["cases"]):
        xi = np.fromfile(folder / f"input_{i}.raw", dtype=tensors["input"]["dtype"]).reshape(tensors["input"]["shape"])
        interp.set_tensor(inp["index"], xi)
        interp.invoke()
        got = _dequantize(interp.get_tensor(outp["index"]), tensors["output"])
        want = _dequantize(np.fromfile(folder / f"expected_{i}.raw", dtype=tensors["output"]["dtype"]), tensors["output"])
        d = float(np.abs(got.reshape(-1) - want.reshape(-1)).max())
        diff = max(diff, d)
        if d > tensors["atol"]:
            failed.append(i)
    return {"artifact": entry["artifact"], "kind": entry["kind"], "cases": tensors["cases"], "failed_cases": failed,
            "max_abs_diff": diff, "passed": not failed, "checked_by": "LiteRT interpreter on the raw tensor files"}


def adb_recipe(target: str, artifact: str, tensors: dict) -> str:
    inp, outp = tensors["input"], tensors["output"]
    shape = ",".join(str(d) for d in inp["shape"])
    return f"""# Checking {artifact} on an Android phone

Files: `input_<i>.raw` are the exact bytes the interpreter takes ({inp['dtype']}, shape {inp['shape']},
quantization {inp['quantization']}); `expected_<i>.raw` are the raw output bytes ({outp['dtype']}, shape
{outp['shape']}, quantization {outp['quantization']}) LiteRT produced for them when the bundle was written.
A phone's output passes when, dequantized, it is within {tensors['atol']:g} of the expected one everywhere.

Recipe (documented, not run by edgec's tests): TFLite's `benchmark_model` for android_arm64 (prebuilt in the
LiteRT/TensorFlow releases, or `bazel build -c opt --config=android_arm64
//tensorflow/lite/tools/benchmark:benchmark_model`):

```
adb push ../../{target}/{artifact} input_0.raw /data/local/tmp/
adb push benchmark_model /data/local/tmp/ && adb shell chmod +x /data/local/tmp/benchmark_model
adb shell /data/local/tmp/benchmark_model --graph=/data/local/tmp/{artifact} \\
    --input_layer={inp['name']} --input_layer_shape={shape} \\
    --input_layer_value_files={inp['name'].replace(':', '::')}:/data/local/tmp/input_0.raw \\
    --num_runs=1 --warmup_runs=0 --output_filepath=/data/local/tmp/output_0.raw
adb pull /data/local/tmp/output_0.raw
```

`--output_filepath` exists in recent `benchmark_model` builds (check `--help`); an app can instead load the
raw input into the interpreter's input tensor and write the output tensor's bytes. Compare with numpy:

```
python3 -c "import numpy as np; d=lambda f: np.fromfile(f, np.{outp['dtype']}).astype(np.float32); \\
print(np.abs(d('output_0.raw') - d('expected_0.raw')).max() * {outp['quantization']['scale'] if outp['quantization'] else 1.0})"
```
"""


# --------------------------------------------------------------------------------- bundle hooks

WRITERS = {"pte": write_bundled_program, "tflite": write_raw_tensors}  # by artifact file format
CHECKERS = {"executorch-bundled-program": check_bundled_program, "tflite-raw-tensors": check_raw_tensors}


def add_phone_checks(stage: Path, target: str, *, log=print) -> list[dict] | None:
    """Write the phone checks of every image artifact in a staged bundle; None when no artifact is for a phone."""
    manifest = read_json(stage / target / "manifest.json")
    arts = [a for a in manifest["artifacts"] if a.get("tower", "image") == "image" and a.get("format") in WRITERS]
    if not arts:
        return None
    x = _inputs(stage, target, manifest)
    return [WRITERS[a["format"]](stage / target / a["path"], x, stage / PHONE, log) for a in arts]


def check_phone(root: Path, record: dict, *, log=print) -> list[dict]:
    """Run every phone check the bundle carries, here."""
    results = []
    for entry in record.get("phone") or []:
        if not entry.get("written"):
            results.append({"artifact": entry["artifact"], "kind": entry["kind"], "passed": None,
                            "reason": entry.get("reason")})
            continue
        if entry["kind"] not in CHECKERS:
            raise InputError(f"the bundle carries a phone check of kind {entry['kind']!r} this edgec cannot run",
                             hint="verify it with the edgec that wrote the bundle")
        result = CHECKERS[entry["kind"]](root, entry)
        log(f"verify: {entry['kind']} for {entry['artifact']}: {result['cases'] - len(result['failed_cases'])} of "
            f"{result['cases']} cases within tolerance (max abs diff {result['max_abs_diff']:.2e})")
        results.append(result)
    return results


__all__ = ["add_phone_checks", "check_phone", "write_bundled_program", "write_raw_tensors", "adb_recipe"]
