"""GPU catalogue of the simulated device: what PyTorch sees on each card, with sources.

Memory is `torch.cuda.get_device_properties().total_memory` (cudaDeviceProp.totalGlobalMem): the
datasheet's GB less what the driver reserves, so an "80 GB" H100 SXM offers 81106 MiB and a
"24 GB" RTX 3090 24154 MiB. Where sources disagree (driver versions reserve different amounts) the
smallest cited figure is kept: a plan that fits on the smaller one fits on both.

Peaks are dense (no structured sparsity) datasheet TFLOP/s per math mode, and the datasheet memory
bandwidth. `matmul_tflops` are measured maxima of large square matmuls on the card
(zzc0721/torch-performance-test-data database.md @9d828276), the ceiling a well-shaped GEMM reaches
in practice; the throughput model starts from them.

Fixed costs outside the card's memory for tensors (`runtime.py`) depend on the software stack, not
on the card; the cuBLAS workspace size depends on the architecture (`sm`).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30
MIB = 1 << 20
CATALOGUE_VERSION = "2026.11-1"  # bump when a number below changes: plans record it


@dataclass(frozen=True)
class GpuModel:
    name: str
    memory_bytes: int  # total_memory as PyTorch reports it
    tflops_fp32: float  # CUDA cores
    tflops_tf32: float | None  # tensor cores, TF32 inputs (None: no TF32, pre-Ampere)
    tflops_fp16: float  # tensor cores, fp16 inputs with fp32 accumulation (PyTorch's choice)
    tflops_bf16: float | None  # None: no bf16 (pre-Ampere)
    bandwidth_gbs: float
    architecture: str
    sm: int  # compute capability x 10
    memory_source: str = ""
    # Measured large-GEMM maxima (TFLOP/s) for fp32 / fp16 / bf16 (None: not measured).
    matmul_tflops: tuple[float | None, float | None, float | None] = (None, None, None)

    def tflops(self, precision: str) -> float:
        """Datasheet peak of the math the precision's matmuls run in."""
        if precision == "fp32":
            return self.tflops_fp32
        if precision == "tf32":
            return self.tflops_tf32 or self.tflops_fp32
        if precision == "fp16-mixed":
            return self.tflops_fp16
        return self.tflops_bf16 or self.tflops_fp32

    @property
    def supports_bf16(self) -> bool:
        return self.tflops_bf16 is not None

    @property
    def supports_tf32(self) -> bool:
        return self.tflops_tf32 is not None

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "memory_bytes": self.memory_bytes,
            "memory_gib": round(self.memory_bytes / GIB, 2),
            "memory_source": self.memory_source,
            "tflops": {
                "fp32": self.tflops_fp32,
                "tf32": self.tflops_tf32,
                "fp16": self.tflops_fp16,
                "bf16": self.tflops_bf16,
            },
            "measured_matmul_tflops": dict(
                zip(("fp32", "fp16", "bf16"), self.matmul_tflops, strict=True)
            ),
            "bandwidth_gbs": self.bandwidth_gbs,
            "architecture": self.architecture,
            "compute_capability": f"{self.sm // 10}.{self.sm % 10}",
            "supports_bf16": self.supports_bf16,
            "supports_tf32": self.supports_tf32,
        }


_NVSMI = "thamada/nvidia-smi gls @c4c8a463"
_MODAL = "modal-labs/modal-client PR #2797"
GPU_CATALOGUE: dict[str, GpuModel] = {
    g.name: g
    for g in [
        GpuModel(
            "T4", 15095 * MIB, 8.1, None, 65, None, 320, "turing", 75,
            f"15095 MiB, Colab ({_MODAL}); sylvia-ymlin/cuda-kernels-from-scratch README",
            (4.4, 42.0, None),
        ),
        GpuModel(
            "V100-16GB", 16945512448, 15.7, None, 125, None, 900, "volta", 70,
            "16945512448 B, deviceQuery of Tesla V100-SXM2-16GB (several public logs)",
            (14.1, 94.8, None),
        ),
        GpuModel(
            "V100-32GB", 34089730048, 15.7, None, 125, None, 900, "volta", 70,
            "34089730048 B (godweiyang/GrabGPU #5; unattributed)",
            (14.1, 94.8, None),
        ),
        GpuModel(
            "A10", 23609475072, 31.2, 62.5, 125, 125, 600, "ampere", 86,
            f"23609475072 B ({_MODAL}; aalanwyr/face2cuda step2cuda/README.md)",
        ),
        GpuModel(
            "RTX-3090", 25327697920, 35.6, 35.6, 71, 71, 936, "ampere", 86,
            f"25327697920 B = 24576 MiB less 422 MiB reserved ({_NVSMI}); older drivers "
            "report 24259-24268 MiB (transformers docs)",
            (24.5, 75.6, 76.3),
        ),
        GpuModel(
            "A100-40GB", 42298834944, 19.5, 156, 312, 312, 1555, "ampere", 80,
            f"42298834944 B ({_MODAL}; bottlerocket-os/bottlerocket PR #3873)",
            (19.2, 259.0, 265.0),
        ),
        GpuModel(
            "A100-80GB", 85100068864, 19.5, 156, 312, 312, 2039, "ampere", 80,
            f"85100068864 B = 81920 MiB less 763 MiB reserved ({_NVSMI}; deviceQuery)",
            (19.2, 259.0, 265.0),
        ),
        GpuModel(
            "L4", 23570219008, 30.3, 60, 121, 121, 300, "ada", 89,
            f"23570219008 B = 23034 MiB less 556 MiB reserved ({_NVSMI})",
            (15.4, 68.8, 70.9),
        ),
        GpuModel(
            "RTX-4090", 25386352640, 82.6, 82.6, 165.2, 165.2, 1008, "ada", 89,
            f"25386352640 B = 24564 MiB less 354 MiB reserved ({_NVSMI})",
            (46.0, 162.0, 163.0),
        ),
        GpuModel(
            "L40S", 47803596800, 91.6, 183, 362, 362, 864, "ada", 89,
            f"47803596800 B = 46068 MiB less 479 MiB reserved ({_NVSMI})",
            (46.9, 264.0, 269.0),
        ),
        GpuModel(
            "H100-PCIe", 81008 * MIB, 51, 378, 756, 756, 2000, "hopper", 90,
            "total_memory=81008MB in a public torch device-properties print (unattributed)",
            (37.0, 458.0, 496.0),
        ),
        GpuModel(
            "H100-80GB", 85045477376, 67, 494.5, 989, 989, 3350, "hopper", 90,
            f"85045477376 B = 81559 MiB less 454 MiB reserved ({_NVSMI})",
            (51.9, 760.0, 798.0),
        ),
        GpuModel(
            "H200", 143156 * MIB, 67, 494.5, 989, 989, 4800, "hopper", 90,
            "total_memory=143156MB in a torch device-properties print (modal-labs examples)",
            (51.3, 759.0, 790.0),
        ),
    ]
}  # fmt: skip
# Common spellings users type.
ALIASES = {"H100-SXM": "H100-80GB", "H100": "H100-80GB", "A100": "A100-80GB"}


def canonical_name(name: str) -> str:
    """The catalogue's name for a card a spec names (a common spelling resolved)."""
    return ALIASES.get(name, name)


def custom_gpu(memory_gib: float, base: GpuModel | None = None) -> GpuModel:
    """A card of `memory_gib` GiB: a catalogued card capped (`base`), or one nobody catalogued,
    whose compute figures borrow an A100's."""
    card = base or GPU_CATALOGUE["A100-80GB"]
    name = f"{card.name}@{memory_gib:g}GiB" if base else f"custom-{memory_gib:g}GiB"
    return GpuModel(
        name,
        int(memory_gib * GIB),
        card.tflops_fp32,
        card.tflops_tf32,
        card.tflops_fp16,
        card.tflops_bf16,
        card.bandwidth_gbs,
        card.architecture if base else "unknown",
        card.sm,
        "capped by the spec's memory_gib",
        card.matmul_tflops,
    )


# Interconnect between the GPUs of one node, GB/s per direction per GPU, from each datasheet:
# NVLink totals are bidirectional (A100 600 GB/s, H100/H200 900 GB/s, V100 SXM2 300 GB/s), so
# half goes each way; PCIe x16 per direction is 15.75 (3.0), 31.5 (4.0), 63 (5.0) GB/s (PCI-SIG).
PCIE3, PCIE4, PCIE5 = 15.75, 31.5, 63.0
INTRA_NODE_GBS: dict[str, tuple[float, str]] = {
    "T4": (PCIE3, "PCIe 3.0 x16 (T4 datasheet)"),
    "V100-16GB": (150.0, "NVLink 2, 300 GB/s bidirectional (V100 SXM2 datasheet)"),
    "V100-32GB": (150.0, "NVLink 2, 300 GB/s bidirectional (V100 SXM2 datasheet)"),
    "A10": (PCIE4, "PCIe 4.0 x16 (A10 datasheet)"),
    "RTX-3090": (PCIE4, "PCIe 4.0 x16 (no NVLink bridge assumed)"),
    "A100-40GB": (300.0, "NVLink 3, 600 GB/s bidirectional (A100 SXM datasheet)"),
    "A100-80GB": (300.0, "NVLink 3, 600 GB/s bidirectional (A100 SXM datasheet)"),
    "L4": (PCIE4, "PCIe 4.0 x16 (L4 datasheet)"),
    "RTX-4090": (PCIE4, "PCIe 4.0 x16 (no NVLink)"),
    "L40S": (PCIE4, "PCIe 4.0 x16 (L40S datasheet, no NVLink)"),
    "H100-PCIe": (PCIE5, "PCIe 5.0 x16 (H100 PCIe datasheet; no NVLink bridge assumed)"),
    "H100-80GB": (450.0, "NVLink 4, 900 GB/s bidirectional (H100 SXM datasheet)"),
    "H200": (450.0, "NVLink 4, 900 GB/s bidirectional (H200 datasheet)"),
}
# Between nodes: one 400 Gb/s NIC per GPU (InfiniBand NDR / ConnectX-7, as in a DGX H100):
# 50 GB/s per direction. An assumption about the cluster, not the card: stated in each plan.
INTER_NODE_GBS = 50.0


# The card's link to the host, GB/s per direction (PCI-SIG rates as above; each datasheet's
# PCIe generation): what activation offload copies through. SXM cards sit on PCIe too.
HOST_LINK_GBS: dict[str, tuple[float, str]] = {
    "T4": (PCIE3, "PCIe 3.0 x16 (T4 datasheet)"),
    "V100-16GB": (PCIE3, "PCIe 3.0 x16 (V100 datasheet: 32 GB/s bidirectional)"),
    "V100-32GB": (PCIE3, "PCIe 3.0 x16 (V100 datasheet: 32 GB/s bidirectional)"),
    "A10": (PCIE4, "PCIe 4.0 x16 (A10 datasheet)"),
    "RTX-3090": (PCIE4, "PCIe 4.0 x16"),
    "A100-40GB": (PCIE4, "PCIe 4.0 x16 (A100 datasheet: 64 GB/s bidirectional)"),
    "A100-80GB": (PCIE4, "PCIe 4.0 x16 (A100 datasheet: 64 GB/s bidirectional)"),
    "L4": (PCIE4, "PCIe 4.0 x16 (L4 datasheet)"),
    "RTX-4090": (PCIE4, "PCIe 4.0 x16"),
    "L40S": (PCIE4, "PCIe 4.0 x16 (L40S datasheet)"),
    "H100-PCIe": (PCIE5, "PCIe 5.0 x16 (H100 datasheet: 128 GB/s bidirectional)"),
    "H100-80GB": (PCIE5, "PCIe 5.0 x16 (H100 datasheet: 128 GB/s bidirectional)"),
    "H200": (PCIE5, "PCIe 5.0 x16 (H200 datasheet: 128 GB/s bidirectional)"),
}
# Pinned-memory copies reach about 80% of the link's rate (the same assumption as the input
# copy's in the time model); stated, not calibrated: no published offload step times here.
PINNED_COPY_EFFICIENCY = 0.8


def host_link_bytes_s(gpu: GpuModel) -> float:
    """Bytes/s one way between the card and pinned host memory."""
    return _per_card(HOST_LINK_GBS, gpu) * 1e9 * PINNED_COPY_EFFICIENCY


def intra_node_gbs(gpu: GpuModel) -> float:
    """The card's link to its node peers."""
    return _per_card(INTRA_NODE_GBS, gpu)


def _per_card(table: dict[str, tuple[float, str]], gpu: GpuModel) -> float:
    """A link rate of the card's table: a capped or custom card uses its base's, else PCIe 4."""
    return table.get(gpu.name.split("@")[0], (PCIE4, ""))[0]
