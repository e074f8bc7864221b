"""The frozen classifier as one ONNX graph: [0,1] pixels in, (features, logits) out, any batch size.

Features and logits leave the same graph because the novelty score needs both (the last-layer
gradient is (softmax(logits) - onehot) outer [features; 1]); Normalize sits inside the model, so
the deployed graph takes raw [0,1] pixels exactly as `FrozenClassifier.embed` does.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_runtime.atomic import write_bytes_atomic
from edge_runtime.deploy.bundle import INPUT_NAME, OUTPUT_NAMES
from edge_runtime.errors import InputError, StateError
from edge_runtime.models.base import FrozenClassifier

BATCH_AXIS = "batch"
MIN_OPSET = 17
# onnxruntime's fp32 CPU kernels sum convolutions in another order than torch's; on the CIFAR
# ResNet-18 the largest difference seen is ~1e-6 absolute on outputs of order 1-10.
PARITY_RTOL = 1e-4
PARITY_ATOL = 1e-4


class _EmbedGraph(nn.Module):
    """Exposes `embed` as `forward`, the only method an exporter traces."""

    def __init__(self, classifier: FrozenClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier.embed(images)


def export_onnx(classifier: FrozenClassifier, path: str | os.PathLike, input_size: int, in_channels: int,
                opset: int = MIN_OPSET) -> Path:
    """Write the classifier's eval-mode graph with a dynamic batch axis to `path`, atomically.

    Uses torch's TorchScript-based exporter, which needs no onnxscript and works offline. The
    classifier is traced in eval mode (BatchNorm running statistics) and left in the mode it had.
    """
    if opset < MIN_OPSET:
        raise InputError(f"ONNX opset must be >= {MIN_OPSET}, got {opset}")
    import onnx

    was_training = classifier.training
    graph = _EmbedGraph(classifier).eval()
    device = next(classifier.parameters()).device
    example = torch.rand(2, in_channels, input_size, input_size, device=device)
    buffer = io.BytesIO()
    dynamic = {name: {0: BATCH_AXIS} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    try:
        with warnings.catch_warnings():
            # The legacy exporter announces its deprecation on every call; it is chosen on purpose.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic,
                              do_constant_folding=True)
    finally:
        classifier.train(was_training)
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    target = Path(path)
    write_bytes_atomic(target, buffer.getvalue())
    return target


@dataclass(frozen=True)
class ParityReport:
    """How far onnxruntime's outputs lie from torch's on the same images."""

    images: int
    max_abs_features: float
    max_abs_logits: float
    argmax_agreement: float

    def within_tolerance(self, features_scale: float, logits_scale: float) -> bool:
        """True when both errors are within PARITY_ATOL + PARITY_RTOL * (largest magnitude)."""
        return (self.max_abs_features <= PARITY_ATOL + PARITY_RTOL * features_scale
                and self.max_abs_logits <= PARITY_ATOL + PARITY_RTOL * logits_scale)


@torch.no_grad()
def check_onnx_parity(classifier: FrozenClassifier, onnx_path: str | os.PathLike, images: np.ndarray,
                      batch_size: int = 64) -> ParityReport:
    """Run torch and onnxruntime (fp32, CPU) on the same [0,1] NCHW float32 images and compare.

    Raises StateError when the errors exceed PARITY_ATOL + PARITY_RTOL * max |torch output|.
    """
    import onnxruntime

    if images.ndim != 4 or images.dtype != np.float32 or len(images) == 0:
        raise InputError(f"parity images must be non-empty float32 [N, C, H, W], got {images.dtype} {images.shape}")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    classifier = classifier.eval()
    device = next(classifier.parameters()).device
    worst_features = worst_logits = features_scale = logits_scale = 0.0
    agree = 0
    for start in range(0, len(images), batch_size):
        chunk = np.ascontiguousarray(images[start:start + batch_size])
        onnx_features, onnx_logits = session.run(list(OUTPUT_NAMES), {INPUT_NAME: chunk})
        torch_outputs = classifier.embed(torch.from_numpy(chunk).to(device))
        torch_features, torch_logits = (t.float().cpu().numpy() for t in torch_outputs)
        worst_features = max(worst_features, float(np.abs(onnx_features - torch_features).max()))
        worst_logits = max(worst_logits, float(np.abs(onnx_logits - torch_logits).max()))
        features_scale = max(features_scale, float(np.abs(torch_features).max()))
        logits_scale = max(logits_scale, float(np.abs(torch_logits).max()))
        agree += int((onnx_logits.argmax(axis=1) == torch_logits.argmax(axis=1)).sum())
    report = ParityReport(len(images), worst_features, worst_logits, agree / len(images))
    if not report.within_tolerance(features_scale, logits_scale):
        raise StateError(f"{onnx_path} disagrees with torch beyond atol {PARITY_ATOL} + rtol {PARITY_RTOL}: "
                         f"max |diff| features {worst_features:.3g} (scale {features_scale:.3g}), "
                         f"logits {worst_logits:.3g} (scale {logits_scale:.3g})")
    return report
