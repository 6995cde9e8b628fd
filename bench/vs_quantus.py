"""exigo's attribution checks against Quantus: the same numbers, and the time they take.

    pip install -e '.[bench]'   # quantus 0.6
    python bench/vs_quantus.py --data-dir ../shared/mnist [--sizes 100 1000] [--repeats 3]

On the same trained MnistCNN (one epoch, seed 0), the same held-out images (stratified by
class) and the same Saliency maps:

1. Deletion: Quantus' `PixelFlipping` (14 pixels per step, 56 steps, the blank value as the
   baseline, softmax) against exigo's `deletion_insertion` (56 steps, the same baseline).
   exigo also computes the insertion curves and a random order's, and its timing includes the
   bootstrap intervals of every curve point and AUC; Quantus computes the deletion curve only.
2. Model randomisation: Quantus' `MPRT` (top-down cascade, Spearman of |maps| over every
   pixel, seed 42) against exigo's `randomisation_checks` (the same layers, the same random
   weights, `ignore_joint_zeros=False`, the independent variant off, 2 draws of the random
   weights at full depth: one more pass of the maps than Quantus).

It reports the largest difference between the two libraries' values (curve points; per-image
correlations at every depth), the wall time of each, per image and per model pass (an image
through the model: a forward pass for the curves, a forward and a backward pass for the
maps). exigo evaluates each distinct composite once (`exigo.analyses.faithfulness`), so it
also reports its time per curve point. The two libraries run alternately, `--repeats` times;
times are medians.

Quantus 0.6's AUC helpers call `np.trapz`, which numpy 2.4 removed; this script puts
`np.trapezoid` in its place before importing Quantus (only in this process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

if not hasattr(np, "trapz"):  # Quantus 0.6 calls np.trapz, removed in numpy 2.4
    np.trapz = np.trapezoid  # type: ignore[attr-defined]

STEPS = 56  # 784 / 14


def trained_model(data_dir: Path, seed: int):
    from exigo.data import load_mnist
    from exigo.engine.training import train_epoch
    from exigo.models import MnistCNN

    train, held_out = load_mnist(data_dir, download=False)
    torch.manual_seed(seed)
    model = MnistCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    train_epoch(model, train, order, optimizer, batch_size=64)
    return model.eval(), held_out


def timed(call, repeats_out: list[float]):
    start = time.perf_counter()
    result = call()
    repeats_out.append(time.perf_counter() - start)
    return result


def compare(model, held_out, size: int, repeats: int) -> dict:
    import quantus

    from exigo.analyses._bootstrap import Bootstrap
    from exigo.analyses.attributions import attribution_maps, choose_check_set, saliency
    from exigo.analyses.faithfulness import deletion_insertion
    from exigo.analyses.sanity import _SEED_OFFSET, randomisation_checks
    from exigo.data import MNIST_NORMALIZATION, blank_image, gather

    indices = choose_check_set(held_out.targets, size, seed=0)
    images, targets = gather(held_out, indices)
    baseline = blank_image(MNIST_NORMALIZATION, images)
    blank = float(baseline.flatten()[0])
    maps = attribution_maps(model, images, targets, {"saliency": saliency})  # (1, N, H, W)
    count = images.shape[0]

    def exigo_deletion():
        curves = deletion_insertion(
            model,
            images,
            targets,
            maps,
            baseline,
            names=["saliency"],
            steps=STEPS,
            generator=torch.Generator().manual_seed(0),
        )
        bootstrap = Bootstrap(count, seed=0)
        bootstrap.interval(curves.deletion.transpose(1, 2))
        bootstrap.interval(curves.insertion.transpose(1, 2))
        bootstrap.interval(curves.image_deletion_auc)
        bootstrap.interval(curves.image_insertion_auc)
        return curves

    pixel_flipping = quantus.PixelFlipping(
        features_in_step=784 // STEPS, perturb_baseline=blank, disable_warnings=True
    )

    def quantus_deletion():
        return pixel_flipping(
            model=model,
            x_batch=images.numpy(),
            y_batch=targets.numpy(),
            a_batch=maps[0][:, None].numpy(),
            softmax=True,
            device="cpu",
            channel_first=True,
            batch_size=256,
        )

    def explain_numpy(model, inputs, targets, **kwargs):
        batch = torch.as_tensor(inputs)
        labels = torch.as_tensor(targets)
        return attribution_maps(model, batch, labels, {"s": saliency})[0][:, None].numpy()

    def explain(model, batch, labels):
        return attribution_maps(model, batch, labels, {"saliency": saliency})

    mprt = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True)

    def quantus_randomisation():
        return mprt(
            model=model,
            x_batch=images.numpy(),
            y_batch=targets.numpy(),
            a_batch=maps[0][:, None].numpy(),
            explain_func=explain_numpy,
            softmax=False,
            device="cpu",
            batch_size=256,
        )

    def exigo_randomisation():
        checks = randomisation_checks(
            model,
            images,
            targets,
            explain,
            maps,
            names=["saliency"],
            seed=42 + 1 - _SEED_OFFSET,
            ignore_joint_zeros=False,
            independent=False,
            draws=2,
        )
        bootstrap = Bootstrap(count, seed=0)
        bootstrap.interval(checks.cascade_spearman)
        bootstrap.interval(checks.seed_control)
        return checks

    times: dict[str, list[float]] = {name: [] for name in ("qd", "ed", "qr", "er")}
    for repeat in range(repeats):
        pairs = [("qd", quantus_deletion), ("ed", exigo_deletion)]
        pairs += [("qr", quantus_randomisation), ("er", exigo_randomisation)]
        if repeat % 2:
            pairs = [pairs[1], pairs[0], pairs[3], pairs[2]]
        results = {name: timed(call, times[name]) for name, call in pairs}
    theirs = torch.tensor(results["qd"], dtype=torch.float32)  # (N, STEPS)
    curves = results["ed"]
    deletion_difference = float((curves.deletion[0, :, 1:] - theirs).abs().max())
    checks = results["er"]
    randomisation_difference = max(
        float((checks.cascade_spearman[depth, 0] - torch.tensor(results["qr"][layer])).abs().max())
        for depth, layer in enumerate(checks.layers)
    )
    median = {name: statistics.median(values) for name, values in times.items()}
    layers = len(checks.layers)
    # model passes: an image through the model (the maps: forward + backward)
    passes = {
        "qd": count * STEPS,
        "ed": curves.passes,
        "qr": count * (layers + 1),  # the original maps, then one per layer
        "er": count * (layers + 1),  # one per layer, then the second-seed control
    }
    points = {"ed": 2 * 2 * count * (STEPS + 1)}  # deletion, insertion x saliency, random
    return {
        "images": count,
        "deletion_max_difference": deletion_difference,
        "randomisation_max_difference": randomisation_difference,
        "seconds": median,
        "passes": passes,
        "curve_points": points,
        "runs": times,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| check | images | max difference | Quantus: s, s/image, µs/pass | "
        "exigo: s, s/image, µs/pass (µs/curve point) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for result in results:
        count, seconds, passes = result["images"], result["seconds"], result["passes"]
        for name, quantus_key, exigo_key, difference in (
            ("deletion (PixelFlipping)", "qd", "ed", result["deletion_max_difference"]),
            ("randomisation (MPRT)", "qr", "er", result["randomisation_max_difference"]),
        ):
            ours = (
                f"{seconds[exigo_key]:.2f}, {seconds[exigo_key] / count * 1e3:.1f} ms, "
                f"{seconds[exigo_key] / passes[exigo_key] * 1e6:.0f}"
            )
            if exigo_key in result["curve_points"]:
                ours += f" ({seconds[exigo_key] / result['curve_points'][exigo_key] * 1e6:.0f})"
            lines.append(
                f"| {name} | {count} | {difference:.1e} | {seconds[quantus_key]:.2f}, "
                f"{seconds[quantus_key] / count * 1e3:.1f} ms, "
                f"{seconds[quantus_key] / passes[quantus_key] * 1e6:.0f} | {ours} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/mnist"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="give both libraries the channels-last copy the attribution analysis uses",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, held_out = trained_model(args.data_dir, seed=0)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    results = [compare(model, held_out, size, args.repeats) for size in args.sizes]
    layout = "channels-last" if args.channels_last else "contiguous"
    print(f"torch threads: {args.threads}; {layout} model; medians of {args.repeats} runs")
    print(table(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
