"""Per-image cost of a ``data.loader: stream`` loader worker: decode one JPEG, cut both views' crops.

Makes synthetic photo-like JPEGs (colour noise at several scales, shapes and grain, saved at quality 90:
500x375 is ~90 KB, like an ImageNet photo) and times, in this one process on one thread as a loader worker
runs, the previous worker code (kept below for comparison) and the current one (``slimssl.data.stream``).
The two run interleaved, round after round, so a shared machine's noise hits both alike; the table gives
medians over rounds. Reading the files is not timed (the bytes are in memory).

    OMP_NUM_THREADS=1 python benchmarks/stream_decode.py [--count 16] [--rounds 5] [--ablation] [--keep DIR]

``--ablation`` also times each option on its own; ``--keep DIR`` writes the JPEGs to DIR (one folder of
images) for an end-to-end run of the loader, e.g.

    slimssl bench --data DIR --data-only --config imagenet_r50_dspnet_byol --device cpu --batch-size 32 \\
        --set data.workers=2
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from slimssl.data.augment import _center_box, _rand, recipe, sample_crop_boxes
from slimssl.data.decode import decode_image, decode_pixels
from slimssl.data.stream import (collate_crops, crop_pair, full_detail_side, resized_crop, sample_generator,
                                 view_boxes)

SIZES = [(500, 375), (375, 500), (640, 480), (1024, 768), (3000, 2000)]  # (width, height); the last one drafts


# ---------------------------------------------------------------- test images


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: smooth colour noise at four scales plus pixel-level texture, a dozen filled
    discs (edges) and sensor-like grain, so JPEG sizes and decode times resemble real photos."""
    g = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 110.0, np.float32) + 40 * g.random(3, dtype=np.float32)
    for cells, amplitude in ((4, 90), (16, 50), (64, 35), (256, 35), (512, 35)):
        small = g.integers(0, 256, (max(2, height * cells // 512), max(2, width * cells // 512), 3), np.uint8)
        smooth = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        pixels += amplitude * (np.asarray(smooth, np.float32) / 255 - 0.5)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y, r = g.integers(0, width), g.integers(0, height), g.integers(5, min(width, height) // 4)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in g.integers(0, 256, 3)))
    grain = np.asarray(image, np.float32) + g.normal(0, 14, (height, width, 3))
    return Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8))


def make_jpegs(count: int, keep: Path | None) -> dict[tuple[int, int], list[bytes]]:
    """``count`` JPEGs of each size (a quarter of that for the drafted size), in memory (and in ``keep``)."""
    jpegs = {}
    for w, h in SIZES:
        jpegs[w, h] = []
        for i in range(count if (w, h) != SIZES[-1] else max(2, count // 4)):
            buf = io.BytesIO()
            photo(w, h, seed=1000 * w + i).save(buf, "JPEG", quality=90)
            jpegs[w, h].append(buf.getvalue())
            if keep is not None:
                (keep / f"{w}x{h}_{i:03d}.jpg").write_bytes(buf.getvalue())
    return jpegs


# ---------------------------------------------- the previous worker code, for comparison


def old_sample_crop_boxes(b, height, width, scale, ratio, generator, device) -> torch.Tensor:
    """``sample_crop_boxes`` as it was (the same boxes, with more small tensor ops)."""
    u = _rand((4, b, 10), generator, device, batch_dim=1)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top = (u[2].gather(1, first)[:, 0] * (height - h + 1)).floor()
    left = (u[3].gather(1, first)[:, 0] * (width - w + 1)).floor()
    any_fit = fits.any(dim=1)
    columns = zip((top, left, h, w), _center_box(height, width, ratio))
    return torch.stack([torch.where(any_fit, col, fb) for col, fb in columns], dim=1)


def old_crop_pair(image: Image.Image, views, size: int, generator: torch.Generator) -> torch.Tensor:
    """The previous ``crop_pair``: PIL's box resize of the decoded image -> uint8 [2, 3, size, size]."""
    width, height = image.size
    crops = []
    for view in views:
        box = old_sample_crop_boxes(1, height, width, view.crop_scale, view.crop_ratio, generator, "cpu")
        top, left, h, w = box[0].tolist()
        crop = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        crops.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1))
    return torch.stack(crops)


# ---------------------------------------------------------------------- timing


@dataclass
class Worker:
    """One implementation's three stages: bytes -> image, (image, row) -> crops, crops of a batch -> batch."""

    name: str
    decode: Callable
    crop: Callable
    collate: Callable


def workers(size: int) -> list[Worker]:
    views = recipe("byol", size)
    side = full_detail_side(size, views)
    return [
        Worker("before: PIL decode, PIL box resize, CHW in the worker",
               lambda data: decode_image(data, side),
               lambda image, row: old_crop_pair(image, views, size, sample_generator(0, 1, row)),
               torch.stack),
        Worker("after: decode_pixels, torch antialiased resize, HWC",
               lambda data: decode_pixels(data, side),
               lambda image, row: crop_pair(image, views, size, sample_generator(0, 1, row)),
               lambda crops: collate_crops([(1, c, []) for c in crops])[1]),
    ]


def run_stages(worker: Worker, jpegs: list[bytes]) -> tuple[float, float, float]:
    """Seconds per image of each stage over ``jpegs`` (one batch)."""
    start = time.perf_counter()
    images = [worker.decode(data) for data in jpegs]
    decoded = time.perf_counter()
    crops = [worker.crop(image, row) for row, image in enumerate(images)]
    cropped = time.perf_counter()
    worker.collate(crops)
    done = time.perf_counter()
    return tuple((t1 - t0) / len(jpegs) for t0, t1 in ((start, decoded), (decoded, cropped), (cropped, done)))


def compare(jpegs: dict, size: int, rounds: int) -> list[str]:
    """Markdown rows: each image size, each implementation, median stage times."""
    impls = workers(size)
    rows = []
    for (w, h), files in jpegs.items():
        per_round = {worker.name: [] for worker in impls}
        for worker in impls:  # warm up
            run_stages(worker, files[:2])
        for _ in range(rounds):
            for worker in impls:
                per_round[worker.name].append(run_stages(worker, files))
        before = None
        for worker in impls:
            stages = [1e3 * statistics.median(r[i] for r in per_round[worker.name]) for i in range(3)]
            total = sum(stages)
            before = before or total
            rows.append(f"| {w}x{h} | {worker.name} | {stages[0]:.2f} | {stages[1]:.2f} | {stages[2]:.2f} | "
                        f"{total:.2f} | {1e3 / total:.0f} | {before / total:.2f}x |")
    return rows


def ablation(jpegs: dict, size: int, rounds: int) -> list[str]:
    """Markdown rows: each option alone, ms per image (median over rounds, options interleaved)."""
    options = ablation_options(jpegs, size)
    times = {name: [] for name in options}
    for _ in range(rounds):
        for name, (run, count) in options.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / count)
    return [f"| {name} | {1e3 * statistics.median(t):.3f} |" for name, t in times.items()]


def ablation_options(jpegs: dict, size: int) -> dict[str, tuple[Callable[[], object], int]]:
    """Option name -> (a run over some images, how many images)."""
    views = recipe("byol", size)
    side = full_detail_side(size, views)
    (w, h), (lw, lh) = SIZES[0], SIZES[-1]
    small, large = jpegs[w, h], jpegs[lw, lh]
    pil = [decode_image(d, side) for d in small]
    tensors = [decode_pixels(d, side) for d in small]
    boxes = [view_boxes(t.shape[1], t.shape[2], views, sample_generator(0, 1, i)) for i, t in enumerate(tensors)]
    hwc = [crop_pair(t, views, size, sample_generator(0, 1, i)) for i, t in enumerate(tensors)]

    def over(items: list, fn: Callable) -> tuple[Callable[[], object], int]:
        return (lambda: [fn(i, item) for i, item in enumerate(items)]), len(items)

    def draft(scale: int) -> Callable:
        def decode(i: int, data: bytes) -> Image.Image:
            img = Image.open(io.BytesIO(data))
            img.draft("RGB", (img.width // scale, img.height // scale))
            img.load()
            return img
        return decode

    def per_view(sampler: Callable) -> Callable:
        def boxes_of(i: int, t: torch.Tensor) -> list:
            g = sample_generator(0, 1, i)
            return [sampler(1, t.shape[1], t.shape[2], v.crop_scale, v.crop_ratio, g, "cpu").tolist() for v in views]
        return boxes_of

    def pil_resize(gap: float | None) -> Callable:
        def crops(i: int, img: Image.Image) -> list:
            return [img.resize((size, size), Image.Resampling.BILINEAR, box=(x, y, x + bw, y + bh),
                               reducing_gap=gap) for y, x, bh, bw in boxes[i]]
        return crops

    def torch_resize(contiguous: bool) -> Callable:
        def crops(i: int, t: torch.Tensor) -> list:
            patches = [t[None, :, y:y + bh, x:x + bw] for y, x, bh, bw in boxes[i]]
            if contiguous:
                patches = [p.contiguous(memory_format=torch.channels_last) for p in patches]
            return [F.interpolate(p, size=(size, size), mode="bilinear", antialias=True) for p in patches]
        return crops

    return {
        f"decode {w}x{h}: PIL decode_image": over(small, lambda i, d: decode_image(d, side)),
        f"decode {w}x{h}: PIL decode_image + np.array (to a tensor)":
            over(small, lambda i, d: np.array(decode_image(d, side))),
        f"decode {w}x{h}: decode_pixels (header check + torchvision op)":
            over(small, lambda i, d: decode_pixels(d, side)),
        "boxes: sample_crop_boxes per view, before": over(tensors, per_view(old_sample_crop_boxes)),
        "boxes: sample_crop_boxes per view, now": over(tensors, per_view(sample_crop_boxes)),
        "boxes: view_boxes, both views in one pass": over(
            tensors, lambda i, t: view_boxes(t.shape[1], t.shape[2], views, sample_generator(0, 1, i))),
        f"2 crops {w}x{h}: PIL box resize, bilinear": over(pil, pil_resize(None)),
        f"2 crops {w}x{h}: PIL box resize, bilinear, reducing_gap=2": over(pil, pil_resize(2.0)),
        f"2 crops {w}x{h}: torch antialiased bilinear, strided crop": over(tensors, torch_resize(False)),
        f"2 crops {w}x{h}: torch antialiased bilinear, contiguous channels-last crop":
            over(tensors, torch_resize(True)),
        f"2 crops {w}x{h}: resized_crop (the above, HWC out)":
            over(tensors, lambda i, t: [resized_crop(t, box, size) for box in boxes[i]]),
        "layout: HWC crops -> CHW in the worker (stack of permuted)":
            over(hwc, lambda i, c: torch.stack([x.permute(2, 0, 1) for x in c])),
        "layout: HWC crops as they are (stack)": over(hwc, lambda i, c: torch.stack(list(c))),
        **{f"decode {lw}x{lh}: PIL draft 1/{scale}": over(large, draft(scale)) for scale in (1, 2, 4)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=16, help="JPEGs per image size")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (medians are reported)")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--ablation", action="store_true", help="also time each option on its own")
    p.add_argument("--keep", type=Path, help="write the JPEGs to this folder")
    args = p.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    jpegs = make_jpegs(args.count, args.keep)
    kib = {f"{w}x{h}": sum(map(len, files)) / len(files) / 1024 for (w, h), files in jpegs.items()}
    print(f"{args.count} JPEGs (quality 90) per size, mean KiB: "
          + ", ".join(f"{k} {v:.0f}" for k, v in kib.items()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; BYOL views at {args.resolution} px\n")
    print("| images | worker code | decode ms | 2 crops ms | collate ms | total ms/image | images/s per worker "
          "| speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(compare(jpegs, args.resolution, args.rounds)))
    if args.ablation:
        print("\n| option | ms per image |\n|---|---|")
        print("\n".join(ablation(jpegs, args.resolution, args.rounds)))


if __name__ == "__main__":
    main()
