"""A saved session's novelty decision as a deploy bundle: its classifier and its novel class's head.

An adapted session decides with what it learned from the stream (the cross-fitted feature heads of
memory_pu or sal and their memory-calibrated threshold); a static gradient-Mahalanobis session with its statistics.
Those two are what the torch-free runner can reproduce; any other head is refused by name.
"""

from __future__ import annotations

import os

from edge_runtime.continual.learner import AdaptiveHead, StaticHead
from edge_runtime.deploy.bundle import MODEL_FILE, Bundle, FeatureHeadWeights, export_bundle
from edge_runtime.deploy.onnx_export import export_onnx
from edge_runtime.detectors.binary_head import BinaryHead
from edge_runtime.detectors.feature_head import FeatureHead
from edge_runtime.detectors.self_supervised import CROSS_FITTED_MODES
from edge_runtime.errors import ConfigError, StateError
from edge_runtime.session import Session


def feature_head_weights(head: BinaryHead) -> FeatureHeadWeights:
    """The numpy arrays of one trained feature head (float32, on the host)."""
    network = head.network
    if not isinstance(network, FeatureHead):
        raise ConfigError(f"binary head {head.arch!r} is not a feature head; the runner carries feature heads only")
    first, last = network.layers[0], network.layers[2]
    arrays = [network.mean, network.std, first.weight, first.bias, last.weight, last.bias]
    return FeatureHeadWeights(*(tensor.detach().cpu().float().numpy() for tensor in arrays))


def export_session_bundle(session: Session, out_dir: str | os.PathLike, opset: int) -> Bundle:
    """Write the bundle of `session`'s one novel class into `out_dir`."""
    learner = session.learner
    if len(learner.heads) != 1:
        raise ConfigError(f"a deploy bundle carries one novel class; this session has {len(learner.heads)} "
                          f"({', '.join(learner.novel_classes)})")
    head = learner.heads[0]
    if not head.ready:
        raise StateError(f"novel class {learner.novel_classes[0]!r} has not adapted yet: nothing decides novelty")
    detector_config = session.config.detector
    if session.stat_layers:
        raise ConfigError(f"this session's heads read the statistics of layers {list(session.stat_layers)}; the "
                          f"bundle's graph outputs features and logits only, so the runner could not feed them")
    if isinstance(head, AdaptiveHead) and head.detector.mode in CROSS_FITTED_MODES:
        decision = {"heads": [feature_head_weights(binary) for binary in head.detector.pu_heads]}
    elif isinstance(head, StaticHead) and detector_config.name == "grad_mahalanobis" \
            and detector_config.site == "last_linear":
        decision = {"gaussian": head.detectors[0].gaussian}
    else:
        raise ConfigError(f"detector {detector_config.name!r} (ssl_mode {detector_config.ssl_mode!r}, site "
                          f"{detector_config.site!r}) cannot be exported: the runner decides with cross-fitted feature "
                          f"heads or last_linear grad_mahalanobis statistics")
    model = session.config.model
    onnx_path = export_onnx(session.classifier, os.path.join(out_dir, MODEL_FILE), model.input_size,
                            model.in_channels, opset)
    return export_bundle(out_dir, onnx_path, float(head.threshold), learner.known_classes, model.input_size,
                         model.in_channels, **decision)
