"""Cleanup before and after the fusions: constant folding, dead nodes, shape inference.

The TorchScript exporter leaves hundreds of Shape/Gather/Unsqueeze/Concat chains and Constant nodes;
folding them first means the fusion rules see the plain Reshape/Transpose/MatMul structure, and shape
inference gives them the ranks and head counts their checks ask about.
"""
from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common


def cleanup(model: ir.Model) -> dict[str, int]:
    """Fold, prune and infer shapes in place; returns node counts before and after."""
    import onnxscript.optimizer

    before = model.graph.num_nodes()
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    try:
        onnxscript.optimizer.optimize(model, onnx_shape_inference=True)
    except Exception:  # onnx's shape inference refuses some models (e.g. >2 GB protos); fold without it
        onnxscript.optimizer.optimize(model, onnx_shape_inference=False)
    prune(model)
    infer_shapes(model)
    return {"nodes_before": before, "nodes_after": model.graph.num_nodes()}


def prune(model: ir.Model) -> None:
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedOpsetsPass()(model)


def infer_shapes(model: ir.Model) -> None:
    try:
        common.ShapeInferencePass()(model)
    except Exception:  # shapes only sharpen the rules' checks; a model without them still converts
        pass


def sort(model: ir.Model) -> None:
    common.TopologicalSortPass()(model)


def upgrade_opset(model: ir.Model, version: int, proto_limit: int = 1_800_000_000) -> ir.Model:
    """The model at default-domain opset `version` (a new object). onnx's own converter knows every
    op's history (ReduceMean's axes moving to an input at 18, say); onnxscript's handles >2 GB models."""
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size < proto_limit:
        import onnx.version_converter

        proto = onnx.version_converter.convert_version(ir.serde.serialize_model(model), version)
        return ir.serde.deserialize_model(proto)
    import onnxscript.version_converter

    onnxscript.version_converter.convert_version(model, version)
    return model
