"""GPU catalogue for the simulated device, from the vendors' datasheets.

Memory is the datasheet capacity (GiB for HBM cards, as CUDA reports them closely); TFLOP/s are
dense (no structured sparsity) peaks per precision; bandwidth is the datasheet memory bandwidth.
`overhead_bytes` is what the process loses before the first tensor: the CUDA context, the kernel
images and the cuBLAS/cuDNN workspaces; measured figures for these generations sit around
0.4-0.6 GiB with a recent PyTorch, so a conservative figure per architecture is used.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class GpuModel:
    name: str
    memory_bytes: int
    tflops_fp32: float
    tflops_fp16: float  # tensor-core dense, fp32 accumulate where the datasheet gives both
    tflops_bf16: float | None  # None: no bf16 support (pre-Ampere)
    bandwidth_gbs: float
    overhead_bytes: int
    architecture: str

    def tflops(self, precision: str) -> float:
        if precision == "fp32":
            return self.tflops_fp32
        if precision == "fp16-mixed":
            return self.tflops_fp16
        return self.tflops_bf16 or self.tflops_fp32

    @property
    def supports_bf16(self) -> bool:
        return self.tflops_bf16 is not None

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "memory_bytes": self.memory_bytes,
            "memory_gib": round(self.memory_bytes / GIB, 2),
            "tflops": {
                "fp32": self.tflops_fp32,
                "fp16": self.tflops_fp16,
                "bf16": self.tflops_bf16,
            },
            "bandwidth_gbs": self.bandwidth_gbs,
            "overhead_bytes": self.overhead_bytes,
            "architecture": self.architecture,
            "supports_bf16": self.supports_bf16,
        }


def _gpu(
    name: str,
    gib: float,
    fp32: float,
    fp16: float,
    bf16: float | None,
    bw: float,
    arch: str,
    overhead_mib: int = 512,
) -> GpuModel:
    return GpuModel(name, int(gib * GIB), fp32, fp16, bf16, bw, overhead_mib * MIB, arch)


GPU_CATALOGUE: dict[str, GpuModel] = {
    g.name: g
    for g in [
        _gpu("T4", 16, 8.1, 65, None, 320, "turing", 384),
        _gpu("V100-16GB", 16, 15.7, 125, None, 900, "volta", 384),
        _gpu("V100-32GB", 32, 15.7, 125, None, 900, "volta", 384),
        _gpu("A10", 24, 31.2, 125, 125, 600, "ampere"),
        _gpu("RTX-3090", 24, 35.6, 71, 71, 936, "ampere"),
        _gpu("A100-40GB", 40, 19.5, 312, 312, 1555, "ampere"),
        _gpu("A100-80GB", 80, 19.5, 312, 312, 2039, "ampere"),
        _gpu("L4", 24, 30.3, 121, 121, 300, "ada"),
        _gpu("RTX-4090", 24, 82.6, 165.2, 165.2, 1008, "ada"),
        _gpu("L40S", 48, 91.6, 362, 362, 864, "ada"),
        _gpu("H100-PCIe", 80, 51, 756, 756, 2000, "hopper", 640),
        _gpu("H100-80GB", 80, 67, 989, 989, 3350, "hopper", 640),
        _gpu("H200", 141, 67, 989, 989, 4800, "hopper", 640),
    ]
}
# Common spellings users type.
ALIASES = {"H100-SXM": "H100-80GB", "H100": "H100-80GB", "A100": "A100-80GB"}


def custom_gpu(memory_gib: float) -> GpuModel:
    """A card nobody catalogued: only its memory is known; compute figures borrow an A100's."""
    base = GPU_CATALOGUE["A100-80GB"]
    return GpuModel(
        f"custom-{memory_gib:g}GiB",
        int(memory_gib * GIB),
        base.tflops_fp32,
        base.tflops_fp16,
        base.tflops_bf16,
        base.bandwidth_gbs,
        base.overhead_bytes,
        "unknown",
    )
