"""``adaptad predict``: score images with a registered model and write scores and heat maps.

The model is loaded through the registry (``models:/NAME@champion``, ``models:/NAME/3``, ...) as the
pyfunc of flows/pyfunc.py, so the command exercises exactly what ``mlflow models serve`` serves.
Outputs, written to a temporary folder and renamed into place (nothing appears on error):

- ``DIR/scores.csv``: ``path,score,heatmap`` one row per image, in the order given; a model registered
  with its decision (thresholds set on held-out normal images, flows/decide.py) adds
  ``label`` (normal / anomalous), ``score_normalized`` (the threshold at 0.5) and ``mask``;
- ``DIR/<stem>_heatmap.png``: the image at its own resolution with the anomaly map overlaid (jet, 50%).
  With a decision the map is the normalized one on the fixed scale [0, 1] — the pixel threshold is the
  middle of the colour map for every model — and the defect mask's outline is drawn on it (white).
  Without one the colour scale is shared by all images of one call (1st–99.9th percentile of all their
  map values), so a normal image does not light up just because it is alone;
- ``DIR/<stem>_mask.png`` (with a decision): the binary defect mask at the image's own resolution
  (255 = defect). Repeated stems get ``-2``, ``-3``...
"""

from __future__ import annotations

import argparse
import base64
import csv
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from flows.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="registered model URI, e.g. models:/adaptad-demo-deeppcb@champion (or @challenger, or /VERSION)",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files to score")
    parser.add_argument(
        "--output", required=True, type=Path, help="output folder DIR (must not exist unless --force)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )


def check_model(uri: str, option: str = "--model") -> Any:
    """The registered model version ``uri`` names (None for a logged model id ``models:/m-...``), or a clean
    one-line error for an unknown registered model, version or alias."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        raise UsageError(
            f"{option} {uri}: expected a registry URI models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    ref = uri.removeprefix("models:/")
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        if "/" in ref:
            name, version = ref.split("/", 1)
            return client.get_model_version(name, version)
        if not ref.startswith("m-"):  # a logged model id is looked up by load_model
            raise UsageError(f"{option} {uri}: name an alias or a version (models:/NAME@champion)")
    except MlflowException as err:
        message = " ".join(str(err.message).split())
        raise UsageError(f"{option} {uri}: {message}") from None
    return None


def open_registry(tracking_uri: str | None, model: str) -> Any:
    """Point MLflow at ``tracking_uri`` (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db), which must
    exist, and return the model version ``model`` names (:func:`check_model`); UsageError otherwise."""
    from flows.tracking import TrackingError, check_tracking, resolve_tracking_uri, use_tracking

    uri = tracking_uri or resolve_tracking_uri(None)
    try:
        check_tracking(uri, must_exist=True)
    except TrackingError as err:
        raise UsageError(str(err)) from None
    use_tracking(uri)
    return check_model(model)


def overlay(image, amap: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None = None):
    """RGB image with ``amap`` (S x S, any S) resized to it and blended in with the jet colour map; the
    outline of ``mask`` (already at the image's size) drawn in white."""
    from matplotlib import colormaps
    from PIL import Image

    scaled = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0, 1).astype(np.float32)
    resized = np.asarray(Image.fromarray(scaled).resize(image.size, Image.Resampling.BILINEAR))
    colour = (colormaps["jet"](np.clip(resized, 0, 1))[..., :3] * 255).astype(np.float32)
    blended = 0.5 * np.asarray(image, np.float32) + 0.5 * colour
    if mask is not None:
        blended[outline(mask)] = 255.0
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a bool mask (the mask minus its erosion), two pixels wide on large images."""
    from scipy import ndimage

    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    return ndimage.binary_dilation(edge) & mask if max(mask.shape) >= 512 else edge


def full_size_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An S x S defect mask resized (nearest) to an image's (width, height)."""
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0


def _names(paths: list[Path], suffix: str = "heatmap") -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        n = seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(f"{path.stem}{'' if n == 1 else f'-{n}'}_{suffix}.png")
    return names


def predict_command(args: argparse.Namespace) -> dict[str, Any]:
    """Execute ``adaptad predict``; returns ``{"images", "output", "model"}``."""
    import pandas as pd
    from PIL import Image

    from components.atomic import replace_dir
    from components.data import DataError, load_image

    out: Path = args.output
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise UsageError(f"--output {out}: exists and is not empty (use --force to replace it)")
    paths = [Path(p) for p in args.images]
    images = []
    for path in paths:  # every image decodes before anything else starts
        try:
            images.append(load_image(str(path)))
        except DataError as err:
            raise UsageError(str(err)) from None
    open_registry(args.tracking_uri, args.model)

    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(args.model)
        frame = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode("ascii") for p in paths]})
        result = model.predict(frame)
    except MlflowException as err:
        raise UsageError(f"--model {args.model}: {' '.join(str(err.message).split())}") from None
    except OSError as err:
        raise UsageError(f"{err.filename}: {err.strerror}") from None

    sizes = [int(s) for s in result["size"]]
    decided = "label" in result.columns  # the model carries its thresholds
    column = "map_normalized" if decided else "anomaly_map"
    maps = [np.asarray(m, np.float32).reshape(s, s) for m, s in zip(result[column], sizes, strict=True)]
    if decided:  # one scale for every model: the pixel threshold at 0.5
        vmin, vmax = 0.0, 1.0
        masks = [
            full_size_mask(np.asarray(m).reshape(s, s) > 0, image.size)
            for m, s, image in zip(result["defect_mask"], sizes, images, strict=True)
        ]
    else:
        values = np.concatenate([m.ravel() for m in maps])
        vmin, vmax = float(np.percentile(values, 1)), float(np.percentile(values, 99.9))
        masks = [None] * len(images)
    names, mask_names = _names(paths), _names(paths, "mask")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with (tmp / "scores.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["path", "score", "heatmap"] + (["label", "score_normalized", "mask"] if decided else [])
            )
            for i, (path, score, name) in enumerate(zip(paths, result["score"], names, strict=True)):
                row = [str(path), repr(float(score)), name]
                if decided:
                    row += [result["label"][i], repr(float(result["score_normalized"][i])), mask_names[i]]
                writer.writerow(row)
        for image, amap, mask, name, mask_name in zip(images, maps, masks, names, mask_names, strict=True):
            overlay(image, amap, vmin, vmax, mask).save(tmp / name)
            if mask is not None:
                Image.fromarray(mask.astype(np.uint8) * 255).save(tmp / mask_name)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"images": len(paths), "output": str(out), "model": args.model}
