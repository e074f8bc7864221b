"""Soak: a long unlabeled stream through one Session, measuring throughput and host memory.

    python benchmarks/soak.py --frames 200000 --out benchmarks/results/soak_digits
    python benchmarks/soak.py --config configs/cifar10.yaml --device cuda --frames 1000000 --out DIR

The 9+1 adaptation stream of the config (known images not in the memory plus the novel class's
training images) is replayed, reshuffled on every pass, in batches of `stream.batch_size`; each
batch is observed, then predicted. tests/test_soak.py runs the same loop briefly on CPU; this
script is the long version. result.json holds throughput, resident memory (VmRSS) after warm-up
and at the end, adaptation time, and the largest memory and pool sizes seen.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# As a script, Python puts benchmarks/ first on sys.path, where sibling scripts (kernels.py) would
# shadow the project's packages of the same name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from edge_runtime.config import config_to_dict, load_config, with_overrides
from edge_runtime.device import resolve_device
from edge_runtime.evaluation import adaptation_data
from edge_runtime.experiment import prepare_data, train_frozen_classifier
from edge_runtime.results import format_table, write_result
from edge_runtime.session import Session

ROOT = Path(__file__).resolve().parents[1]


def resident_bytes() -> int:
    """This process's resident set size (VmRSS)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/digits.yaml"))
    parser.add_argument("--frames", type=int, default=100_000, help="stream frames after warm-up")
    parser.add_argument("--warm-up", type=int, default=5_000, help="frames streamed before RSS is first read")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the config's device)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set detector.pool_size=2000 (value parsed as YAML)")
    parser.add_argument("--out", required=True, help="folder for result.json and the trained classifier")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    cfg = with_overrides(load_config(args.config), {"detector.name": "grad_mahalanobis_ssl", **overrides})
    device = torch.device(args.device) if args.device else resolve_device(cfg.device)
    out = Path(args.out)
    split = prepare_data(cfg, progress=args.progress).split
    classifier, _ = train_frozen_classifier(cfg, split, device, out, progress=args.progress)
    memory, stream = adaptation_data(cfg, split, split.novel_train, classifier, device)
    images = np.concatenate([batch.images for batch in stream])
    session = Session(cfg, classifier, split.known_classes, memory, cfg.data.novel_class or "novel", device=device)

    batch, rng = cfg.stream.batch_size, np.random.default_rng(cfg.seed)
    order = np.empty(0, dtype=np.int64)
    largest = {"memory": 0, "pool": 0}
    adapt_seconds: list[float] = []
    rss_start, started = 0, 0.0
    total = args.warm_up + args.frames
    for step in tqdm(range(total // batch), desc="soak", disable=not args.progress):
        if step * batch == args.warm_up - args.warm_up % batch:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rss_start, started = resident_bytes(), time.perf_counter()
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(images))])
        frames, order = images[order[:batch]], order[batch:]
        tick = time.perf_counter()
        if session.observe(frames):
            adapt_seconds.append(time.perf_counter() - tick)
        session.predict(frames)
        pool = session.learner.heads[-1].pool
        largest["memory"] = max(largest["memory"], session.memory.size)
        largest["pool"] = max(largest["pool"], 0 if pool is None else len(pool))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed, rss_end = time.perf_counter() - started, resident_bytes()
    measured = total // batch * batch - (args.warm_up - args.warm_up % batch)

    metrics = {
        "samples_per_s/soak/observe_predict": measured / elapsed,
        "soak/frames": float(measured),
        "soak/rounds": float(session.rounds),
        "soak/rss_bytes_after_warm_up": float(rss_start),
        "soak/rss_bytes_end": float(rss_end),
        "soak/rss_growth_bytes": float(rss_end - rss_start),
        "soak/max_memory_size": float(largest["memory"]),
        "soak/memory_budget": float(cfg.memory.budget),
        "soak/max_pool_size": float(largest["pool"]),
        "soak/pool_size_limit": float(cfg.detector.pool_size),
        "adapt_seconds/soak/mean": float(np.mean(adapt_seconds)) if adapt_seconds else 0.0,
        "adapt_seconds/soak/max": float(np.max(adapt_seconds)) if adapt_seconds else 0.0,
    }
    write_result(out, config_to_dict(cfg), metrics, device,
                 command="python benchmarks/soak.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(format_table([[name, value] for name, value in metrics.items()], ["metric", "value"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
