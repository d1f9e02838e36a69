"""Who ran a verification: host name, OS, Python, runtime versions and the accelerators found (torch-free).

Recorded in every device report, so a result says which machine and which runtime produced it.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# distributions whose versions decide what an artifact computes on a device
RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "ai-edge-litert", "tflite-runtime", "executorch", "tensorrt",
                         "numpy")
EDGETPU_USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}  # Coral USB Accelerator before / after its firmware loads


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip("\x00\n ")
    except OSError:
        return None


def os_name() -> str:
    """``PRETTY_NAME`` of /etc/os-release where there is one, else what ``platform`` says."""
    text = _read("/etc/os-release") or ""
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return f"{platform.system()} {platform.release()}".strip()


def accelerators() -> list[str]:
    """Accelerators this machine exposes: onnxruntime's non-CPU providers, Jetson boards, NVIDIA GPUs, Edge TPUs."""
    found: list[str] = []
    try:
        import onnxruntime as ort

        found += [f"onnxruntime {p}" for p in ort.get_available_providers()
                  if p not in ("CPUExecutionProvider", "AzureExecutionProvider")]  # Azure: remote endpoints, not a chip
    except ImportError:
        pass
    model = _read("/proc/device-tree/model")
    if model and ("jetson" in model.lower() or "nvidia" in model.lower()):
        found.append(f"board: {model}")
    if Path("/dev/nvidia0").exists() or Path("/dev/nvhost-gpu").exists():
        found.append("NVIDIA GPU device node")
    if any(Path("/dev").glob("apex_*")):
        found.append("Edge TPU (PCIe/M.2, /dev/apex_*)")
    for dev in Path("/sys/bus/usb/devices").glob("*"):
        ids = (_read(str(dev / "idVendor")), _read(str(dev / "idProduct")))
        if ids in EDGETPU_USB_IDS:
            found.append("Edge TPU (USB Accelerator)")
            break
    return found


def machine_identity() -> dict:
    """Host name, OS, kernel, CPU architecture, Python, edgec and runtime versions, accelerators found."""
    from .. import __version__

    return {"hostname": platform.node(), "os": os_name(), "kernel": platform.release(), "arch": platform.machine(),
            "python": platform.python_version(), "edgec": __version__,
            "runtimes": {d: v for d in RUNTIME_DISTRIBUTIONS if (v := _version(d)) is not None},
            "accelerators": accelerators()}


__all__ = ["machine_identity", "accelerators", "os_name"]
