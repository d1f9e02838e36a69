"""int8 Q/DQ ONNX in the form TensorRT's explicit quantization accepts (onnxruntime runs it too).

``quant_pre_process`` first; per-channel symmetric int8 weights; symmetric int8 activations
(TensorRT's form) or, for onnxruntime-only targets, asymmetric uint8 activations (closer to the
float model: post-activation tensors are mostly positive and symmetric int8 wastes half its
levels on them) with ranges from :mod:`edgec.quantize.ranges` (measured once per model,
so sensitivity and fallback can quantize it many times); only Conv / MatMul / Gemm quantized by default
(fewer Q/DQ pairs, and the best cosine in the exploratory runs). The same ranges give the
TensorRT calibration cache.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, require_module
from .calibration import CalibrationSet
from .ranges import collect_ranges, tensorrt_cache

DEFAULT_OP_TYPES = ("Conv", "MatMul", "Gemm")
ACTIVATIONS = ("symmetric", "asymmetric")
# onnxruntime runs these in int8 between the weighted layers (QLinearSigmoid/Mul/Add, int8 Transpose/Reshape...),
# so a chain conv -> SiLU -> conv needs no DequantizeLinear/QuantizeLinear pair between every op (see chain_plan)
DATA_MOVEMENT = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Concat", "Split", "GlobalAveragePool", "MaxPool")
CHAIN_OP_TYPES = (*DEFAULT_OP_TYPES, "Sigmoid", "Mul", "Add", *DATA_MOVEMENT)


def chain_plan(model) -> tuple[tuple[str, ...], list[str]]:
    """Op types and nodes kept out of int8 for onnxruntime's int8 chains (the ``int8_chains`` form).

    Quantized: weighted layers, data movement, SiLU written as ``x * sigmoid(x)`` (a QLinearSigmoid and a
    QLinearMul instead of a float island with a Q/DQ pair on each side) and residual adds of two activations.
    Kept float: matmuls of two activations (attention scores and values: their int8 form turns the softmax
    between them into QLinearSoftmax, several times slower than the float one), softmax and LayerNorm, any Mul or
    Sigmoid outside the SiLU pattern (GELU's pieces) and any Add with a constant input (biases); and a stem
    Conv (a dense one on at most 4 input channels: the pixels): an int8 im2col of 27-long rows is slower than
    onnxruntime's float kernel and needs the pixels quantized and transposed to NHWC first (xxs@256: QLinearConv
    0.47 ms + QuantizeLinear 0.08 + Transpose 0.05 against a float Conv of 0.21 ms)."""
    inits = {i.name for i in model.graph.initializer}
    consts = inits | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    silu: set[str] = set()
    for n in model.graph.node:
        if n.op_type != "Sigmoid":
            continue
        x, y = n.input[0], n.output[0]
        for m in consumers.get(y, []):
            if m.op_type == "Mul" and set(m.input) == {x, y}:
                silu.update((n.name, m.name))
    weights = {i.name: i for i in model.graph.initializer}
    stem: set[str] = set()
    for n in model.graph.node:
        w = weights.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if w is not None and len(w.dims) == 4 and w.dims[1] <= 4 and group == 1:  # not a depthwise conv
            stem.add(n.name)
    exclude = sorted(stem)
    for n in model.graph.node:
        if n.name in stem:
            continue
        if n.op_type == "MatMul" and not any(i in consts for i in n.input):
            exclude.append(n.name)
        elif n.op_type in ("Sigmoid", "Mul") and n.name not in silu:
            exclude.append(n.name)
        elif n.op_type == "Add" and any(i in consts for i in n.input):
            exclude.append(n.name)
    return CHAIN_OP_TYPES, exclude


def gemm_linears(model) -> int:
    """Rewrite ``MatMul(x, W) + Add(b)`` (a 2-D weight, a 1-D bias: a Linear on tokens exported with a dynamic
    batch) into ``Reshape(x, [-1, K]) -> Gemm(W, b) -> Reshape(x's leading dims + [N])``, in place; returns how many.

    onnxruntime turns a Q/DQ Gemm into one QGemm with an int32 bias; MatMul + Add leaves the bias add in float
    between a DequantizeLinear and a QuantizeLinear, which costs more than the int8 matmul saves on narrow layers."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in (*model.graph.value_info, *model.graph.input) if vi.type.tensor_type.HasField("shape")}
    drop, gone, replace = set(), set(), {}
    for n in model.graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits or len(inits[n.input[1]].dims) != 2:
            continue
        users = consumers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add" or n.output[0] in outputs:
            continue
        add = users[0]
        bias = next((i for i in add.input if i != n.output[0]), None)
        k, m = inits[n.input[1]].dims
        if bias not in inits or list(inits[bias].dims) != [m]:
            continue
        p = f"{n.name}/edgec_gemm"
        x = n.input[0]
        dims = shapes.get(x)
        model.graph.initializer.append(numpy_helper.from_array(np.array([-1, k], np.int64), f"{p}/flat"))
        if dims and len(dims) >= 2 and all(isinstance(d, int) and d > 0 for d in dims[1:-1]):
            # leading dims known but the first (the batch): a constant shape, no Shape/Slice/Concat at run time
            model.graph.initializer.append(numpy_helper.from_array(np.array([-1, *dims[1:-1], m], np.int64),
                                                                   f"{p}/out_shape"))
            shape_nodes = []
        else:
            model.graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), f"{p}/zero"),
                                            numpy_helper.from_array(np.array([-1], np.int64), f"{p}/last"),
                                            numpy_helper.from_array(np.array([m], np.int64), f"{p}/width")])
            shape_nodes = [
                helper.make_node("Shape", [x], [f"{p}/shape"], name=f"{p}/shape"),
                helper.make_node("Slice", [f"{p}/shape", f"{p}/zero", f"{p}/last"], [f"{p}/lead"], name=f"{p}/lead"),
                helper.make_node("Concat", [f"{p}/lead", f"{p}/width"], [f"{p}/out_shape"], name=f"{p}/out_shape",
                                 axis=0)]
        replace[n.name] = [
            *shape_nodes,
            helper.make_node("Reshape", [x, f"{p}/flat"], [f"{p}/x2d"], name=f"{p}/x2d"),
            helper.make_node("Gemm", [f"{p}/x2d", n.input[1], bias], [f"{p}/y2d"], name=n.name),  # keeps the layer's name
            helper.make_node("Reshape", [f"{p}/y2d", f"{p}/out_shape"], [add.output[0]], name=f"{p}/y"),
        ]
        drop.add(add.name)
        gone.add(n.output[0])
    if not replace:
        return 0
    kept_info = [vi for vi in model.graph.value_info if vi.name not in gone]  # the MatMul outputs no longer exist
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept_info)
    nodes = []
    for n in model.graph.node:
        if n.name in drop:
            continue
        nodes.extend(replace.get(n.name, [n]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(replace)


def _concrete_shapes(model, names: list[str]) -> dict[str, list[int]]:
    """The shapes of tensors ``names`` in one run of ``model`` on zeros, dynamic dimensions set to 1."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in dict.fromkeys(names) if n not in have)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    dtypes = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}
    feeds = {}
    for i in sess.get_inputs():
        if i.type not in dtypes:
            return {}
        feeds[i.name] = np.zeros([d if isinstance(d, int) else 1 for d in i.shape], dtypes[i.type])
    names = list(dict.fromkeys(names))
    return {n: list(v.shape) for n, v in zip(names, sess.run(names, feeds))}


def _prune_dead(graph) -> None:
    """Drop nodes none of whose outputs is read (the shape arithmetic of replaced Reshapes)."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        kept = [n for n in graph.node if any(o in read for o in n.output)]
        if len(kept) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(kept)


def patch_transposes(model) -> int:
    """Rewrite MobileViT's unfold and fold (feature map <-> patch tokens) into transposes onnxruntime runs fast, in
    place; the outputs are bit-identical. Returns how many were rewritten.

    timm writes the unfold ``[B, C, H, W] -> [B*P, N, C]`` as Reshape, Transpose(0,2,1,3), Reshape,
    Transpose(0,3,2,1), Reshape; both transposes move runs of 2 elements (the patch width), and onnxruntime's
    generic transpose costs about 3 ns per element there (xxs@256: 0.2 ms per transpose at 32x32x64, u8 or float).
    Here the unfold is NCHW -> NHWC (a single-axis move onnxruntime does with its fast kernel, and in an int8 model
    the NHWC QLinearConv before it already produced NHWC: the two cancel), then a 6-D transpose that moves whole
    channel vectors ``[B, nh, ph, nw, pw, C] -> [B, ph, pw, nh, nw, C]``; the fold is the reverse. The Reshape
    between the two transposes takes its batch from a Shape at run time: onnxruntime's transpose optimiser pushes a
    Transpose through a Reshape with a constant shape and would merge the two fast transposes back into one slow
    one."""
    from onnx import helper, numpy_helper

    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def perm(n):
        return next((list(a.ints) for a in n.attribute if a.name == "perm"), None)

    def only(tensor, op):
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op and tensor not in outputs else None

    chains = []
    for n in g.node:
        if n.op_type != "Reshape":
            continue
        t1 = only(n.output[0], "Transpose")
        r2 = t1 and only(t1.output[0], "Reshape")
        t2 = r2 and only(r2.output[0], "Transpose")
        r3 = t2 and only(t2.output[0], "Reshape")
        if r3 and perm(t1) == [0, 2, 1, 3] and perm(t2) == [0, 3, 2, 1]:
            chains.append(("unfold", (n, t1, r2, t2, r3)))
        elif r3 and perm(t1) == [0, 3, 2, 1] and perm(t2) == [0, 2, 1, 3]:
            chains.append(("fold", (n, t1, r2, t2, r3)))
    if not chains:
        return 0
    shapes = _concrete_shapes(model, [t for _, ch in chains for t in (ch[0].input[0], *(x.output[0] for x in ch))])
    if not shapes:
        return 0
    replace, drop = {}, set()
    for kind, (r1, t1, r2, t2, r3) in chains:
        x = r1.input[0]
        sx, s1, s2, s3 = (shapes[t] for t in (x, r1.output[0], r2.output[0], r3.output[0]))
        if kind == "unfold":  # [1, C, H, W] -> [C*nh, ph, nw, pw] -> [1, C, N, P] -> [P, N, C] at batch 1
            if len(sx) != 4 or sx[0] != 1 or len(s1) != 4:
                continue
            _, c, h, w = sx
            rows, ph, nw, pw = s1
            if not ph or not pw or h % ph or rows * ph != c * h or nw * pw != w:
                continue
            nh = h // ph
            if s2 != [1, c, nh * nw, ph * pw] or s3 != [ph * pw, nh * nw, c]:
                continue
        else:  # [P, N, C] -> [1, P, N, C] -> [1, C, N, P] -> [C*nh, nw, ph, pw] -> [1, C, H, W]
            if len(sx) != 3 or len(s3) != 4 or len(s2) != 4:
                continue
            p_, n_, c = sx
            rows, nw, ph, pw = s2
            _, _, h, w = s3
            if not ph or ph * pw != p_ or h % ph or s1 != [1, p_, n_, c] or s3[:2] != [1, c] or nw * pw != w:
                continue
            nh = h // ph
            if rows != c * nh or nh * nw != n_:
                continue
        p = f"{r1.name}/edgec_{kind}"
        inits, nodes = [], []

        def const(name, value, _p=p, _inits=inits):
            _inits.append(numpy_helper.from_array(np.array(value, np.int64), f"{_p}/{name}"))
            return f"{_p}/{name}"

        def batch_and(src, tail, name, _p=p, _nodes=nodes):
            _nodes.extend([
                helper.make_node("Shape", [src], [f"{_p}/{name}/shape"], name=f"{_p}/{name}/shape"),
                helper.make_node("Slice", [f"{_p}/{name}/shape", const(f"{name}/0", [0]), const(f"{name}/1", [1])],
                                 [f"{_p}/{name}/batch"], name=f"{_p}/{name}/batch"),
                helper.make_node("Concat", [f"{_p}/{name}/batch", const(f"{name}/tail", tail)], [f"{_p}/{name}"],
                                 name=f"{_p}/{name}", axis=0)])
            return f"{_p}/{name}"

        if kind == "unfold":
            nodes.append(helper.make_node("Transpose", [x], [f"{p}/nhwc"], name=f"{p}/nhwc", perm=[0, 2, 3, 1]))
            six = batch_and(f"{p}/nhwc", [nh, ph, nw, pw, c], "six_shape")
            nodes += [helper.make_node("Reshape", [f"{p}/nhwc", six], [f"{p}/six"], name=f"{p}/six"),
                      helper.make_node("Transpose", [f"{p}/six"], [f"{p}/patches"], name=f"{p}/patches",
                                       perm=[0, 2, 4, 1, 3, 5]),
                      helper.make_node("Reshape", [f"{p}/patches", const("tokens_shape", [-1, nh * nw, c])],
                                       [r3.output[0]], name=f"{p}/tokens")]
        else:
            nodes += [helper.make_node("Reshape", [x, const("six_shape", [-1, ph, pw, nh, nw, c])], [f"{p}/six"],
                                       name=f"{p}/six"),
                      helper.make_node("Transpose", [f"{p}/six"], [f"{p}/rows"], name=f"{p}/rows",
                                       perm=[0, 3, 1, 4, 2, 5])]
            nhwc = batch_and(f"{p}/rows", [h, w, c], "nhwc_shape")
            nodes += [helper.make_node("Reshape", [f"{p}/rows", nhwc], [f"{p}/nhwc"], name=f"{p}/nhwc"),
                      helper.make_node("Transpose", [f"{p}/nhwc"], [r3.output[0]], name=f"{p}/nchw", perm=[0, 3, 1, 2])]
        g.initializer.extend(inits)
        replace[r1.name] = nodes
        drop.update(m.name for m in (t1, r2, t2, r3))
    if not replace:
        return 0
    gone = {o for n in g.node if n.name in drop or n.name in replace for o in n.output}
    kept_info = [vi for vi in g.value_info if vi.name not in gone]  # the old intermediates and their shapes
    del g.value_info[:]
    g.value_info.extend(kept_info)
    nodes = []
    for n in g.node:
        if n.name not in drop:
            nodes.extend(replace.get(n.name, [n]))
    del g.node[:]
    g.node.extend(nodes)
    _prune_dead(g)
    return len(replace)


@dataclass
class QuantizedOnnx:
    path: Path
    amax: dict[str, float]
    trt_cache: str | None  # TensorRT's calibration cache; None for asymmetric activations (TensorRT takes symmetric only)
    quantized_nodes: int
    qdq_pairs: int


def _float_tensors(model) -> list[str]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    names = [vi.name for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
             if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    inits = {i.name for i in model.graph.initializer}
    return [n for n in dict.fromkeys(names) if n not in inits]


class QdqQuantizer:
    """One fp32 ONNX model, its activation ranges measured once; :meth:`quantize` then writes Q/DQ
    models with any set of nodes kept in float (sensitivity and fallback quantize many times)."""

    def __init__(self, fp32: Path, calib: CalibrationSet, *, method: str = "minmax", percentile: float = 99.999,
                 op_types: tuple[str, ...] = DEFAULT_OP_TYPES, batch_size: int = 16, trt_version: int = 100300,
                 activations: str = "symmetric", reduce_range: bool = False, int8_chains: bool = False) -> None:
        if activations not in ACTIVATIONS:
            raise InputError(f"unknown activation form {activations!r}", hint=f"one of {', '.join(ACTIVATIONS)}")
        self.activations = activations
        self.reduce_range = reduce_range  # 7-bit weights: exact in onnxruntime's x86 kernels without VNNI (runtime/isa.py)
        self.int8_chains = int8_chains  # onnxruntime only: int8 through activations and data movement (chain_plan)
        onnx = require_module("onnx", install="onnx", purpose="ONNX quantization")
        ort = require_module("onnxruntime", install="onnxruntime", purpose="ONNX quantization")
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self.fp32, self.op_types, self.trt_version = Path(fp32), tuple(op_types), trt_version
        with tempfile.TemporaryDirectory(prefix="edgec-qdq-") as tmp:
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            self.model_bytes = pre.read_bytes()
            if int8_chains:  # unfold/fold as fast transposes; token Linears as one QGemm each (int32 bias)
                model = onnx.load_from_string(self.model_bytes)  # instead of QLinearMatMul + a float Add
                patched = patch_transposes(model)
                if patched:  # the tokens' shapes are now known but the batch: gemm_linears reshapes with constants
                    model = onnx.shape_inference.infer_shapes(model)
                if gemm_linears(model) + patched:
                    self.model_bytes = model.SerializeToString()
            model = onnx.load_from_string(self.model_bytes)
            augmented = onnx.load_from_string(self.model_bytes)
            existing = {o.name for o in augmented.graph.output}
            for name in _float_tensors(model):
                if name not in existing:
                    augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            sess = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs = [o.name for o in sess.get_outputs()]
        input_name = sess.get_inputs()[0].name
        fixed = sess.get_inputs()[0].shape[0]
        if isinstance(fixed, int):  # a static batch dimension takes exactly that many images per run
            batch_size = fixed

        def run_all(batch: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(outputs, sess.run(outputs, {input_name: batch})))

        self.always_float: list[str] = []
        if int8_chains:
            self.op_types, self.always_float = chain_plan(model)
        self.collector = collect_ranges(run_all, lambda: calib.batches(batch_size=batch_size))
        self.amax = self.collector.amax(method, percentile)
        self.bounds = self.collector.bounds(method, percentile)
        # quantizable nodes in execution order, with their weight sizes (what keeping them in float costs); with
        # int8 chains the activations and residual adds are layers too: the fallback can keep them float where
        # the error lives (data movement only carries an int8 tensor along and is not a layer)
        inits = {i.name: i for i in model.graph.initializer}
        layer_types = set(op_types) | ({"Sigmoid", "Mul", "Add"} & set(self.op_types) if int8_chains else set())
        self.layers: list[dict] = []
        for node in model.graph.node:
            if node.op_type in layer_types and node.name not in self.always_float:
                params = sum(int(np.prod(inits[i].dims)) for i in node.input if i in inits)
                self.layers.append({"name": node.name, "op": node.op_type, "params": params})

    def quantize(self, out: Path, *, exclude_nodes: tuple[str, ...] | frozenset[str] = (),
                 only: tuple[str, ...] | frozenset[str] | None = None) -> QuantizedOnnx:
        """Write the Q/DQ model to ``out``; ``exclude_nodes`` stay float, or with ``only`` just those are int8."""
        import onnx
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
        from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

        names = [la["name"] for la in self.layers]
        if only is not None:
            exclude_nodes = tuple(n for n in names if n not in set(only))
        exclude_nodes = (*exclude_nodes, *self.always_float)
        model = onnx.load_from_string(self.model_bytes)
        symmetric = self.activations == "symmetric"
        if symmetric:
            data = {n: TensorData(lowest=np.float32(-a), highest=np.float32(a)) for n, a in self.amax.items()}
        else:
            data = {n: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for n, (lo, hi) in self.bounds.items()}
        quantizer = QDQQuantizer(model, True, self.reduce_range, QuantType.QInt8, QuantType.QInt8 if symmetric else QuantType.QUInt8,
                                 TensorsData(CalibrationMethod.MinMax, data), None, list(exclude_nodes) or None,
                                 list(self.op_types), {"ActivationSymmetric": symmetric, "WeightSymmetric": True})
        quantizer.quantize_model()
        quantizer.model.save_model_to_file(str(out), False)
        q = onnx.load(str(out))
        ops = [n.op_type for n in q.graph.node]
        if "QuantizeLinear" not in ops:
            raise InputError(f"quantization of {self.fp32.name} produced no Q/DQ nodes",
                             hint="the model has no Conv/MatMul/Gemm to quantize, or every one is kept in float")
        n_quant = sum(1 for n in names if n not in set(exclude_nodes))
        cache = tensorrt_cache(self.amax, trt_version=self.trt_version) if symmetric else None
        return QuantizedOnnx(Path(out), self.amax, cache, n_quant, ops.count("QuantizeLinear"))


def quantize_onnx(fp32: Path, out: Path, calib: CalibrationSet, *, method: str = "minmax", percentile: float = 99.999,
                  op_types: tuple[str, ...] = DEFAULT_OP_TYPES, exclude_nodes: tuple[str, ...] = (),
                  batch_size: int = 16, trt_version: int = 100300, activations: str = "symmetric",
                  reduce_range: bool = False, int8_chains: bool = False) -> QuantizedOnnx:
    return QdqQuantizer(fp32, calib, method=method, percentile=percentile, op_types=op_types, batch_size=batch_size,
                        trt_version=trt_version, activations=activations,
                        reduce_range=reduce_range, int8_chains=int8_chains).quantize(out, exclude_nodes=exclude_nodes)
