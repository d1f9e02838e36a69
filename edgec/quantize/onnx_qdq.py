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
        group = _attr(n, "group", 1)
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
    linears = [n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    unknown = [x for x in linears if not (shapes.get(x) and all(isinstance(d, int) and d > 0 for d in shapes[x][1:-1]))]
    if unknown:  # shape inference stopped at a runtime-computed Reshape or a contrib op: two runs tell which
        one, two = _concrete_shapes(model, unknown), _concrete_shapes(model, unknown, batch=2)  # dims hold
        for x in unknown:
            if x in one and x in two and len(one[x]) == len(two[x]) >= 2 and one[x][1:-1] == two[x][1:-1]:
                shapes[x] = [None, *one[x][1:]]
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


def _attr(node, name: str, default=None):
    """A node attribute's value (ints as a list), or ``default``."""
    from onnx import helper

    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


def unshare_vectors(model) -> int:
    """Give every node its own copy of a 1-D initializer that several nodes read, in place; returns how many copies.

    The exporter stores equal constants once: with random or zero-initialised BatchNorm, the stem conv's folded bias
    is the same zero vector as a block's, and a LayerNorm's bias the same as a Linear's. The Q/DQ quantizer then
    turns the shared tensor into one int32 bias behind a DequantizeLinear for every reader, the float ones too: the
    float stem conv loses onnxruntime's NCHWc kernel (which needs a constant bias; 0.44 ms instead of 0.21 at
    256 px) and a LayerNorm's bias gets rounded to a matmul's bias scale."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer if len(i.dims) == 1}
    seen: set[str] = set()
    copies = 0
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            if name not in inits:
                continue
            if name in seen:
                copy = f"{name}/edgec_{n.name or n.output[0]}_{k}"
                model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[name]), copy))
                n.input[k] = copy
                copies += 1
            seen.add(name)
    return copies


def _concrete_shapes(model, names: list[str], batch: int = 1) -> dict[str, list[int]]:
    """The shapes of tensors ``names`` in one run of ``model`` on zeros, dynamic dimensions set to ``batch``."""
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
        feeds[i.name] = np.zeros([d if isinstance(d, int) else batch for d in i.shape], dtypes[i.type])
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
        if r3 and _attr(t1, "perm") == [0, 2, 1, 3] and _attr(t2, "perm") == [0, 3, 2, 1]:
            chains.append(("unfold", (n, t1, r2, t2, r3)))
        elif r3 and _attr(t1, "perm") == [0, 3, 2, 1] and _attr(t2, "perm") == [0, 2, 1, 3]:
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


def fuse_attention(model) -> int:
    """timm's Attention as onnxruntime's fused ``com.microsoft`` Attention node, in place; returns how many.

    The exporter writes it out as the qkv Linear (MatMul + Add), Reshape to [B, N, 3, heads, head_dim],
    Transpose(2,0,3,1,4), Split, three Squeezes, ``q * head_dim**-0.5 @ k^T``, Softmax, ``@ v``,
    Transpose(0,2,1,3) and a Reshape to [B, N, C]: about 15 nodes, four of them transposes of 16-24-element runs
    that onnxruntime's generic transpose moves slowly. One Attention node computes the same (to float rounding:
    ~4e-8 on a normalised embedding) with the heads laid out by its own QKV GEMM. Its int8 form, QAttention (uint8
    tokens, int8 weights, float softmax inside), is what :func:`quantize_attention` makes of it."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    producer = {o: n for n in g.node for o in n.output}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def value(name):
        while name in producer and producer[name].op_type == "Identity":  # the exporter's shared-weight aliases
            name = producer[name].input[0]
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            a = next((a for a in consts[name].attribute if a.name == "value"), None)
            return numpy_helper.to_array(a.t) if a is not None else None
        return None

    def src(name, op):
        n = producer.get(name)
        alone = len(consumers.get(name, [])) == 1 and name not in outputs
        return n if n is not None and n.op_type == op and alone else None

    found = []
    for sm in g.node:
        if sm.op_type != "Softmax" or _attr(sm, "axis", -1) not in (-1, 3):
            continue
        users = consumers.get(sm.output[0], [])
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != sm.output[0]:
            continue
        mm2 = users[0]
        t_out = consumers.get(mm2.output[0], [])
        if len(t_out) != 1 or t_out[0].op_type != "Transpose" or list(_attr(t_out[0], "perm")) != [0, 2, 1, 3]:
            continue
        r_out = consumers.get(t_out[0].output[0], [])
        if len(r_out) != 1 or r_out[0].op_type != "Reshape":
            continue
        r_out = r_out[0]
        mm1 = src(sm.input[0], "MatMul")
        if mm1 is None:
            continue
        mul = src(mm1.input[0], "Mul")
        kt = src(mm1.input[1], "Transpose")
        if mul is None or kt is None or list(_attr(kt, "perm")) != [0, 1, 3, 2]:
            continue
        scale = value(mul.input[1])
        if scale is None or scale.size != 1:
            continue
        sq = [src(mul.input[0], "Squeeze"), src(kt.input[0], "Squeeze"), src(mm2.input[1], "Squeeze")]
        if any(s is None for s in sq):
            continue
        split = producer.get(sq[0].input[0])
        if split is None or split.op_type != "Split" or _attr(split, "axis", 0) != 0 or len(split.output) != 3:
            continue
        if [s.input[0] for s in sq] != list(split.output):  # q, k, v in that order, from one Split
            continue
        axes = [value(s.input[1]) if len(s.input) > 1 else np.array(_attr(s, "axes", [0])) for s in sq]
        if any(a is None or list(a.ravel()) != [0] for a in axes):
            continue
        tr = src(split.input[0], "Transpose")
        if tr is None or list(_attr(tr, "perm")) != [2, 0, 3, 1, 4]:
            continue
        r5 = src(tr.input[0], "Reshape")
        add = r5 and src(r5.input[0], "Add")
        if add is None:
            continue
        mm = next((producer[i] for i in add.input if i in producer and producer[i].op_type == "MatMul"), None)
        bias_name = next((i for i in add.input if mm is None or i != mm.output[0]), None)
        if mm is None or len(consumers.get(mm.output[0], [])) != 1:
            continue
        w, b = value(mm.input[1]), value(bias_name)
        if w is None or b is None:
            continue
        found.append(dict(x=mm.input[0], w=w, b=b, scale=float(scale.ravel()[0]), r5=r5, out=r_out, first=mm,
                          drop=[add, r5, tr, split, *sq, mul, kt, mm1, sm, mm2, t_out[0], r_out]))
    if not found:
        return 0
    shapes = _concrete_shapes(model, [f["r5"].output[0] for f in found] + [f["x"] for f in found])
    replace, drop, typed = {}, set(), {}
    for f in found:
        s5, sx = shapes.get(f["r5"].output[0]), shapes.get(f["x"])
        w, b = f["w"], f["b"]
        if s5 is None or sx is None or len(s5) != 5 or len(sx) != 3 or s5[2] != 3 or w.ndim != 2:
            continue
        heads, hd = s5[3], s5[4]
        c = sx[2]
        if w.shape != (c, 3 * heads * hd) or b.shape != (3 * heads * hd,):
            continue
        if abs(f["scale"] - hd ** -0.5) > 1e-6 * hd ** -0.5:  # the Attention node's own scale: 1/sqrt(head_dim)
            continue
        p = f"{f['first'].name}/edgec_attention"
        g.initializer.extend([numpy_helper.from_array(w.astype(np.float32), f"{p}/weight"),
                              numpy_helper.from_array(b.astype(np.float32), f"{p}/bias")])
        replace[f["first"].name] = [helper.make_node("Attention", [f["x"], f"{p}/weight", f"{p}/bias"],
                                                     [f["out"].output[0]], name=p, domain="com.microsoft",
                                                     num_heads=heads)]
        drop.update(n.name for n in f["drop"])
        typed[f["out"].output[0]] = helper.make_tensor_value_info(  # ONNX's shape inference knows no contrib op:
            f["out"].output[0], onnx.TensorProto.FLOAT, ["batch", sx[1], c])  # typed, the graph after it is too
    if not replace:
        return 0
    nodes = []
    for n in g.node:
        if n.name in drop:
            continue
        nodes.extend(replace.get(n.name, [n]))
    del g.node[:]
    g.node.extend(nodes)
    kept_info = [vi for vi in g.value_info if vi.name not in typed]
    del g.value_info[:]
    g.value_info.extend([*kept_info, *typed.values()])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _prune_dead(g)
    _prune_initializers(g)  # the weights now live in the Attention nodes' own copies
    return len(replace)


def _prune_initializers(graph) -> None:
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def quantize_attention(model, bounds: dict[str, tuple[float, float]], *, reduce_range: bool,
                       keep_float=frozenset()) -> int:
    """Each float ``com.microsoft`` Attention (:func:`fuse_attention`) whose input has a measured range becomes
    QuantizeLinear (uint8, asymmetric, as the other activations) + QAttention with per-column symmetric int8 weights
    (7-bit with ``reduce_range``: onnxruntime's u8s8 GEMM without VNNI), in place; returns how many. Nodes named in
    ``keep_float`` stay float.

    Against the Q/DQ form of the same attention (a QGemm for qkv, float attention between DequantizeLinears, the
    head transposes in uint8 and float) this is about 3-6 % of the whole model faster at 256 px (mobilevit_xxs
    10.47 -> 10.13 ms, xs 18.45 -> 17.82 ms, one thread) and closer to float (no requantisation of q, k, v)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.quant_utils import quantize_data

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    replace = {}
    for n in g.node:
        if n.op_type != "Attention" or n.domain != "com.microsoft" or n.name in keep_float or n.input[0] not in bounds:
            continue
        if len(n.input) != 3 or n.input[1] not in inits or n.input[2] not in inits:
            continue
        lo, hi = bounds[n.input[0]]
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        zero_point = int(np.clip(round(-lo / scale), 0, 255))
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        columns = [quantize_data(w[:, j], TensorProto.INT8, True, reduce_range) for j in range(w.shape[1])]
        w_scale = np.array([float(c[1]) for c in columns], np.float32)  # (zero point, scale, values): as the Q/DQ
        wq = np.stack([np.asarray(c[2]).reshape(-1) for c in columns], axis=1).astype(np.int8)  # quantizer's weights
        p = n.name
        g.initializer.extend([
            numpy_helper.from_array(np.array(scale, np.float32), f"{p}/x_scale"),
            numpy_helper.from_array(np.array(zero_point, np.uint8), f"{p}/x_zero_point"),
            numpy_helper.from_array(wq, f"{p}/w_quantized"),
            numpy_helper.from_array(w_scale.astype(np.float32), f"{p}/w_scale"),
            numpy_helper.from_array(np.zeros(w.shape[1], np.int8), f"{p}/w_zero_point")])
        heads = _attr(n, "num_heads")
        replace[n.name] = [
            helper.make_node("QuantizeLinear", [n.input[0], f"{p}/x_scale", f"{p}/x_zero_point"], [f"{p}/x_quantized"],
                             name=f"{p}/x_quantized"),
            helper.make_node("QAttention", [f"{p}/x_quantized", f"{p}/w_quantized", n.input[2], f"{p}/x_scale",
                                            f"{p}/w_scale", "", f"{p}/x_zero_point", f"{p}/w_zero_point"],
                             list(n.output), name=p, domain="com.microsoft", num_heads=heads)]
    if not replace:
        return 0
    nodes = []
    for n in g.node:
        nodes.extend(replace.get(n.name, [n]))
    del g.node[:]
    g.node.extend(nodes)
    _prune_initializers(g)  # the float weights QAttention replaced
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
            src = Path(fp32)
            if int8_chains:  # on the exported graph, before onnxruntime's optimiser rearranges it: unfold/fold as
                model = onnx.load(str(fp32))  # fast transposes, attention as one node (QAttention once quantized)
                if patch_transposes(model) + (fuse_attention(model) if activations == "asymmetric" else 0):
                    src = Path(tmp) / "rewritten.onnx"
                    onnx.save(model, str(src))
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            self.model_bytes = pre.read_bytes()
            if int8_chains:  # token Linears as one QGemm each (int32 bias) instead of QLinearMatMul + a float Add
                model = onnx.load_from_string(self.model_bytes)
                if gemm_linears(model) + unshare_vectors(model):
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
        layer_types = set(op_types) | ({"Sigmoid", "Mul", "Add", "Attention"} if int8_chains else set())
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
        if self.int8_chains and not symmetric:  # the fused attention nodes the Q/DQ quantizer leaves float
            quantize_attention(quantizer.model.model, self.bounds, reduce_range=self.reduce_range,
                               keep_float=frozenset(exclude_nodes))
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
