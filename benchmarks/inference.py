"""Inference speed in one run, on the same images: PyTorch eager, torch.compile, ONNX Runtime fp32 and int8, and the
torch-free `OnnxPredictor` end to end (JPEG decode, resize, crop and model).

    python -m benchmarks.inference --out inference.json           # ResNet-18 and EfficientNet-B0 at 224 px + digits
    python -m benchmarks.inference --models test_resnet --image-size 32 --quick   # a smoke run, seconds

Random weights for the 224-px models (none can be downloaded); the bundled digits model is the newest
`lightning_logs/resnet18/version_*/checkpoints/best.ckpt` (`make train`), or `--digits CKPT`. Every model sees the
uint8 NCHW batch the exported graph takes, normalisation included. Reported per model: batch-1 latency p50 and p95
(ms), batch-32 throughput (img/s), each also as a ratio to eager in the same run; int8 throughput over fp32; the
end-to-end predictor over the bare ORT session at batch 1; and the share of end-to-end time spent outside the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from classifier.data.photos import write_photos
from classifier.deploy.export import ExportedModel, export_net, quantize_int8
from classifier.deploy.onnx_predictor import OnnxPredictor
from classifier.deploy.predictor import Predictor
from classifier.model.net import ClassifierNet

log = logging.getLogger("inference")


def latencies(run: Callable[[], object], repeats: int) -> np.ndarray:
    """Seconds per call, after two warm-up calls."""
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return np.array(times)


def measure(one: Callable[[], object], many: Callable[[], object], repeats: int, batch: int) -> dict:
    """Batch-1 p50/p95 in ms, and batch throughput from the best of `repeats` // 4 + 1 calls."""
    single = latencies(one, repeats) * 1000
    best = latencies(many, repeats // 4 + 1).min()
    return {"p50_ms": float(np.median(single)), "p95_ms": float(np.percentile(single, 95)), "img_s": batch / best}


def jpegs(folder: Path, count: int, sizes: tuple[int, int]) -> list[Path]:
    """`count` photo-like JPEGs (some grey, some EXIF-rotated) of `sizes` px sides."""
    write_photos(folder, per_class=max(count, 2), sizes=sizes)  # each class's first image is a PNG
    return sorted(folder.rglob("*.jpg"))[:count]


def bench_model(name: str, net: ClassifierNet, paths: list[Path], args: argparse.Namespace, work: Path) -> dict:
    """Every runtime on `net`, on the same preprocessed batch of `paths`."""
    predictor = Predictor(net)
    pixels = torch.stack([predictor.preprocess(path) for path in paths[: args.batch]])
    last = torch.channels_last
    one, batch = pixels[:1].contiguous(memory_format=last), pixels.contiguous(memory_format=last)
    results = {}
    eager = ExportedModel(net).eval().to(memory_format=last)
    with torch.inference_mode():
        results["eager"] = measure(lambda: eager(one), lambda: eager(batch), args.repeats, len(batch))
        if not args.no_compile:
            compiled = torch.compile(eager)
            results["compile"] = measure(lambda: compiled(one), lambda: compiled(batch), args.repeats, len(batch))
    fp32, int8 = work / f"{name}.onnx", work / f"{name}.int8.onnx"
    description = export_net(net, fp32, "onnx", {"class_names": net.class_names, **net.preprocessing})
    session = OnnxPredictor(fp32)
    one_np, batch_np = pixels[:1].numpy(), pixels.numpy()
    results["ort_fp32"] = measure(lambda: session.predict_batch(one_np), lambda: session.predict_batch(batch_np),
                                  args.repeats, len(batch))  # fmt: skip
    quantize_int8(fp32, int8, [image[None] for image in batch_np], {**description, "quantization": "int8"})
    quantized = OnnxPredictor(int8)
    results["ort_int8"] = measure(lambda: quantized.predict_batch(one_np), lambda: quantized.predict_batch(batch_np),
                                  args.repeats, len(batch))  # fmt: skip
    first, files = paths[:1], paths[: args.batch]
    results["torch_free_e2e"] = measure(lambda: session.predict(first), lambda: session.predict(files),
                                        args.repeats, len(files))  # fmt: skip
    preprocess = latencies(lambda: [session.preprocess(path) for path in files], args.repeats // 4 + 1).min()
    eager_figures = results["eager"]
    for figures in results.values():
        figures["p50_vs_eager"] = figures["p50_ms"] / eager_figures["p50_ms"]
        figures["img_s_vs_eager"] = figures["img_s"] / eager_figures["img_s"]
    e2e = results["torch_free_e2e"]
    summary = {
        "ort_fp32_p50_vs_eager": results["ort_fp32"]["p50_vs_eager"],
        "int8_img_s_vs_fp32": results["ort_int8"]["img_s"] / results["ort_fp32"]["img_s"],
        "e2e_p50_vs_ort_fp32": e2e["p50_ms"] / results["ort_fp32"]["p50_ms"],
        # both parts of an end-to-end call, each its best time: a ratio of two separately timed whole calls can
        # pass 1 on a busy machine
        "e2e_share_outside_model": preprocess / (preprocess + len(files) / results["ort_fp32"]["img_s"]),
    }
    return {"input_size": net.preprocessing["input_size"], "runtimes": results, "summary": summary}


def print_model(name: str, result: dict) -> None:
    print(f"\n{name} {result['input_size'][1]}x{result['input_size'][2]}")
    print(f"{'':16} {'b1 p50 ms':>10} {'b1 p95 ms':>10} {'/eager':>7} {'b32 img/s':>10} {'/eager':>7}")
    for runtime, f in result["runtimes"].items():
        print(f"{runtime:16} {f['p50_ms']:10.2f} {f['p95_ms']:10.2f} {f['p50_vs_eager']:7.2f} "
              f"{f['img_s']:10.1f} {f['img_s_vs_eager']:7.2f}")  # fmt: skip
    print("  " + ", ".join(f"{key} {value:.2f}" for key, value in result["summary"].items()))


def newest_digits_checkpoint() -> Path | None:
    runs = Path("lightning_logs/resnet18").glob("version_*/checkpoints/best.ckpt")
    found = sorted(runs, key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "efficientnet_b0"], help="timm backbones")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--digits", type=Path, help="the bundled digits checkpoint (default: the newest make train)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=40, help="batch-1 calls per runtime")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile takes minutes)")
    parser.add_argument("--quick", action="store_true", help="8 repeats and no digits model: a smoke run")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.repeats = 8
    torch.manual_seed(0)
    results = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = jpegs(work / "photos", args.batch, (300, 640))
        for backbone in args.models:
            net = ClassifierNet(backbone, [str(i) for i in range(1000)], image_size=args.image_size)
            results[backbone] = bench_model(backbone, net, paths, args, work)
            print_model(backbone, results[backbone])
        digits = args.digits or (None if args.quick else newest_digits_checkpoint())
        if digits is not None:
            results["digits"] = bench_model("digits", Predictor.from_checkpoint(digits).net, paths, args, work)
            print_model(f"digits ({digits})", results["digits"])
        elif not args.quick:
            log.warning("No bundled digits checkpoint (run `make train`, or pass --digits CKPT): digits skipped")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
