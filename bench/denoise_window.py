"""Denoise's NLM search window on real photos: PSNR gain against the photo, by noise level.

    python bench/denoise_window.py [--photos ../shared/photos] [--json out.json]

Each photo (every 4th dreambooth photo, 8 of them) is halved (INTER_AREA, which lowers its own
noise) and taken as the reference; Gaussian noise of sigma 1 to 9 is added; the op's NLM runs
with the strength it would pick from the estimated sigma, at three window settings. A positive
gain means the output is closer to the photo than the noisy input was; a negative one means
the filter removed more of the photo (texture read as noise) than noise. Times are per call,
one thread, in the same process.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ops.metrics import psnr  # noqa: E402
from ops.restore import nlm_denoise  # noqa: E402
from ops.scores import noise_sigma  # noqa: E402

WINDOWS = ((11, 7), (7, 7), (5, 5))  # (search, template)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "photos"))
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    paths = sorted(pathlib.Path(args.photos).glob("dreambooth__*.jpg"))[::4][:8]
    if not paths:
        print(f"no photos under {args.photos}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    rows = []
    for path in paths:
        img = np.asarray(Image.open(path).convert("RGB"))
        ref = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
        for sigma in (1.0, 2.0, 3.0, 4.0, 6.0, 9.0):
            noisy = np.clip(ref + rng.normal(0, sigma, ref.shape) + 0.5, 0, 255).astype(np.uint8)
            est = noise_sigma(cv2.cvtColor(noisy, cv2.COLOR_RGB2GRAY))
            h = float(np.clip(1.1 * est, 2.0, 30.0))
            row = {"photo": path.stem, "added_sigma": sigma, "estimated_sigma": round(est, 2)}
            for search, template in WINDOWS:
                t0 = time.perf_counter()
                out = nlm_denoise(noisy, h, template_window=template, search_window=search)
                row[f"gain_db_{search}/{template}"] = round(psnr(out, ref) - psnr(noisy, ref), 2)
                row[f"ms_{search}/{template}"] = round(1000 * (time.perf_counter() - t0), 1)
            rows.append(row)
            print(row, flush=True)
    below = [r for r in rows if r["estimated_sigma"] < 5.0]
    for search, template in WINDOWS:
        k = f"{search}/{template}"
        print(f"search {k}: mean gain below estimated sigma 5: {np.mean([r['gain_db_' + k] for r in below]):+.2f} dB, "
              f"from 5: {np.mean([r['gain_db_' + k] for r in rows if r not in below]):+.2f} dB, {np.mean([r['ms_' + k] for r in rows]):.0f} ms")  # fmt: skip
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
