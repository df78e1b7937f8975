"""`corejax quantize`: a GGUF model (F32/F16/BF16, or already quantized) or an HF Llama-family folder -> a GGUF
file with its matrices in Q8_0, Q4_0 or Q4_1, every metadata key (architecture, tokenizer, chat template)
carried over or converted (loading/hf_gguf.py), so the result is a complete model for corejax and llama.cpp alike.

The block math (llama.cpp's reference quantizers, bit-exact with gguf-py's) lives beside its dequantizers in
corejax/loading/ggml_quants.py, the one home of ggml's block formats; gguf-py's GGUFWriter writes the file.
The source is read with corejax's bounds-checked reader, not gguf-py's.
Which tensors: every 2-D matrix whose rows split into blocks of 32 (token embedding and output head included,
as llama.cpp's Q8_0 does) and every 3-D stack of expert matrices (a mixture of experts' [E, out, in]); 1-D
tensors (norms) stay float32, as in llama.cpp.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from corejax.errors import InvalidParameterError, UnsupportedModelError
from corejax.loading.ggml_quants import QK, bytes_per_block, normalize_type, quantize_tensor
from corejax.loading.hf_gguf import SourceTensor

_FILE_TYPE = {"Q8_0": 7, "Q4_0": 2, "Q4_1": 3}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
_QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION

@dataclasses.dataclass
class QuantizeReport:
    """What quantize_gguf wrote, and the error it added against the float values it started from (the source's
    tensors as stored, dequantized exactly): max and mean |error| and the relative RMS error over all quantized
    values."""

    source: str
    output: str
    qtype: str
    quantized: int
    kept: int
    source_bytes: int
    output_bytes: int
    max_abs_error: float
    mean_abs_error: float
    relative_rms_error: float
    seconds: float

    def summary(self) -> str:
        return (f"{self.output}: {self.quantized} tensors as {self.qtype}, {self.kept} kept as stored; "
                f"{self.source_bytes / 1e6:.1f} MB -> {self.output_bytes / 1e6:.1f} MB in {self.seconds:.1f} s; "
                f"error vs the source's values: max {self.max_abs_error:.3g}, mean {self.mean_abs_error:.3g}, "
                f"relative RMS {self.relative_rms_error:.3g}")


def quantize_gguf(source: str | os.PathLike, output: str | os.PathLike, qtype: str = "Q8_0", *,
                  progress: bool = True) -> QuantizeReport:
    """Writes `output`, a GGUF model with the matrices of `source` quantized to `qtype`.

    source: a GGUF file (any tensor types corejax reads; quantized ones are dequantized exactly, then
    re-quantized, and tensors already in `qtype` are copied byte for byte), or an HF folder of a Llama-family
    checkpoint with a byte-level BPE tokenizer.json (converted as llama.cpp's convert_hf_to_gguf.py does)."""
    qtype = normalize_type(qtype)
    source, output = Path(source), Path(output)
    if not source.exists():
        from corejax.errors import ModelNotFoundError

        raise ModelNotFoundError(f"{source}: no such file or folder; give a .gguf model or an HF folder")
    if output.exists() and output.resolve() == source.resolve():
        raise InvalidParameterError(f"the output {output} would overwrite the source; give another path")
    start = time.perf_counter()
    tmp = output.with_name(output.name + ".part")
    try:
        if source.is_dir():
            from corejax.loading.hf_gguf import hf_as_gguf

            with hf_as_gguf(source) as (arch, metadata, tensors):
                stats = _write(tmp, arch, metadata, tensors, qtype, progress)
        else:
            with _gguf_source(source) as (arch, metadata, tensors):
                stats = _write(tmp, arch, metadata, tensors, qtype, progress)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, output)
    quantized, kept, err_max, err_sum, sq_err, sq_ref, count = stats
    source_bytes = (sum(f.stat().st_size for f in source.glob("*.safetensors")) if source.is_dir()
                    else source.stat().st_size)
    return QuantizeReport(
        str(source), str(output), qtype, quantized, kept, source_bytes, output.stat().st_size,
        err_max, err_sum / max(count, 1), float(np.sqrt(sq_err / sq_ref)) if sq_ref else 0.0,
        time.perf_counter() - start)


class _gguf_source:
    """A GGUF file as (arch, metadata [(key, value, type, element type)], [SourceTensor]), read with corejax's
    bounds-checked reader."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> tuple[str, list, list[SourceTensor]]:
        from corejax.loading.ggml_quants import dequantize
        from corejax.loading.gguf import read_gguf

        self.f = f = read_gguf(self.path)
        metadata = [(k, v, *f.metadata_types[k]) for k, v in f.metadata.items()]
        tensors = []
        for name, info in f.tensors.items():
            def rows(start=0, stop=None, info=info):
                if len(info.shape) == 1:
                    return dequantize(f.raw(info.name), info.ggml_type, info.shape)
                per_row = info.nbytes // info.shape[0]
                stop = info.shape[0] if stop is None else stop
                data = f.raw(info.name)[start * per_row:stop * per_row]
                return dequantize(data, info.ggml_type, (stop - start, *info.shape[1:]))

            tensors.append(SourceTensor(name, info.shape, rows, info.ggml_type,
                                        lambda info=info: np.array(f.raw(info.name))))
        return f.architecture, metadata, tensors

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def _write(tmp: Path, arch: str, metadata: list, tensors: list[SourceTensor], qtype: str, progress: bool) -> tuple:
    """Streams one GGUF file: header and metadata, the tensor directory, then each tensor quantized (or copied)
    as it is read, so memory holds one tensor at a time."""
    import gguf
    from tqdm.auto import tqdm

    from corejax.loading.ggml_quants import GGMLType

    target = gguf.GGMLQuantizationType[qtype]
    VT = gguf.GGUFValueType
    writer = gguf.GGUFWriter(str(tmp), arch)
    for key, value, vtype, sub in metadata:
        if key in ("general.architecture", "general.alignment", "general.file_type", "general.quantization_version"):
            continue
        if vtype == VT.ARRAY and sub == VT.ARRAY:
            raise UnsupportedModelError(f"metadata key {key!r} nests arrays, which this writer cannot copy")
        if isinstance(value, np.ndarray):
            value = value.tolist()
        writer.add_key_value(key, value, VT(vtype), None if sub is None else VT(sub))
    writer.add_file_type(_FILE_TYPE[qtype])
    writer.add_quantization_version(_QUANTIZATION_VERSION)
    plan = []
    for t in tensors:
        lead = int(np.prod(t.shape[:-1]))
        if len(t.shape) in (2, 3) and t.shape[-1] % QK == 0 and t.stored_type != GGMLType[qtype]:
            row_bytes, dtype, how = t.shape[-1] // QK * bytes_per_block(qtype), target, "quantize"
        elif t.stored_type is not None:
            row_bytes = None
            dtype, how = gguf.GGMLQuantizationType(int(t.stored_type)), "copy"
        else:
            row_bytes, dtype, how = t.shape[-1] * 4, gguf.GGMLQuantizationType.F32, "f32"
        if row_bytes is None:
            from corejax.loading.ggml_quants import tensor_nbytes

            row_bytes = tensor_nbytes(t.stored_type, t.shape) // lead
        writer.add_tensor_info(t.name, (*t.shape[:-1], row_bytes), np.dtype(np.uint8), lead * row_bytes,
                               raw_dtype=dtype)
        plan.append((t, how))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    err_max, err_sum, sq_err, sq_ref, count = 0.0, 0.0, 0.0, 0.0, 0
    quantized = kept = 0
    bar = tqdm(total=len(plan), desc=f"quantizing to {qtype}", unit="tensor", disable=not progress, leave=False)
    for t, how in plan:
        if how == "quantize":
            q, stats = _requantize(t, qtype)
            err_max = max(err_max, stats[0])
            err_sum, sq_err, sq_ref, count = (err_sum + stats[1], sq_err + stats[2], sq_ref + stats[3],
                                              count + stats[4])
            writer.write_tensor_data(q)
            quantized += 1
        else:
            data = t.raw() if how == "copy" else np.ascontiguousarray(t.rows(), np.float32).view(np.uint8)
            writer.write_tensor_data(data.reshape(-1))  # as stored, byte for byte
            kept += 1
        bar.update(1)
    bar.close()
    writer.close()
    return quantized, kept, err_max, err_sum, sq_err, sq_ref, count


def _requantize(t: SourceTensor, qtype: str) -> tuple[np.ndarray, tuple[float, float, float, float, int]]:
    """One [rows, in] tensor -> (its bytes in `qtype`, (max |err|, sum |err|, sum err^2, sum value^2, n)),
    a slab of rows at a time, so the float32 copies stay small whatever the tensor's size. A stack of experts
    [E, out, in] is its E * out rows, read an expert at a time."""
    from corejax.loading.ggml_quants import GGMLType, dequantize

    if len(t.shape) == 3:
        experts, per, cols = t.shape
        parts = [_requantize(SourceTensor(t.name, (per, cols), lambda a=0, b=None, e=e: np.asarray(
            t.rows(e, e + 1), np.float32).reshape(per, cols)[a:b], t.stored_type, t.raw), qtype)
            for e in range(experts)]
        stats = [p[1] for p in parts]
        return (np.concatenate([p[0] for p in parts]),
                (max(s[0] for s in stats), *(sum(s[i] for s in stats) for i in range(1, 5))))
    rows, cols = t.shape
    out = np.empty((rows, cols // QK * bytes_per_block(qtype)), np.uint8)
    step = max(1, (1 << 20) // cols)
    e_max, e_sum, e_sq, v_sq = 0.0, 0.0, 0.0, 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        for r in range(0, rows, step):
            n = min(step, rows - r)
            w = np.asarray(t.rows(r, r + n), np.float32)
            q = out[r:r + n] = quantize_tensor(w, qtype)
            diff = np.abs(dequantize(q.reshape(-1), GGMLType[qtype], (n, cols)) - w).astype(np.float64)
            e_max = max(e_max, float(diff.max()))
            e_sum += float(diff.sum())
            e_sq += float(np.square(diff).sum())
            v_sq += float(np.square(w.astype(np.float64)).sum())
    return out, (e_max, e_sum, e_sq, v_sq, rows * cols)


def cmd_quantize(args: Any) -> int:
    """`corejax quantize SOURCE OUTPUT [-t TYPE]` (its flags: corejax/cli.py)."""
    from corejax import hub

    source = Path(args.source)
    if not source.exists():
        resolved = hub.resolve(args.source, progress=not args.quiet)
        if resolved.format != "gguf":
            raise UnsupportedModelError(f"{args.source} is an HF folder; corejax quantize reads GGUF files so far")
        source = resolved.path
    report = quantize_gguf(source, args.output, args.type, progress=not args.quiet)
    print(report.summary())
    return 0
