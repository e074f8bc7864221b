"""Deployment of the frozen parts to targets that cannot carry PyTorch.

Torch side (development machine): `onnx_export` writes the classifier as one ONNX graph and checks
it against torch with onnxruntime; `bundle.export_bundle` packs that graph with what decides
novelty (fitted gradient statistics, or an adapted session's feature heads via `session_export`)
and its threshold; `reference.decide` is the torch decision the runner mirrors.

Target side (torch-free): `tensorrt_engine` builds versioned fp32/fp16/int8 engines (with
`calibration.int8` for INT8) and runs them; `cuda_scorer` runs the project's CUDA C scoring
kernel through pycuda; `runner.DeployRunner` turns frames into labels, novelty flags and scores.
This package's __init__ imports nothing, so the target side stays importable without torch.
"""
