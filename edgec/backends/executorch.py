"""ExecuTorch: ``.pte`` programs with the XNNPACK delegate (Android, iOS), fp32 and PT2E int8.

``torch.export`` -> (int8: ``XNNPACKQuantizer`` with per-channel symmetric weights and static
activations, ``prepare_pt2e`` / calibrate / ``convert_pt2e``) -> ``to_edge_transform_and_lower``
with the XNNPACK partitioner -> ``.pte``. timm's fused attention is switched off first (it
halves MobileViT latency in the ``.pte``), then LayerNorm and attention are rewritten into ops
XNNPACK takes (:mod:`.rewrites`; a MobileViT student: 51 delegate subgraphs -> 3). The report says how many nodes were delegated, into
how many XNNPACK subgraphs, and which op types stayed outside.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

from ..errors import require_module
from . import Backend, Built, Quantizer, precision_candidates

METHODS = ("minmax", "percentile", "entropy", "histogram")


def lower(ep, path: Path, partitioner=None, delegate: str = "xnnpack") -> dict:
    """Lower an exported program for ``partitioner`` (XNNPACK by default), write the ``.pte``, and say
    what was delegated and which ops stayed outside (why not delegated: no delegate kernel for them)."""
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    if partitioner is None:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioner = XnnpackPartitioner()
    edge = to_edge_transform_and_lower(ep, partitioner=[partitioner])
    info = get_delegation_info(edge.exported_program().graph_module)
    path.write_bytes(edge.to_executorch().buffer)
    outside = {op: b.non_delegated for op, b in info.delegation_by_operator.items() if b.non_delegated}
    total = info.num_delegated_nodes + info.num_non_delegated_nodes
    return {"delegate": delegate, "delegated_subgraphs": info.num_delegated_subgraphs,
            "delegated_nodes": info.num_delegated_nodes, "non_delegated_nodes": info.num_non_delegated_nodes,
            "delegated_share": round(info.num_delegated_nodes / total, 4) if total else 0.0,
            "not_delegated_ops": dict(sorted(outside.items(), key=lambda kv: -kv[1]))}


_lower = lower  # the name tests and older callers use


def prepared(encoder, spec):
    """The encoder as ExecuTorch exports it: normalisation folded in (when the target asks), timm's fused
    attention off, LayerNorm and attention rewritten into ops XNNPACK delegates. Returns (model, rewrites)."""
    from ..models.student import disable_fused_attention
    from .rewrites import xnnpack_friendly
    from .wrappers import NormalizedEmbedding

    model = NormalizedEmbedding(copy.deepcopy(encoder), spec.normalize_output).eval()
    disable_fused_attention(model)
    return model, xnnpack_friendly(model)


def program(encoder, shape: tuple[int, ...], spec, calib, method: str, percentile: float, work: Path,
            options: dict | None = None, prepared_model: bool = False):
    """The target's PT2E program (XNNPACKQuantizer, per-channel weights, the method's activation observer)."""
    from ..quantize.pt2e import Pt2eProgram

    model = encoder if prepared_model else prepared(encoder, spec)[0]
    return Pt2eProgram(model, shape, [b[0] for b in calib.batches(layout="NCHW", batch_size=1)], method=method,
                       percentile=percentile, calibration_sha256=calib.sha256)


def build(encoder, shape: tuple[int, ...], *, spec, work: Path, quantize, options: dict | None = None, log) -> Built:
    """fp32 ``.pte`` and, when the target lists int8, the quantize stage's PT2E program lowered to XNNPACK."""
    # the target ISA plays no part: XNNPACK's and LiteRT's int8 kernels widen to 16/32 bits on every ISA (no saturation)
    import torch

    from .diagnose import unsupported_op_error

    require_module("executorch", install="executorch", purpose="ExecuTorch (.pte) targets")
    model, rewrites = prepared(encoder, spec)
    if any(rewrites.values()):
        log(f"rewrote {rewrites['layer_norm']} LayerNorm and {rewrites['attention']} attention modules into ops "
            f"XNNPACK delegates")
    example = (torch.zeros(*shape),)
    with torch.no_grad():
        dim = int(model(*example).shape[-1])
    reports: dict[str, dict] = {}

    def export():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.export.export(model, example)
        except Exception as exc:  # noqa: BLE001 - torch.export raises many types; name the op and the layer
            raise unsupported_op_error(exc, model, example, converter="torch.export", backend="executorch") from None

    fp32 = work / "model.fp32.pte"
    ep = export()
    try:
        reports["fp32"] = lower(ep, fp32)
    except Exception as exc:  # noqa: BLE001 - lowering fails on ops without an edge/ExecuTorch kernel
        raise unsupported_op_error(exc, model, example, converter="ExecuTorch lowering", backend="executorch") from None
    log(f"fp32 .pte ({fp32.stat().st_size / 1e6:.2f} MB), {reports['fp32']['delegated_subgraphs']} XNNPACK subgraphs, "
        f"{reports['fp32']['delegated_share']:.0%} of nodes delegated")

    def int8() -> Path:
        def make(calib, method, percentile):
            return program(model, shape, spec, calib, method, percentile, work, options, prepared_model=True)

        res = quantize(make, work / "model.int8.pte")
        reports["int8"] = res.record.get("delegation") or {}
        built.calibration_sha256, built.quantization = res.record["calibration_sha256"], res.record
        log(f"int8 .pte ({res.record['form']}, {res.path.stat().st_size / 1e6:.2f} MB), "
            f"{reports['int8'].get('delegated_subgraphs')} XNNPACK subgraphs, "
            f"{reports['int8'].get('delegated_share', 0):.0%} delegated")
        return res.path

    built = Built(candidates={}, format="pte", io={})
    candidates = precision_candidates(spec, "executorch", {"fp32": lambda: fp32, "int8": int8})
    variants = {name: _variant(name, encoder, spec, example, work, log) for name in spec.extra_delegates}
    io = {"inputs": [{"name": "pixels", "shape": list(shape), "dtype": "float32", "quantization": None}],
          "outputs": [{"name": "embedding", "shape": [shape[0], dim], "dtype": "float32",
                       "normalized": spec.normalize_output}]}
    built.candidates, built.io, built.variants = candidates, io, variants
    built.delegation = {p: {**reports[p], "rewrites": rewrites} for p in candidates}
    return built


COREML_TARGET = "iOS17"  # what an iPhone 15 Pro ships with; older targets lose ops and precision choices


def _variant(name: str, encoder, spec, example: tuple, work: Path, log) -> dict:
    """The fp32 program lowered for another delegate (Core ML), or the reason it was not.

    Core ML takes float graphs and runs them in fp16 on the Neural Engine/GPU; ExecuTorch's
    CoreMLBackend runtime exists only in Apple builds, so the program cannot be run here: it is
    recorded as unverified, next to the XNNPACK artifact that was verified."""
    if name != "coreml":
        return {"reason": f"no {name} delegate in this edgec"}
    try:
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    except ImportError as exc:
        return {"reason": f"ExecuTorch's Core ML backend cannot be imported here ({exc}); pip install coremltools"}
    import torch

    from .wrappers import NormalizedEmbedding

    model = NormalizedEmbedding(copy.deepcopy(encoder), spec.normalize_output).eval()
    specs = CoreMLBackend.generate_compile_specs(compute_unit=ct.ComputeUnit.ALL, compute_precision=ct.precision.FLOAT16,
                                                 minimum_deployment_target=getattr(ct.target, COREML_TARGET))
    path = work / "model.coreml.pte"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, example)
            report = lower(ep, path, CoreMLPartitioner(compile_specs=specs), delegate="coreml")
    except Exception as exc:  # noqa: BLE001 - coremltools raises many types; the XNNPACK artifact ships regardless
        return {"reason": f"Core ML lowering failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"}
    log(f"Core ML .pte ({path.stat().st_size / 1e6:.2f} MB, fp16 compute, {COREML_TARGET}+), "
        f"{report['delegated_subgraphs']} Core ML subgraphs, {report['delegated_share']:.0%} delegated; "
        "not verified here (CoreMLBackend runs on Apple devices only)")
    return {"path": path, "format": "pte", "runtime": "executorch", "precision": "fp16", "delegate": "coreml",
            "minimum_deployment_target": COREML_TARGET, "delegation": report, "verified": False,
            "why_unverified": "ExecuTorch's CoreMLBackend is built only for Apple platforms; run the program with "
                              "ExecuTorch on a Mac or iPhone (e.g. the ExecuTorch iOS demo app) and compare with "
                              "the golden set"}


def export_text(module, context_length: int, path: Path, *, spec=None) -> dict:
    """fp32 .pte (XNNPACK delegate) of a text tower (int32 token ids (1, L) -> normalised embedding)."""
    import torch

    from .diagnose import unsupported_op_error

    require_module("executorch", install="executorch", purpose="ExecuTorch (.pte) targets")
    example = (torch.zeros(1, context_length, dtype=torch.int32),)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module.eval(), example)
        report = lower(ep, path)
    except Exception as exc:  # noqa: BLE001 - torch.export and lowering raise many types
        raise unsupported_op_error(exc, module, example, converter="ExecuTorch export of the text tower",
                                   backend="executorch") from None
    with torch.no_grad():
        dim = int(module(*example).shape[-1])
    return {"inputs": [{"name": "token_ids", "shape": [1, context_length], "dtype": "int32", "quantization": None}],
            "outputs": [{"name": "embedding", "shape": [1, dim], "dtype": "float32", "normalized": True}],
            "delegation": report}


def reference_int8(encoder, shape: tuple[int, ...], calib, work: Path) -> tuple[Path, str]:
    """XNNPACKQuantizer with get_symmetric_quantization_config() defaults (per-tensor weights, histogram, SiLU
    left float), no edgec rewrites (timm's fused attention still off: it is how ExecuTorch exports timm models at all)."""
    from ..models.student import disable_fused_attention
    from ..quantize.pt2e import Pt2eProgram
    from .wrappers import NormalizedEmbedding

    model = NormalizedEmbedding(copy.deepcopy(encoder)).eval()
    disable_fused_attention(model)
    prog = Pt2eProgram(model, shape, [b[0] for b in calib.batches(layout="NCHW", batch_size=1)], method="histogram",
                       per_channel=False, int8_silu=False)
    out = work / "reference.int8.pte"
    prog.lower(out)
    return out, "XNNPACKQuantizer, get_symmetric_quantization_config() defaults (per-tensor, histogram)"


def runner(path: Path, threads: int | None = None, runtime: str | None = None, kernels: str = "auto"):
    from ..runtime.runners import ExecuTorchRunner

    return ExecuTorchRunner(path, threads)


def io_records(path: Path, io: dict, spec) -> dict:
    """A .pte takes and gives float32 at every precision: the export's records stand."""
    return io


BACKEND = Backend(
    name="executorch", format="pte", suffix=".pte", runtimes=("executorch",), packages=("executorch", "torchao"),
    build_modules=("torch", "executorch", "torchao"), install="executorch torchao",
    runtime_modules={"executorch": ("executorch+torch",)}, precisions=("fp32", "int8"),
    quantizers={"xnnpack-pt2e": Quantizer("xnnpack-pt2e", "PT2E XNNPACKQuantizer, per-channel symmetric int8 weights, "
                                          "static int8 activations", METHODS, "histogram")},
    build=build, program=program, reference_int8=reference_int8, export_text=export_text, io_records=io_records,
    runner=runner, delegates=("coreml",),
    notes=("ExecuTorch's Python runtime imports torch: verifying .pte artifacts needs torch installed.",),
)


# ------------------------------------------------------------------------------------------- edgec diagnose
# XNNPACK delegates log only their whole calls' outputs in ETDump, and tapping tensors inside a delegate changes
# its partitions (executorch 1.5.1's intermediate_output_tap either pulls layers out of XNNPACK or fails to resize
# int8 delegate outputs). So the per-layer run is the target's program rebuilt as compile made it (the manifest's
# method, calibration and float layers) with the artifact's own weights put back, lowered WITHOUT a delegate
# (portable + quantized kernels), every module's output tapped as an extra program output.

UNDELEGATED = ("the per-layer run is the target's program rebuilt from the float model (the manifest's calibration "
               "and method) with the artifact's weights, run undelegated in the ExecuTorch runtime (portable and "
               "quantized kernels; XNNPACK's kernels can round differently)")
_Q = "quantized_decomposed.quantize_per_tensor.default"


def _named_data(path: Path) -> dict[str, bytes]:
    """The ``.pte``'s named data (XNNPACK's constant tensors), keyed by the sha256 of the bytes as lowered."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    named = deserialize_pte_binary(Path(path).read_bytes()).named_data
    if named is None:
        return {}
    return {key: bytes(getattr(named.buffers[entry.buffer_index], "buffer", named.buffers[entry.buffer_index]))
            for key, entry in named.pte_data.items()}


def _layouts(t):
    """Element orders XNNPACK serialises a constant in: as is, and NHWC for 4-d (conv) weights."""
    import torch

    idx = torch.arange(t.numel()).reshape(t.shape)
    orders = [idx.flatten()]
    if t.dim() == 4:
        orders.append(idx.permute(0, 2, 3, 1).flatten())
    return orders


def artifact_weights(ep, path: Path) -> dict:
    """Put the ``.pte``'s own weight tensors (2-d and more) into ``ep`` (in place), found by the hash XNNPACK keys
    them under (computed from the rebuilt program's tensor, as is or NHWC). Returns counts: the rebuild's weight
    tensors, those found in the artifact, and how many of those hold other bytes there than the rebuild made (a
    changed or corrupted artifact)."""
    import hashlib

    import numpy as np
    import torch

    named = _named_data(path)
    sig = ep.graph_signature
    used = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    found = differ = total = 0
    for fqn in dict.fromkeys(used.values()):
        t = ep.state_dict.get(fqn, ep.constants.get(fqn))
        if not isinstance(t, torch.Tensor) or t.dim() < 2:  # weights; biases, scales, zero points stay the rebuild's
            continue  # (XNNPACK requantizes biases to int32 and keeps quantization parameters in its graph)
        total += 1
        flat = t.detach().contiguous().reshape(-1)
        for order in _layouts(t):
            data = flat[order].numpy().tobytes()
            key = hashlib.sha256(data).hexdigest()
            if key not in named or len(named[key]) != len(data):
                continue
            found += 1
            if named[key] != data:
                differ += 1
                values = np.frombuffer(named[key], dtype=flat.numpy().dtype)
                new = np.empty_like(values)
                new[order.numpy()] = values
                with torch.no_grad():
                    t.copy_(torch.from_numpy(new).reshape(t.shape))
            break
    return {"weight_tensors": total, "from_artifact": found, "differ_from_rebuild": differ}


def _no_zero_over_zero(gm) -> int:
    """Divisors that are a square root clamped to at least 1e-12 in the converted GraphModule (in place); returns
    how many.

    The LayerNorm rewrite divides x - mean by sqrt(var + eps); when var + eps quantizes to 0 (a constant row, such
    as a class token) that is 0 / 0. The normalised row is 0, and the shipped .pte (XNNPACK) agrees with the float
    model, while ExecuTorch's portable quantize turns the NaN into -128, which attention spreads to every token."""
    import torch

    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if (node.op != "call_function" or "div" not in str(node.target) or len(node.args) < 2
                or not isinstance(node.args[1], torch.fx.Node) or "sqrt" not in str(node.args[1].target)):
            continue
        with graph.inserting_before(node):
            floor = graph.call_function(torch.ops.aten.clamp.default, (node.args[1], 1e-12))
        node.replace_input_with(node.args[1], floor)
        count += 1
    gm.recompile()
    return count


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def diagnosis_taps(path: Path, x, rebuild) -> tuple[list, dict]:
    """Each module's output (in execution order: module-path tokens, no class, values for every input) from the
    undelegated rebuild of the target's program, and notes: what ran, the artifact's whole outputs."""
    import tempfile

    import numpy as np
    import torch

    from .. import registry
    from ..errors import InputError

    require_module("executorch", install="executorch", purpose="diagnosing .pte artifacts")
    import executorch.kernels.quantized  # noqa: F401 - the out variants of quantize/dequantize for the program
    from executorch.devtools.intermediate_output_tap import FULL_TENSOR, strip_taps_, tap_intermediate_outputs_
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime, Verification

    manifest, art = rebuild.manifest, rebuild.artifact
    spec = registry.get("targets", manifest["target"]).spec
    model, _ = prepared(rebuild.encoder, spec)
    shape = tuple(manifest["inputs"][0]["shape"])
    example = (torch.zeros(*shape),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if art.get("precision") == "int8":
            q = manifest.get("quantization") or {}
            calib = rebuild.calibration()
            if q.get("calibration_sha256") and calib.sha256 != q["calibration_sha256"]:
                raise InputError("the calibration images are not the ones the artifact was quantized with (sha256 "
                                 f"{calib.sha256[:12]}... vs {q['calibration_sha256'][:12]}... in the manifest)",
                                 hint="pass the --config the target was built with, or compile the target again")
            rebuild.log(f"diagnose: rebuilding the int8 program ({q.get('method')} ranges, {len(calib.images)} "
                        f"calibration images, {len(q.get('float_layers') or [])} float layers)")
            with tempfile.TemporaryDirectory() as work:
                prog = program(model, shape, spec, calib, q.get("method") or "histogram", q.get("percentile") or 99.999,
                               Path(work), prepared_model=True)
                gm = prog.convert(frozenset(la["name"] for la in q.get("float_layers") or []))
            _no_zero_over_zero(gm)
            ep = torch.export.export(gm, example)
        else:
            ep = torch.export.export(model, example)
    weights = artifact_weights(ep, path)
    last: dict[str, object] = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and _module_path(node) and isinstance(node.meta.get("val"), torch.Tensor):
            last[_module_path(node)] = node
    taps, dequant = {}, {}
    for module, node in last.items():
        users = list(node.users)
        if len(users) == 1 and str(users[0].target) == _Q:  # the module's output as the next op takes it (int8)
            dequant[users[0].name] = (float(users[0].args[1]), int(users[0].args[2]))
            node = users[0]
        taps[node.name] = module
    rebuild.log(f"diagnose: lowering the program undelegated with {len(taps)} module outputs tapped")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep, specs = tap_intermediate_outputs_(ep, (lambda n: n.name in taps, FULL_TENSOR))
            edge = to_edge_transform_and_lower(ep, partitioner=[])
            strip_taps_(edge)
            buffer = edge.to_executorch().buffer
    except Exception as exc:  # noqa: BLE001 - ExecuTorch's passes raise many types; the shipped .pte is not at fault
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"diagnose could not lower the rebuilt program without a delegate: {first}",
                         hint="diagnose the same model compiled for cpu or android-tflite, whose artifacts show "
                              "their intermediate tensors") from None
    rebuilt = Runtime.get().load_program(buffer, verification=Verification.Minimal)  # alive while its method runs
    method = rebuilt.load_method("forward")
    rows, finals = [], []
    for i in range(len(x)):
        xi = torch.from_numpy(np.ascontiguousarray(x[i:i + 1], dtype=np.float32))
        out = method.execute([xi])
        rows.append([out[s.output_index] for s in specs])
        finals.append(out[0].float().numpy())
    whole = runner(path)(np.asarray(x, dtype=np.float32))  # the shipped program, XNNPACK and all (edgec's runner)
    result = []
    for j, s in enumerate(specs):
        values = np.concatenate([r[j].float().numpy()[None] if r[j].dim() == 0 else r[j].float().numpy() for r in rows])
        if s.node_name in dequant:
            scale, zero = dequant[s.node_name]
            values = (values - zero) * scale
        result.append((taps[s.node_name].split("."), None, values.astype(np.float32)))
    what = UNDELEGATED if art.get("precision") == "int8" else UNDELEGATED.replace(
        " (the manifest's calibration and method)", "").replace("portable and quantized kernels", "portable kernels")
    notes = {"per_layer_run": what, "weights": weights,
             "artifact_output": whole, "rebuilt_output": np.concatenate(finals)}
    return result, notes
