"""The CPU's instruction set as it bears on int8 inference (numpy-free, torch-free).

onnxruntime's x86 int8 kernels multiply uint8 activations by int8 weights. With VNNI
(``vpdpbusd``, AVX-512 VNNI or AVX-VNNI) products accumulate in int32 and the result is exact.
Without VNNI (plain AVX2 or AVX-512) they use ``vpmaddubsw``, which adds two adjacent u8*s8
products into an int16 *with saturation*: 255*127*2 = 64,770 does not fit in 32,767, so the
result depends on the weights, the activations and the CPU that runs them. Weights limited to
7 bits ([-64, 63]) keep every pair within 255*64*2 = 32,640: exact on every x86 CPU.
Arm kernels (NEON, with or without the dot-product extension) accumulate in 32 bits.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

X86_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")
# flags worth printing, in the order a reader looks for them
REPORTED = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
            "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve", "bf16")


# (family, precision, flag that enables it or None, MACs per cycle and core, basis): the first row that applies wins
PEAKS = (
    ("x86", "fp32", "avx512f", 32, "AVX-512 FMA: 2 ports x 16 fp32 lanes"),
    ("x86", "fp32", "fma", 16, "AVX2 FMA: 2 ports x 8 fp32 lanes"),
    ("x86", "fp32", None, 8, "SSE/AVX without FMA: 2 ports x 4 lanes (mul + add)"),
    ("x86", "int8", "amx_int8", 1024, "AMX TMUL: 1,024 int8 MACs per cycle"),
    ("x86", "int8", "avx512_vnni", 128, "AVX-512 VNNI vpdpbusd: 2 ports x 64 u8*s8 MACs"),
    ("x86", "int8", "avx_vnni", 64, "AVX-VNNI vpdpbusd (256-bit): 2 ports x 32 MACs"),
    ("x86", "int8", "avx512bw", 128, "AVX-512BW vpmaddubsw: 2 ports x 64 u8*s8 products (int16 pairs, then vpmaddwd)"),
    ("x86", "int8", "avx2", 64, "AVX2 vpmaddubsw: 2 ports x 32 u8*s8 products (int16 pairs, then vpmaddwd)"),
    ("x86", "int8", None, 16, "SSE4 pmaddubsw: 16 products"),
    ("arm", "fp32", None, 8, "NEON FMA: 2 pipes x 4 fp32 lanes"),
    ("arm", "int8", "i8mm", 64, "NEON i8mm smmla: 2 pipes x 32 MACs"),
    ("arm", "int8", "asimddp", 32, "NEON sdot: 2 pipes x 16 MACs"),
    ("arm", "int8", None, 16, "NEON widening multiply-accumulate"),
)


@dataclass(frozen=True)
class Isa:
    arch: str                  # x86_64, aarch64, ...
    flags: tuple[str, ...]     # the REPORTED flags present
    model: str = ""            # CPU model name where the OS says it
    ghz: float | None = None   # the clock the OS reports (/proc/cpuinfo "cpu MHz"; a VM reports its nominal clock)

    @property
    def family(self) -> str:
        return "x86" if self.arch in ("x86_64", "amd64", "i686", "x86") else (
            "arm" if self.arch.startswith(("aarch64", "arm")) else self.arch)

    @property
    def vnni(self) -> bool:
        return any(f in self.flags for f in X86_VNNI)

    @property
    def int8_kernels(self) -> str:
        """How onnxruntime multiplies int8 here, in words a reader can check against its docs."""
        if self.family == "x86":
            if self.vnni:
                return "VNNI (vpdpbusd, int32 accumulation: exact)"
            if "avx2" in self.flags or "avx512f" in self.flags:
                return "AVX2/AVX-512 without VNNI (vpmaddubsw, int16 pairs saturate with 8-bit weights)"
            return "SSE (no AVX2)"
        if self.family == "arm":
            return "NEON dot product (int32 accumulation: exact)" if "asimddp" in self.flags else \
                "NEON (widening multiply, int32 accumulation: exact)"
        return "unknown"

    @property
    def u8s8_exact(self) -> bool:
        """Whether onnxruntime's uint8 x int8 kernels give the exact integer result with full 8-bit weights."""
        return self.family != "x86" or self.vnni

    def peak_macs_per_cycle(self, precision: str, *, matrix: bool = True) -> tuple[int, str]:
        """Upper bound of multiply-accumulates per cycle and core for ``fp32`` or ``int8``, from the ISA alone,
        with the assumption it rests on (two vector FMA / multiply ports, as on most server and desktop cores;
        parts with one 512-bit port reach half of the AVX-512 figures)."""
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be fp32 or int8, got {precision!r}")
        for family, prec, flag, macs, basis in PEAKS:
            if not matrix and flag is not None and flag.startswith("amx"):
                continue  # the vector units' peak: what kernels without matrix-engine code (XNNPACK, LiteRT) can reach
            if family == self.family and prec == precision and (flag is None or flag in self.flags):
                return macs, basis
        return 1, "unknown architecture: one MAC per cycle"

    def peak_gmacs(self, precision: str, threads: int = 1, ghz: float | None = None, *, matrix: bool = True) -> dict:
        """Peak GMAC/s for ``threads`` cores at ``ghz`` (default: the clock the OS reports); ``matrix=False``:
        of the vector units alone (no AMX)."""
        per_cycle, basis = self.peak_macs_per_cycle(precision, matrix=matrix)
        ghz = ghz if ghz is not None else self.ghz
        return {"precision": precision, "threads": threads, "ghz": ghz, "macs_per_cycle": per_cycle, "basis": basis,
                "gmacs": None if not ghz else round(per_cycle * ghz * threads, 1)}

    def record(self) -> dict:
        return {**asdict(self), "flags": list(self.flags), "int8_kernels": self.int8_kernels,
                "u8s8_exact": self.u8s8_exact}

    def __str__(self) -> str:
        return f"{self.arch} [{' '.join(self.flags) or 'no SIMD flags found'}]: {self.int8_kernels}"


def parse_cpuinfo(text: str, arch: str) -> Isa:
    flags: set[str] = set()
    model = ""
    ghz: float | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags.update(value.split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key == "cpu mhz" and ghz is None:
            try:
                ghz = round(float(value) / 1000.0, 3) or None
            except ValueError:
                pass
    return Isa(arch=arch, flags=tuple(f for f in REPORTED if f in flags), model=model, ghz=ghz)


def host_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> Isa:
    """This machine's ISA (Linux reads /proc/cpuinfo; elsewhere only the architecture is known)."""
    arch = platform.machine().lower() or "unknown"
    try:
        return parse_cpuinfo(cpuinfo.read_text(errors="replace"), arch)
    except OSError:
        return Isa(arch=arch, flags=())


def target_isa(flags: list[str] | tuple[str, ...] | None, arch: str | None) -> Isa | None:
    """A device profile's ISA (``isa = [...]``, ``arch = "..."`` in devices/*.toml); None when it names none."""
    if not flags and not arch:
        return None
    return Isa(arch=(arch or "unknown").lower(), flags=tuple(f for f in REPORTED if f in set(flags or ())))
