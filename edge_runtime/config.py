"""Typed, validated run configuration loaded from YAML.

Every section is a frozen, keyword-only attrs class. One validator, attached to every field,
checks the value against the field's annotation (bool is not an int here; a Literal takes only
its choices) and its bounds, so a section refuses a bad value however it is built. Plain data
from YAML, the command line or a saved file is shaped into sections by `section_from_dict`, which
refuses unknown keys; each refusal is a `ConfigError` naming the key path and what is allowed,
never a silent default. `evolve_config` and `config_to_dict` are the ways to change a section
and to write one out.
"""

from __future__ import annotations

import functools
import operator
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import attrs
import yaml

from edge_runtime.data.catalog import CATALOG
from edge_runtime.errors import ConfigError

DatasetName = Literal["digits", "cifar10", "mnist", "fashion_mnist", "tinyimagenet", "image_folder"]
CorruptionName = Literal["lens_blur", "gaussian_blur", "gaussian_noise", "haze", "rain"]

SectionT = TypeVar("SectionT")

_BOUNDS = {"gt": (operator.gt, "greater than"), "ge": (operator.ge, "greater than or equal to"),
           "lt": (operator.lt, "less than"), "le": (operator.le, "less than or equal to")}
_SCALARS = {bool: "true or false", int: "an integer", float: "a floating-point number", str: "a string"}


class _Refusal(ConfigError):
    """A section refusing a value while it is built; `key` is the field, None for a cross-field check."""

    def __init__(self, problem: str, key: str | None = None):
        super().__init__(f"{key}: {problem}" if key else problem)
        self.problem, self.key = problem, key


def _field(default: Any = attrs.NOTHING, *, factory: Callable[[], Any] | None = None, description: str = "",
           gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None) -> Any:
    """A field whose description and numeric bounds are metadata, read by the one validator and by readers."""
    bounds = {name: bound for name, bound in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if bound is not None}
    return attrs.field(default=default, factory=factory, metadata={"description": description, "bounds": bounds})


def _type_problem(hint: Any, value: Any) -> str | None:
    """Why `value` does not fit the annotation `hint`, or None when it does."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        if any(type(value) is type(choice) and value == choice for choice in args):
            return None
        return f"must be one of {', '.join(map(repr, args))} (got {value!r})"
    if origin in (Union, types.UnionType):
        return None if value is None else _type_problem(_not_none(args), value)
    if origin is tuple:
        if not isinstance(value, tuple):
            return f"must be a list (got {value!r})"
        problems = ((index, _type_problem(args[0], item)) for index, item in enumerate(value))
        return next((f"item {index} {problem}" for index, problem in problems if problem), None)
    if attrs.has(hint):
        return None if isinstance(value, hint) else f"must be a mapping of {hint.__name__} keys (got {value!r})"
    if hint is float:
        fits = isinstance(value, float) or (_is_int(value) and abs(value) <= sys.float_info.max)
    else:
        fits = isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    return None if fits else f"must be {_SCALARS[hint]} (got {value!r})"


def _bound_problem(bounds: dict[str, float], value: Any) -> str | None:
    """Why `value` breaks a bound, or None; NaN breaks every bound, as each comparison with it is False."""
    if value is None:
        return None
    for name, bound in bounds.items():
        compare, words = _BOUNDS[name]
        if not compare(value, bound):
            return f"must be {words} {bound} (got {value!r})"
    return None


def _check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """The validator of every field: its annotation first, then its bounds."""
    hint = _hints(type(instance))[attribute.name]
    problem = _type_problem(hint, value) or _bound_problem(attribute.metadata.get("bounds", {}), value)
    if problem:
        raise _Refusal(problem, key=attribute.name)


def _checked(cls: type, fields: list[attrs.Attribute]) -> list[attrs.Attribute]:
    """attrs field transformer: every field of a section gets `_check`, declared with `_field` or not."""
    return [field.evolve(validator=_check) for field in fields]


# What makes a class a config section: frozen, keyword-only, every field checked by `_check`.
_section = attrs.frozen(kw_only=True, field_transformer=_checked)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The annotations of section `cls` as types (this module's annotations are strings until resolved)."""
    return get_type_hints(cls)


@_section
class NovelConditionConfig:
    """Known classes seen under a new imaging condition (a corruption at a severity) as the novel input type."""

    kind: CorruptionName
    level: int = _field(3, ge=1, le=5, description="severity, 1 (mild) .. 5 (strong)")


@_section
class DataConfig:
    """The in-distribution data set and which of its classes is held out as the novel one."""

    dataset: DatasetName = "digits"
    path: str | None = _field(None, description="tarball, directory or IDX folder; default from the catalog")
    novel_class: str | None = _field(None, description="class held out of training; None keeps every class known")
    calibration_holdout: float = _field(0.1, ge=0.0, lt=1.0, description="fraction of known training images held back")
    limit_per_class: int | None = _field(None, gt=0, description="cap on training images per class (quick runs)")
    novel_condition: NovelConditionConfig | None = _field(
        None, description="make the novel input type a corruption of known images (stream and test) instead of "
        "the held-out class, whose images then take no part")
    cache_dir: str = ".cache/edge_runtime"

    def __attrs_post_init__(self) -> None:
        classes = CATALOG[self.dataset].classes
        if self.novel_class is not None and classes is not None and self.novel_class not in classes:
            raise _Refusal(f"novel_class {self.novel_class!r} is not a class of {self.dataset}; "
                           f"allowed: {', '.join(classes)}")


@_section
class OODSetConfig:
    """A data set used only as novel inputs at evaluation time."""

    dataset: DatasetName
    path: str | None = None
    split: str = "test"
    limit: int | None = _field(None, gt=0)


@_section
class ModelConfig:
    """The frozen classifier's architecture and the input geometry it expects."""

    arch: Literal["small_cnn", "resnet18", "resnet34", "fastnet", "custom"] = "small_cnn"
    input_size: int = _field(8, ge=4, le=512)
    in_channels: Literal[1, 3] = 1
    width: int = _field(32, gt=0, le=1024)
    factory: str | None = _field(None, description="'package.module:function' building a custom nn.Module")
    final_layer: str = _field("fc", description="attribute path of the final nn.Linear inside the model")
    mirror_average: bool = _field(False, description="read every image as the mean of its and its mirror image's "
                                  "outputs: more accurate where mirroring keeps the label, at twice the backbone's cost")
    shift_average: int = _field(0, ge=0, le=8, description="pixels: also read every view moved this far left and "
                                "right (reflect-padded, as the training's shifts), averaging three times the views "
                                "at three times the backbone's cost; 0 reads them where they are")

    def __attrs_post_init__(self) -> None:
        if self.arch == "custom" and not self.factory:
            raise _Refusal("arch 'custom' needs factory: 'package.module:function'")
        if self.factory and self.arch != "custom":
            raise _Refusal("factory is only used with arch 'custom'")
        if self.shift_average >= self.input_size:
            raise _Refusal(f"shift_average {self.shift_average} must be smaller than input_size {self.input_size}")


@_section
class TrainConfig:
    """Recipe for training the frozen (IDD) classifier."""

    epochs: int = _field(20, gt=0, le=10_000)
    batch_size: int = _field(128, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = _field(0.05, gt=0.0)
    momentum: float = _field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = _field(5e-4, ge=0.0)
    label_smoothing: float = _field(0.0, ge=0.0, lt=1.0)
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    flip: bool = True
    translate: int = _field(2, ge=0, le=16)
    amp: bool = True
    ema_decay: float | None = _field(None, gt=0.0, lt=1.0)
    rotation_weight: float = _field(
        0.0, ge=0.0, description="weight of an auxiliary loss: a training-only 4-way head on the penultimate "
        "features predicts which right-angle rotation each image got (Hendrycks et al. 2019); 0 turns it off, "
        "else each step also runs a turned copy of the batch")


@_section
class BinaryHeadConfig:
    """The self-supervised IDD/OOD classifier trained on pseudo-labels (paper defaults)."""

    arch: Literal["paper_cnn", "feature_head"] = "paper_cnn"
    epochs: int = _field(500, gt=0)
    lr: float = _field(2e-4, gt=0.0)
    beta1: float = _field(0.5, ge=0.0, lt=1.0)
    beta2: float = _field(0.999, ge=0.0, lt=1.0)
    pseudo_label_fraction: float = _field(0.25, gt=0.0, le=0.5)
    batch_size: int = _field(64, gt=0, description="mini-batch size of the head's training")
    width: int = _field(32, gt=0, le=1024, description="paper_cnn base channels / feature_head hidden units")
    layer_stats: tuple[str, ...] = _field(
        (), description="feature_head: classifier conv submodules (dotted names) whose per-channel mean and std "
        "join the head's input beside the penultimate features and log-softmax")

    def __attrs_post_init__(self) -> None:
        if self.layer_stats and self.arch != "feature_head":
            raise _Refusal(f"layer_stats feeds a feature_head; arch {self.arch!r} reads pixels")


@_section
class VAEGradientConfig:
    """VAE gradient detector (Kwon et al.): a VAE on known images, per-sample gradients of its
    reconstruction loss as features, and a head that scores them (the paper's noise classifier or ours)."""

    feature: Literal["gradient", "gradient_factors", "reconstruction", "latent"] = _field(
        "gradient", description="gradient = the method; gradient_factors = the first decoder layer's gradient "
        "as its two factors (bias gradient and latent code; the weight gradient is their outer product), "
        "which a Mahalanobis head estimates from far fewer images; reconstruction (error vector) and latent "
        "(KL per dimension) are the paper's activation baselines under the same head")
    site: Literal["first_decoder", "last_decoder"] = _field(
        "first_decoder", description="gradient site: first decoder layer for novel classes, last for novel conditions")
    latent_dim: int = _field(16, gt=0, le=1024)
    width: int = _field(16, gt=0, le=1024, description="channels of the VAE's first conv layer (doubled in the second)")
    decoder_hidden: int = _field(128, gt=0, le=4096, description="units of the first decoder layer (the gradient "
                                 "site); chosen on MNIST one-class validation (held-out training images): mean AUROC "
                                 "rose with it, 0.902 / 0.913 / 0.921 / 0.941 at 16 / 32 / 64 / 128")
    vae_epochs: int = _field(100, gt=0, le=10_000)
    vae_lr: float = _field(1e-3, gt=0.0)
    batch_size: int = _field(64, gt=0)
    holdout_fraction: float = _field(0.2, ge=0.0, lt=1.0, description="known images kept out of the VAE, used to "
                                     "fit the head on features of images the VAE has not memorised")
    head: Literal["noise_classifier", "mahalanobis"] = _field(
        "mahalanobis", description="noise_classifier = the paper's 2-layer classifier, known vs noise-distorted known "
        "images; mahalanobis = squared Mahalanobis distance to the held-out known features (Ledoit-Wolf)")
    noise_std: float = _field(0.3, gt=0.0, le=2.0, description="std of the Gaussian noise that makes stand-in outliers")
    classifier_hidden: int = _field(128, gt=0, le=4096)
    classifier_epochs: int = _field(50, gt=0, le=10_000)
    classifier_lr: float = _field(1e-3, gt=0.0)

    def __attrs_post_init__(self) -> None:
        if self.feature == "gradient_factors" and self.site != "first_decoder":
            raise _Refusal(f"gradient_factors factors the first decoder layer's gradient (a linear layer); "
                           f"site {self.site!r} has no such factors")


@_section
class DROCCConfig:
    """DROCC / DROCC-LF (Goyal et al.): one-class classifier trained against adversarially searched
    negatives in the annulus radius <= ||x~ - x|| <= gamma * radius (DROCC-LF: feature-weighted norm)."""

    radius: float = _field(8.0, gt=0.0, description="annulus inner radius r, in standardised input units")
    gamma: float = _field(2.0, ge=1.0, description="annulus outer radius = gamma * radius")
    mu: float = _field(1.0, ge=0.0, description="weight of the adversarial negatives' loss")
    ce_epochs: int = _field(0, ge=0, description="initial epochs of cross-entropy only, before any adversarial search")
    epochs: int = _field(40, gt=0, le=10_000, description="all epochs, the cross-entropy-only ones included")
    ascent_steps: int = _field(50, gt=0, le=1000)
    ascent_step_size: float = _field(1e-3, gt=0.0)
    projection_interval: int = _field(10, gt=0, description="project onto the annulus every this many ascent steps")
    lr: float = _field(1e-3, gt=0.0)
    batch_size: int = _field(256, gt=0)
    width: int = _field(32, gt=0, le=1024, description="channels of the LeNet's first conv layer / MLP hidden units")
    lf_negatives: int = _field(64, ge=0, description="drocc_lf on images: noise-distorted known images used as the "
                               "few labelled negatives that shape the feature weights")
    noise_std: float = _field(0.3, gt=0.0, le=2.0, description="std of the noise making drocc_lf's stand-in negatives")
    search_batchnorm: Literal["eval", "train"] = _field(
        "eval", description="BatchNorm during the negatives' search and loss: 'eval' = stored statistics, the "
        "per-sample decision deployment makes; 'train' = the adversarial batch's own statistics (updating the "
        "stored ones), as the authors' public trainer runs it")

    def __attrs_post_init__(self) -> None:
        if self.ce_epochs >= self.epochs:
            raise _Refusal(f"ce_epochs ({self.ce_epochs}) must be below epochs ({self.epochs}), or no adversarial "
                           f"epoch runs")


@_section
class RotationConfig:
    """Rotation prediction (Golan & El-Yaniv 2018; Hendrycks et al. 2019): a net learns which of four
    rotations was applied to a known image; images whose rotation it cannot tell are novel."""

    width: int = _field(16, gt=0, le=256, description="FastNet width of the rotation classifier")
    epochs: int = _field(10, gt=0, le=10_000)
    batch_size: int = _field(128, gt=1, description="known images per step (each seen at all four rotations)")
    lr: float = _field(0.1, gt=0.0, description="peak of the one-cycle SGD schedule (Nesterov momentum 0.9)")
    weight_decay: float = _field(5e-4, ge=0.0)
    translate: int = _field(2, ge=0, le=8, description="training augmentation: random shift of up to this many pixels")
    flip: bool = _field(True, description="training augmentation: random left-right mirror")


@_section
class DetectorConfig:
    """Which novelty detector runs and how its IDD statistics are fitted."""

    name: Literal["grad_mahalanobis", "grad_mahalanobis_ssl", "msp", "max_logit", "energy", "feature_mahalanobis",
                  "knn", "react", "vim", "gradnorm", "vae_gradient", "drocc", "drocc_lf", "rotation"] = "grad_mahalanobis"
    site: Literal["last_linear", "penultimate", "last_conv"] = "last_linear"
    projection_dim: int = _field(4096, gt=0, description="random projection size for deep gradient sites")
    shrinkage: Literal["ledoit_wolf", "oas", "ridge"] = "ledoit_wolf"
    ridge: float = _field(1e-3, ge=0.0)
    knn_k: int = _field(50, gt=0)
    react_percentile: float = _field(90.0, gt=0.0, le=100.0, description="react: known activations' percentile "
                                     "the penultimate units are clipped at (the authors' 90)")
    vim_dim: int | None = _field(None, gt=0, description="vim: principal subspace dimensions (default: half the "
                                 "feature width, the authors' rule for features narrower than 768)")
    chunk_size: int = _field(1024, gt=0, description="samples per gradient computation (bounds peak memory)")
    kernel: Literal["auto", "triton_fused", "cuda_fused", "closed_form"] = _field(
        "auto", description="site last_linear: scoring implementation (kernels.dispatch; auto = the best this device runs)")
    kernel_precision: Literal["fp32", "bf16", "fp16", "bf16x3", "fp16x3", "fp16w", "bf16w"] = _field(
        "fp32", description="site last_linear: element type of the stored precision (kernels.reference.PRECISION_VARIANTS)")
    target_fpr: float = _field(0.05, gt=0.0, lt=1.0, description="false alarms allowed on known-IDD data")
    threshold_rule: Literal["fpr", "accuracy"] = _field(
        "fpr", description="memory_pu: 'fpr' = the target_fpr quantile of the memory's scores (a false-alarm "
        "guarantee); 'accuracy' = the threshold maximising the expected single-head accuracy, estimated from "
        "memory and pool (calibration.threshold.threshold_for_accuracy)")
    novel_prior: float | None = _field(
        None, gt=0.0, lt=1.0, description="threshold_rule accuracy: share of novel inputs expected after "
        "deployment (default: 1 / (classes + 1), the new class as frequent as each known one)")
    binary: BinaryHeadConfig = _field(factory=BinaryHeadConfig)
    ssl_mode: Literal["paper", "memory_pu", "sal", "woods"] = _field(
        "memory_pu", description="grad_mahalanobis_ssl: 'paper' = Algorithm 1 as published; 'memory_pu' = rehearsal "
        "memory as known IDD vs the unlabeled stream (positive-unlabeled); 'sal' = SAL's gradient filter picks the "
        "stream's OOD candidates, one cross-fitted round of pu_head learns memory vs them; 'woods' = WOODS: one "
        "cross-fitted round of pu_head flags as much of the stream as it can under a false-alarm constraint "
        "(target_fpr) on the memory")
    pool_size: int = _field(20_000, gt=0, description="stream samples kept for self-supervision (the most recent)")
    pu_rounds: int = _field(3, ge=1, le=20, description="memory_pu: training rounds (1 = memory vs the whole stream)")
    pu_folds: int = _field(4, ge=2, le=20, description="memory_pu: cross-fitting folds; no sample is scored by a head that saw it")
    pu_ranking: Literal["head", "head_and_gradient"] = _field(
        "head", description="memory_pu: how stream samples are ranked as OOD candidates between rounds")
    woods_penalty: float = _field(10.0, gt=0.0, description="woods: the augmented Lagrangian's penalty weight, "
                                  "also the step of its multiplier's per-epoch update")
    pu_extra_rounds: tuple[Literal["sal", "woods"], ...] = _field(
        (), description="memory_pu: peer methods whose one round competes with memory_pu's rounds under the same "
        "label-free criterion (memory-vs-stream separation, out of fold): 'sal' = heads on SAL's candidates, "
        "'woods' = WOODS's constrained heads on the whole stream")
    pu_head: BinaryHeadConfig = _field(
        factory=lambda: BinaryHeadConfig(arch="feature_head", epochs=30, lr=1e-3, beta1=0.9),
        description="memory_pu: recipe of the memory-vs-stream head (the paper's recipe stays in 'binary')")
    vae: VAEGradientConfig = _field(factory=VAEGradientConfig)
    drocc: DROCCConfig = _field(factory=DROCCConfig)
    rotation: RotationConfig = _field(factory=RotationConfig)

    def __attrs_post_init__(self) -> None:
        if "woods" in self.ssl_methods() and self.pu_head.arch != "feature_head":
            raise _Refusal(f"WOODS (ssl_mode 'woods' or pu_extra_rounds 'woods') trains its constrained objective on "
                           f"a feature_head; pu_head.arch is {self.pu_head.arch!r}")

    def ssl_methods(self) -> frozenset[str]:
        """The self-supervised methods grad_mahalanobis_ssl runs: its ssl_mode, and under memory_pu the peers
        of pu_extra_rounds."""
        return frozenset({self.ssl_mode, *(self.pu_extra_rounds if self.ssl_mode == "memory_pu" else ())})


@_section
class MemoryConfig:
    """Rehearsal memory of known-IDD samples under a hard budget."""

    budget: int = _field(500, gt=0)
    policy: Literal["reservoir", "class_balanced", "herding"] = _field(
        "class_balanced", description="herding: class-balanced shares chosen by herding on the classifier's features")


@_section
class StreamConfig:
    """The unlabeled adaptation stream: novel samples plus known ones not in the memory."""

    novel_samples: int = _field(2500, gt=0)
    known_samples: int | None = _field(None, ge=0, description="default: the memory budget")
    batch_size: int = _field(200, gt=0)


@_section
class DeployConfig:
    """How the frozen parts run on a target (a device profile): backbone engine, precision, batch, scoring kernel."""

    backbone: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    batch_size: int = _field(32, gt=0, le=4096, description="largest batch the runner and the TensorRT engine take")
    kernel: Literal["numpy", "cuda_fused"] = _field("numpy", description="where the novelty score is computed")
    opset: int = _field(17, ge=17, le=23, description="ONNX opset of the exported classifier graph")
    calibration_images: int = _field(512, gt=0, description="int8: held-back known images fed to the entropy calibrator")
    workspace_mib: int = _field(1024, gt=0, description="TensorRT builder workspace")

    def __attrs_post_init__(self) -> None:
        if self.precision != "fp32" and self.backbone != "tensorrt":
            raise _Refusal(f"precision {self.precision!r} needs backbone 'tensorrt' (onnxruntime runs fp32)")
        if self.precision == "int8" and self.calibration_images < self.batch_size:
            raise _Refusal(f"int8 calibration needs at least one full batch: calibration_images "
                           f"{self.calibration_images} < batch_size {self.batch_size}")


@_section
class SessionConfig:
    """A deployed session's adaptation policy and the largest batch it accepts."""

    adapt_every: int = _field(200, gt=0, description="unlabeled stream samples observed between adaptation rounds")
    max_batch: int = _field(1024, gt=0, description="largest batch observe() and predict() accept")


@_section
class RunConfig:
    """A whole experiment: data, model, training, detection, memory and stream."""

    seed: int = _field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = _field(factory=DataConfig)
    model: ModelConfig = _field(factory=ModelConfig)
    train: TrainConfig = _field(factory=TrainConfig)
    detector: DetectorConfig = _field(factory=DetectorConfig)
    memory: MemoryConfig = _field(factory=MemoryConfig)
    stream: StreamConfig = _field(factory=StreamConfig)
    ood_sets: tuple[OODSetConfig, ...] = ()
    deploy: DeployConfig = _field(factory=DeployConfig)
    session: SessionConfig = _field(factory=SessionConfig)


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read and validate a YAML config file."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {source}: {exc.strerror or exc}") from exc
    return parse_config(text, origin=str(source))


def parse_config(text: str, origin: str = "<string>") -> RunConfig:
    """Validate YAML text; an empty document gives the defaults."""
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer too long for Python to read
        raise ConfigError(f"{origin}: invalid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: top level must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, origin)


def config_from_dict(raw: dict[str, Any], origin: str = "<dict>") -> RunConfig:
    """Validate an already-parsed mapping (also used for overrides from the command line)."""
    return section_from_dict(RunConfig, raw, origin)


def section_from_dict(cls: type[SectionT], raw: Any, origin: str = "<dict>") -> SectionT:
    """Section `cls` from plain data (parsed YAML or JSON); any refusal is a ConfigError starting with `origin`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: must be a mapping of {cls.__name__} keys, got {type(raw).__name__}")
    try:
        return _build(cls, raw, ())
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def evolve_config(section: SectionT, **changes: Any) -> SectionT:
    """`section` with `changes` applied and validated like YAML; a refused change is a ConfigError naming its key."""
    current = {field.name: getattr(section, field.name) for field in attrs.fields(type(section))}
    return _build(type(section), {**current, **changes}, ())


def config_to_dict(section: Any) -> dict[str, Any]:
    """`section` as plain data (nested sections as dicts, tuples as lists) for JSON, YAML and `section_from_dict`."""
    return {field.name: _plain(getattr(section, field.name)) for field in attrs.fields(type(section))}


def with_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return `config` with dotted-key overrides applied, e.g. {'train.epochs': 3}, re-validated."""
    raw = config_to_dict(config)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise ConfigError(f"override {dotted!r}: {key!r} is not a config section")
            node = node[key]
        node[leaf] = value
    return config_from_dict(raw, origin="overrides")


def _build(cls: type[SectionT], raw: dict[Any, Any], path: tuple[str, ...]) -> SectionT:
    """Section `cls` at key `path` from a mapping: unknown and missing keys refused here, values by its validators."""
    fields = attrs.fields(cls)
    names = [field.name for field in fields]
    unknown = [key for key in raw if key not in names]
    if unknown:
        raise ConfigError(f"unknown key {_dotted(path, unknown[0])!r}; allowed keys here: {', '.join(sorted(names))}")
    missing = [field.name for field in fields if field.default is attrs.NOTHING and field.name not in raw]
    if missing:
        raise ConfigError(f"{_dotted(path, missing[0])}: required, but missing")
    hints = _hints(cls)
    values = {field.name: _structure(hints[field.name], _over_default(field, raw[field.name]), (*path, field.name))
              for field in fields if field.name in raw}
    try:
        return cls(**values)
    except _Refusal as refusal:
        located = _dotted(path, refusal.key)
        raise ConfigError(f"{located}: {refusal.problem}" if located else refusal.problem) from None


def _over_default(field: attrs.Attribute, value: Any) -> Any:
    """A mapping given for a section field, laid over that field's own default section: a partial
    `detector.pu_head` keeps the memory_pu recipe rather than falling back to BinaryHeadConfig's."""
    default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
    if not (attrs.has(type(default)) and isinstance(value, dict)):
        return value
    merged = config_to_dict(default)
    for key, item in value.items():
        merged[key] = _over_default(attrs.fields_dict(type(default))[key], item) \
            if key in merged and isinstance(item, dict) else item
    return merged


def _structure(hint: Any, value: Any, path: tuple[str, ...]) -> Any:
    """Shape plain `value` for a field annotated `hint`: mappings into sections, lists into tuples, numbers into
    the field's kind. What still does not fit is left as it is, for the field's validator to refuse."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return None if value is None else _structure(_not_none(args), value, path)
    if attrs.has(hint) and isinstance(value, dict):
        return _build(hint, value, path)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_structure(args[0], item, (*path, str(index))) for index, item in enumerate(value))
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint is float and (_is_int(value) or isinstance(value, str)):
        return _to_float(value)
    return value


def _to_float(value: int | str) -> float | int | str:
    """An int or a numeric string as a float. YAML reads 1e-3 (no dot) as a string, so such a string is a number
    here; an int too large for a float or a non-numeric string stays as it is, for the validator to refuse."""
    try:
        return float(value)
    except (ValueError, OverflowError):
        return value


def _plain(value: Any) -> Any:
    """One field's value as plain data, for `config_to_dict`."""
    if attrs.has(type(value)):
        return config_to_dict(value)
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _is_int(value: Any) -> bool:
    """An int that is not a bool (bool subclasses int, but true is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _not_none(args: tuple[Any, ...]) -> Any:
    """The one member of `X | None` that is not None."""
    return next(arg for arg in args if arg is not type(None))


def _dotted(path: tuple[str, ...], key: Any = None) -> str:
    """The key path as written in messages, e.g. 'ood_sets.0.limit'."""
    return ".".join([*path, str(key)] if key is not None else path)
