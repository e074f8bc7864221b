"""Torch-free inference: bundle in, (label, novel?, score) per frame out.

For firmware that cannot carry PyTorch. The backbone is an onnxruntime session (CPU) or a
TensorRT engine with pycuda buffers; the novelty score is computed in numpy or by the project's
CUDA C kernel through pycuda; the decision is numpy. Nothing here imports torch.

The decision mirrors the torch session exactly (edge_runtime.deploy.reference.decide): the score
is the squared Mahalanobis distance of the last-layer cross-entropy gradient for the predicted
label or, for a bundle exported from an adapted session, the mean logit of its feature heads
(bundle.decision); an input is novel when score > threshold and then gets the label
`len(classes)` (the '+1' class), otherwise the predicted label.

Tolerance against torch on the same inputs, fp32 onnxruntime backbone and numpy scores (stated
limits, with what tests/test_deploy_onnx.py measured): features and logits within 1e-4 absolute +
1e-4 relative (measured <= 2.4e-6 on digits, ~1e-6 on a CIFAR ResNet-18); scores within
1e-4 * max(score, threshold) (measured 2e-7 of the largest score). Decisions are therefore
identical except for an input whose score lies within that band of the threshold or whose
two largest logits lie within the logits' tolerance of each other; the CUDA
kernel adds at most another 1e-4 * max(score, threshold). Feature-head scores (adapted sessions)
agree with the torch session within 1e-3 absolute + 1e-3 relative (tests/test_deploy_onnx.py,
digits), so decisions differ only for inputs within that band of the threshold. TensorRT
fp16/int8 backbones change features by their own rounding, so their decisions are compared, not
assumed (see `export`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_runtime.deploy.bundle import INPUT_NAME, OUTPUT_NAMES, Bundle, FeatureHeadWeights, load_bundle
from edge_runtime.deploy.tensorrt_engine import TensorRTBackbone, engine_path_for, require
from edge_runtime.errors import ConfigError, InputError

BACKBONES = ("onnxruntime", "tensorrt")
KERNELS = ("numpy", "cuda_fused")

Backbone = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Decisions:
    """Per-input outcome: labels int64 [N] (known class, or the novel label), novel bool [N], scores float32 [N]."""

    labels: np.ndarray
    novel: np.ndarray
    scores: np.ndarray


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in the logits' dtype, shifted by the row maximum for stability."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def last_layer_scores(features: np.ndarray, logits: np.ndarray, labels: np.ndarray, means: np.ndarray,
                      precision: np.ndarray) -> np.ndarray:
    """(g - mu_y)^T P (g - mu_y) with g = (softmax(logits) - onehot(y)) outer [features; 1], float32 [B].

    The numpy twin of kernels.reference.last_layer_scores (same flattening: row-major [C, D+1]).
    """
    batch, num_classes = logits.shape
    if features.ndim != 2 or len(features) != batch or labels.shape != (batch,):
        raise InputError(f"features [B, D], logits [B, C] and labels [B] disagree: {features.shape}, "
                         f"{logits.shape}, {labels.shape}")
    dim = num_classes * (features.shape[1] + 1)
    if means.shape != (num_classes, dim) or precision.shape != (dim, dim):
        raise InputError(f"statistics means {means.shape} / precision {precision.shape} do not fit "
                         f"{num_classes} classes x {features.shape[1] + 1} augmented features (K = {dim})")
    residual = softmax(logits.astype(np.float32, copy=False))
    residual[np.arange(batch), labels] -= 1
    augmented = np.concatenate([features.astype(np.float32, copy=False), np.ones((batch, 1), np.float32)], axis=1)
    centred = (residual[:, :, None] * augmented[:, None, :]).reshape(batch, dim) - means[labels]
    return ((centred @ precision) * centred).sum(axis=1, dtype=np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, shifted by the row maximum for stability."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def feature_head_scores(features: np.ndarray, logits: np.ndarray, heads: tuple[FeatureHeadWeights, ...]) -> np.ndarray:
    """Mean logit of the heads on [features, log-softmax(logits)], float32 [B]: the numpy twin of
    SelfSupervisedDetector's memory_pu score."""
    inputs = np.concatenate([features, log_softmax(logits)], axis=1).astype(np.float32, copy=False)
    outputs = [np.maximum((inputs - head.mean) / head.std @ head.w1.T + head.b1, 0) @ head.w2.T + head.b2
               for head in heads]
    return np.mean(outputs, axis=0)[:, 0].astype(np.float32, copy=False)


def decide(scores: np.ndarray, logits: np.ndarray, threshold: float, novel_label: int) -> Decisions:
    """Novel when score > threshold (label `novel_label`), else the argmax of the logits."""
    novel = scores > threshold
    labels = np.where(novel, novel_label, logits.argmax(axis=1)).astype(np.int64)
    return Decisions(labels, novel, scores.astype(np.float32, copy=False))


class NumpyScorer:
    """Scores on the host; the fallback where no GPU or pycuda exists."""

    name = "numpy"

    def __init__(self, means: np.ndarray, precision: np.ndarray) -> None:
        self.means, self.precision = means, precision

    def __call__(self, features: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return last_layer_scores(features, logits, labels, self.means, self.precision)


class OnnxRuntimeBackbone:
    """The bundle's ONNX graph on onnxruntime's CPU provider (fp32)."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        onnxruntime = require("onnxruntime", "the onnxruntime backbone")
        self._session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, logits = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return features, logits


def prepare_images(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 [N, H, W, C] frames (as loaded or captured) or [0,1] float32 [N, C, H, W] -> float32 NCHW.

    uint8 is divided by 255 in float32, exactly as the torch side's `to_tensor` does.
    """
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise InputError(f"images must be a 4-D numpy array, got {type(images).__name__} "
                         f"{getattr(images, 'shape', '')}")
    if images.dtype == np.uint8:
        if images.shape[1:] != (size, size, channels):
            raise InputError(f"uint8 images must be [N, {size}, {size}, {channels}] (NHWC), got {images.shape}")
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
    if images.dtype == np.float32:
        if images.shape[1:] != (channels, size, size):
            raise InputError(f"float32 images must be [N, {channels}, {size}, {size}] (NCHW), got {images.shape}")
        if not np.isfinite(images).all():
            raise InputError(f"images hold {int((~np.isfinite(images)).sum())} non-finite value(s)")
        return np.ascontiguousarray(images)
    raise InputError(f"images must be uint8 NHWC or float32 NCHW, got {images.dtype}")


class DeployRunner:
    """A bundle wired to a backbone and a scoring kernel, as a device profile chooses them."""

    def __init__(self, bundle: Bundle, backbone: str = "onnxruntime", kernel: str = "numpy",
                 precision: str = "fp32", batch_size: int = 32) -> None:
        if backbone not in BACKBONES:
            raise ConfigError(f"deploy.backbone must be one of {BACKBONES}, got {backbone!r}")
        if kernel not in KERNELS:
            raise ConfigError(f"deploy.kernel must be one of {KERNELS}, got {kernel!r}")
        if batch_size < 1:
            raise ConfigError(f"deploy.batch_size must be positive, got {batch_size}")
        self.bundle = bundle
        self.batch_size = batch_size
        self.backbone = self._open_backbone(backbone, precision)
        # Feature heads are a few small matrix products: numpy runs them, whatever `kernel` says.
        self.scorer = self._open_scorer(kernel) if bundle.means is not None else None

    @classmethod
    def open(cls, path: str | os.PathLike, backbone: str = "onnxruntime", kernel: str = "numpy",
             precision: str = "fp32", batch_size: int = 32) -> DeployRunner:
        """Load and verify the bundle at `path`, then wire it like __init__."""
        return cls(load_bundle(path), backbone, kernel, precision, batch_size)

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features [N, D], logits [N, C]) float32, in chunks of at most batch_size."""
        pixels = prepare_images(images, self.bundle.input_size, self.bundle.in_channels)
        if len(pixels) == 0:
            raise InputError("images is empty")
        parts = [self.backbone(pixels[start:start + self.batch_size]) for start in range(0, len(pixels), self.batch_size)]
        return (np.concatenate([p[0] for p in parts]).astype(np.float32, copy=False),
                np.concatenate([p[1] for p in parts]).astype(np.float32, copy=False))

    def predict(self, images: np.ndarray) -> Decisions:
        """Label, novelty flag and score for each image (uint8 NHWC or [0,1] float32 NCHW)."""
        features, logits = self.embed(images)
        if self.bundle.heads:
            scores = feature_head_scores(features, logits, self.bundle.heads)
            return decide(scores, logits, self.bundle.threshold, self.bundle.novel_label)
        predicted = logits.argmax(axis=1).astype(np.int64)
        scores = np.concatenate([self.scorer(features[start:start + self.batch_size],
                                             logits[start:start + self.batch_size],
                                             predicted[start:start + self.batch_size])
                                 for start in range(0, len(features), self.batch_size)])
        return decide(scores, logits, self.bundle.threshold, self.bundle.novel_label)

    def _open_backbone(self, backbone: str, precision: str) -> Backbone:
        if backbone == "onnxruntime":
            if precision != "fp32":
                raise ConfigError(f"deploy.precision {precision!r} needs backbone 'tensorrt' (onnxruntime runs fp32)")
            return OnnxRuntimeBackbone(self.bundle.model_path)
        engine = TensorRTBackbone(engine_path_for(self.bundle.root, precision), self.bundle.model_sha256)
        if self.batch_size > engine.max_batch:
            raise ConfigError(f"deploy.batch_size {self.batch_size} exceeds the engine's max batch {engine.max_batch}; "
                              f"rebuild the engine or lower the batch size")
        return engine

    def _open_scorer(self, kernel: str) -> Scorer:
        """The gradient-Mahalanobis scorer the profile names."""
        if kernel == "numpy":
            return NumpyScorer(self.bundle.means, self.bundle.precision)
        from edge_runtime.deploy.cuda_scorer import CudaScorer

        return CudaScorer(self.bundle.means, self.bundle.precision)
