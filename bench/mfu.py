"""Model FLOP utilisation for the GPU benchmarks: exact FLOP counts of a model call with
`torch.utils.flop_counter`, and the device's dense bf16 peak to divide by."""

from __future__ import annotations

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s. Matched
# against torch.cuda.get_device_name() in order; first match wins.
PEAK_BF16_DENSE_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),  # SXM / HBM3
    ("A100", 312.0),
    ("L40S", 362.05),
    ("L4", 121.0),
    ("A10G", 70.0),
)


def peak_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_DENSE_TFLOPS:
        if key in device_name:
            return peak
    return None


def count_flops(fn) -> int:
    """FLOPs of everything `fn()` runs (matmuls and convolutions, forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def utilisation(flops_per_image: float, images_per_s: float, device_name: str) -> dict:
    """Achieved TFLOP/s and MFU (fraction of the dense bf16 peak) at a throughput."""
    achieved = flops_per_image * images_per_s / 1e12
    peak = peak_tflops(device_name)
    return {"tflops": round(achieved, 2), "mfu": round(achieved / peak, 4) if peak else None}
