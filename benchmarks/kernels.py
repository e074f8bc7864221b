"""Benchmark of the last-layer gradient Mahalanobis scoring paths (issue 5).

Measures, in one run and on one device, samples/s of a per-sample autograd loop, torch.func
vmap(grad), the closed-form torch path, the fused Triton kernel and the CUDA C kernel (each where
it can run) at B=1024, C=9, D=512 (K = 9*513) for each precision variant; the ratio of each to
closed_form; each one's largest relative score error against float64; and end to end, a ResNet-18
backbone alone vs backbone + scoring + decision. Writes result.json into --out.

Counting, the same for every implementation so the columns compare: TFLOP/s credits the dense
quadratic form's 2 K^2 flops per sample; GB/s credits the compulsory bytes of one batch (P, or
for whitened variants its Cholesky factor, once in its stored type; features, probs, labels,
scores). `--smoke` runs tiny sizes on the CPU.

    python benchmarks/kernels.py --out benchmarks/results/kernels-h100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the `kernels` package.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from calibration.gaussian import TiedGaussian, fit_tied_gaussian  # noqa: E402
from calibration.moments import ClassMoments  # noqa: E402
from edge_runtime.config import DetectorConfig  # noqa: E402
from edge_runtime.detectors.base import Observations  # noqa: E402
from edge_runtime.detectors.grad_mahalanobis import GradientMahalanobis  # noqa: E402
from edge_runtime.models.base import FrozenClassifier  # noqa: E402
from edge_runtime.models.resnet import CifarResNet  # noqa: E402
from edge_runtime.models.small_cnn import small_cnn  # noqa: E402
from edge_runtime.results import format_table, metric_key, write_result  # noqa: E402
from kernels.cuda_build import cuda_precision_refusal  # noqa: E402
from kernels.dispatch import score_last_layer, unavailable_reason  # noqa: E402
from kernels.reference import (  # noqa: E402
    PRECISION_VARIANTS,
    LastLayerStats,
    closed_form_scores,
    last_layer_gradients,
    last_layer_scores,
    mahalanobis_scores,
    prepare_last_layer_stats,
)

IMPLEMENTATIONS = ("loop", "torch_func", "closed_form", "triton_fused", "cuda_fused")
AUTOGRAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Sizes:
    batch: int
    classes: int
    features: int
    calibration: int
    loop_samples: int
    end_to_end_batch: int
    repeats: int

    @property
    def dim(self) -> int:
        return self.classes * (self.features + 1)


FULL = Sizes(batch=1024, classes=9, features=512, calibration=8192, loop_samples=64, end_to_end_batch=256, repeats=20)
SMOKE = Sizes(batch=16, classes=3, features=8, calibration=96, loop_samples=4, end_to_end_batch=8, repeats=2)


@dataclass
class Case:
    """One scoring workload: a final layer, a batch through it, a Gaussian fitted on calibration gradients."""

    layer: nn.Linear
    features: torch.Tensor
    probs: torch.Tensor
    labels: torch.Tensor
    means: torch.Tensor
    precision: torch.Tensor
    reference: torch.Tensor


def fitted_gaussian(layer: nn.Linear, count: int, generator: torch.Generator,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(means, precision) of last-layer gradients of `count` post-ReLU feature vectors, predicted labels, OAS."""
    features = torch.randn(count, layer.in_features, generator=generator).relu().to(device)
    with torch.no_grad():
        probs = layer(features).double().softmax(dim=1)
    labels = probs.argmax(dim=1)
    moments = ClassMoments(layer.out_features, layer.out_features * (layer.in_features + 1), device,
                           fourth_moments=False)
    for start in range(0, count, 1024):
        part = slice(start, start + 1024)
        moments.update(last_layer_gradients(features[part].double(), probs[part], labels[part]), labels[part])
    gaussian = fit_tied_gaussian(moments, "oas", 1e-3)
    return gaussian.means, gaussian.precision


def make_case(sizes: Sizes, device: torch.device, seed: int = 0) -> Case:
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(sizes.features, sizes.classes)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(sizes.classes, sizes.features, generator=generator) * 3 / sizes.features ** 0.5)
        layer.bias.zero_()
    layer = layer.to(device)
    means, precision = fitted_gaussian(layer, sizes.calibration, generator, device)
    features = torch.randn(sizes.batch, sizes.features, generator=generator).relu().to(device)
    with torch.no_grad():
        probs = layer(features).softmax(dim=1)
    labels = probs.argmax(dim=1)
    reference = last_layer_scores(features.double(), probs.double(), labels, means.double(), precision.double())
    return Case(layer, features, probs, labels, means, precision, reference)


def loop_scores(case: Case, means: torch.Tensor, precision: torch.Tensor, count: int) -> torch.Tensor:
    """One autograd backward per sample: what a generic per-sample-gradient implementation does."""
    dtype = precision.dtype
    layer = nn.Linear(case.layer.in_features, case.layer.out_features).to(case.features.device, dtype)
    layer.load_state_dict(case.layer.state_dict())
    features = case.features[:count].to(dtype)
    gradients = []
    for i in range(count):
        loss = F.cross_entropy(layer(features[i : i + 1]), case.labels[i : i + 1])
        weight_grad, bias_grad = torch.autograd.grad(loss, (layer.weight, layer.bias))
        gradients.append(torch.cat([weight_grad, bias_grad[:, None]], dim=1).flatten())
    return mahalanobis_scores(torch.stack(gradients), means, case.labels[:count], precision)


def torch_func_scores(case: Case, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """torch.func: vmap over samples of grad of the per-sample loss."""
    dtype = precision.dtype
    params = {name: p.detach().to(dtype) for name, p in case.layer.named_parameters()}

    def loss(p: dict[str, torch.Tensor], a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(case.layer, p, (a[None],)), y[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, case.features.to(dtype), case.labels)
    gradients = torch.cat([grads["weight"], grads["bias"][:, :, None]], dim=2).flatten(1)
    return mahalanobis_scores(gradients, means, case.labels, precision)


def implementations(case: Case, stats: LastLayerStats, variant: str,
                    sizes: Sizes) -> dict[str, tuple[Callable[[], torch.Tensor], int] | str]:
    """name -> (call, samples per call), or the reason it cannot run here."""
    device = case.features.device
    found: dict[str, tuple[Callable[[], torch.Tensor], int] | str] = {}
    dtype = AUTOGRAD_DTYPES.get(variant)
    if dtype is None:
        found["loop"] = found["torch_func"] = f"autograd baselines run in plain dtypes, not {variant}"
    else:
        means, precision = case.means.to(dtype), case.precision.to(dtype)
        found["loop"] = (lambda: loop_scores(case, means, precision, sizes.loop_samples), sizes.loop_samples)
        found["torch_func"] = (lambda: torch_func_scores(case, means, precision), sizes.batch)
    found["closed_form"] = (lambda: closed_form_scores(case.features, case.probs, case.labels, stats), sizes.batch)
    for name in ("triton_fused", "cuda_fused"):
        reason = unavailable_reason(name, device)
        if name == "cuda_fused" and reason is None:
            reason = cuda_precision_refusal(variant)
        found[name] = reason or (
            lambda name=name: score_last_layer(case.features, case.probs, case.labels, stats, impl=name)[0],
            sizes.batch)
    return found


def seconds_per_call(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of one call after two warm-up calls (CUDA events on a GPU)."""
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            call()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def compulsory_bytes(sizes: Sizes, variant: str) -> int:
    spec = PRECISION_VARIANTS[variant]
    element = torch.tensor([], dtype=spec.dtype).element_size()
    return sizes.dim ** 2 * element * spec.parts + sizes.batch * ((sizes.features + sizes.classes) * 4 + 8 + 4)


def bench_scoring(sizes: Sizes, variants: list[str], device: torch.device) -> tuple[dict[str, float], list[list]]:
    case = make_case(sizes, device)
    tag = f"b{sizes.batch}_k{sizes.dim}"
    metrics: dict[str, float] = {}
    rows: list[list] = []
    for variant in variants:
        stats = prepare_last_layer_stats(case.means, case.precision, variant)
        rates: dict[str, float] = {}
        for name, found in implementations(case, stats, variant, sizes).items():
            if isinstance(found, str):
                rows.append([name, variant, "-", "-", "-", "-", "-", found])
                continue
            call, samples = found
            error = ((call().double() - case.reference[:samples]).abs() / case.reference[:samples].abs()).max()
            rate = samples / seconds_per_call(call, device, sizes.repeats)
            rates[name] = rate
            tflops = 2 * sizes.dim ** 2 * rate / 1e12
            gb_per_s = compulsory_bytes(sizes, variant) / sizes.batch * rate / 1e9
            metrics[metric_key("samples_per_s", name, variant, tag)] = rate
            metrics[metric_key("tflops", name, variant, tag)] = tflops
            metrics[metric_key("gb_per_s", name, variant, tag)] = gb_per_s
            metrics[metric_key("max_rel_error", name, variant, tag)] = float(error)
            rows.append([name, variant, f"{rate:,.0f}", f"{tflops:.2f}", f"{gb_per_s:.1f}", f"{float(error):.1e}", "", ""])
        for row in rows:
            if row[1] == variant and row[0] in rates and "closed_form" in rates:
                ratio = rates[row[0]] / rates["closed_form"]
                metrics[metric_key("speedup", row[0], variant, tag)] = ratio
                row[6] = f"{ratio:.2f}x"
    return metrics, rows


def backbone(smoke: bool, device: torch.device) -> tuple[FrozenClassifier, tuple[int, ...]]:
    """A CIFAR ResNet-18 for 9 classes on 32x32 RGB (a small CNN on 8x8 grey in smoke mode), untrained: timing only."""
    if smoke:
        network: nn.Module = small_cnn(3, 1, 8, (0.5,), (0.25,))
        shape = (1, 8, 8)
    else:
        network = CifarResNet("resnet18", 9, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        shape = (3, 32, 32)
    return FrozenClassifier(network.to(device).eval(), "fc"), shape


def bench_end_to_end(sizes: Sizes, variants: list[str], device: torch.device, smoke: bool) -> dict[str, float]:
    """Backbone alone vs backbone + the gradient Mahalanobis detector's scores + routing, bf16 autocast on a GPU."""
    classifier, shape = backbone(smoke, device)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(sizes.end_to_end_batch, *shape, generator=generator).to(device)
    if device.type == "cuda":
        classifier = classifier.to(memory_format=torch.channels_last)
        images = images.to(memory_format=torch.channels_last)
    means, precision = fitted_gaussian(classifier.final_linear, sizes.calibration, generator, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def embed() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), autocast:
            return classifier.embed(images)

    tag = f"b{sizes.end_to_end_batch}"
    alone = sizes.end_to_end_batch / seconds_per_call(embed, device, sizes.repeats)
    metrics = {metric_key("samples_per_s", "backbone", "bf16", tag): alone}
    gaussian = TiedGaussian(means.float(), precision.float(), "oas").state_dict()
    for variant in variants:
        detector = GradientMahalanobis(classifier, DetectorConfig(kernel_precision=variant))
        detector.load_state_dict({"site": "last_linear", "gaussian": gaussian})

        def decide(detector: GradientMahalanobis = detector) -> torch.Tensor:
            """What the runtime does per batch: embed, score through the detector, route."""
            features, logits = embed()
            scores = detector.score(Observations(None, features, logits))
            return torch.where(scores > 1e3, classifier.num_classes, logits.argmax(dim=1))

        rate = sizes.end_to_end_batch / seconds_per_call(decide, device, sizes.repeats)
        metrics[metric_key("samples_per_s", "end_to_end", variant, tag)] = rate
        metrics[metric_key("end_to_end_fraction", variant, tag)] = rate / alone
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for result.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16", "bf16x3", "fp16w", "bf16w"],
                        choices=sorted(PRECISION_VARIANTS))
    parser.add_argument("--repeats", type=int, help="timed calls per measurement (median reported)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    sizes = SMOKE if args.smoke else FULL
    if args.repeats:
        sizes = replace(sizes, repeats=args.repeats)
    metrics, rows = bench_scoring(sizes, args.variants, device)
    print(format_table(rows, ["impl", "variant", "samples/s", "TFLOP/s", "GB/s", "max rel err", "vs closed_form",
                              "skipped because"]))
    end_to_end = bench_end_to_end(sizes, args.variants, device, args.smoke)
    for name, value in end_to_end.items():
        print(f"{name}: {value:,.3f}")
    config = {"batch": sizes.batch, "classes": sizes.classes, "features": sizes.features, "k": sizes.dim,
              "calibration_samples": sizes.calibration, "loop_samples": sizes.loop_samples,
              "end_to_end_batch": sizes.end_to_end_batch, "repeats": sizes.repeats, "variants": args.variants,
              "smoke": args.smoke, "triton_dot_precision_fp32": "tf32x3",
              "torch_matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "torch": torch.__version__,
              "counting": "TFLOP/s = 2*K^2 flops per sample; "
                          "GB/s = P (or its factor) once + features, probs, labels, scores"}
    path = write_result(args.out, config, {**metrics, **end_to_end}, device,
                        command="python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
