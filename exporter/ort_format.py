"""``export --ort-format``: every variant also in onnxruntime's ORT format (the format of its minimal and mobile
builds), with the operator config a minimal build is compiled from. Verified like the .onnx files, on the same
probes and thresholds (verify runs both).

The "Runtime" optimization style: basic optimizations are applied now and the rest are recorded for the device
to replay, so the file is not tied to the exporting CPU (the "Fixed" style bakes this CPU's kernels in; on
MiniLM it also turns the fp16 weights back into fp32 for the x86 kernels, 67.7 MB against 45.5 MB).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path

from .errors import ExporterError, UnsupportedError
from .onnx_export import OnnxArtifact

OPERATORS_CONFIG = "required_operators_and_types.config"


def to_ort_format(artifacts: dict[str, OnnxArtifact], staging: Path) -> tuple[dict[str, Path], Path]:
    """The .ort file beside each variant's .onnx, and the operator config of them all (type-reduced)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    if any(a.data_files for a in artifacts.values()):
        raise UnsupportedError("--ort-format: the ORT format has no external data, and this model's fp32 graph is "
                               "over 2 GB; export without --ort-format")
    graphs = {a.path.parent for a in artifacts.values()}
    if len(graphs) != 1:
        raise ExporterError("internal: the variants are not in one folder")
    folder = graphs.pop()
    work = staging / ".ort-format"
    work.mkdir()
    try:
        for a in artifacts.values():
            shutil.copyfile(a.path, work / a.path.name)
        # Converts every .onnx in the folder; writes NAME.with_runtime_opt.ort and one config. The tool logs its
        # progress at INFO through a root handler it installs: its messages are not ours to print.
        root_log = logging.getLogger()
        handlers, level = list(root_log.handlers), root_log.level
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                convert_onnx_models_to_ort(work, output_dir=work, optimization_styles=[OptimizationStyle.Runtime],
                                           enable_type_reduction=True)
        finally:
            root_log.handlers[:] = handlers
            root_log.setLevel(level)
            logging.getLogger("ort_format_model").setLevel(logging.WARNING)
        out = {}
        for name, a in artifacts.items():
            made = work / f"{a.path.stem}.with_runtime_opt.ort"
            if not made.is_file():
                raise ExporterError(f"--ort-format: onnxruntime wrote no ORT file for {a.path.name}")
            out[name] = folder / f"{a.path.stem}.ort"
            made.replace(out[name])
        config = folder / OPERATORS_CONFIG
        made_config = next(work.glob("required_operators_and_types*.config"), None)
        if made_config is None:
            raise ExporterError("--ort-format: onnxruntime wrote no operator config")
        # Its first lines name the files it read (in the work folder, a machine path): name the bundle's.
        lines = [ln for ln in made_config.read_text(encoding="utf-8").splitlines() if not ln.startswith("#")]
        header = ["# Operators and types of the ORT format variants, for an onnxruntime minimal build",
                  "# (build.py --minimal_build --include_ops_by_config THIS_FILE --enable_reduced_operator_type_support):"]
        header += [f"# - {p.name}" for p in out.values()]
        config.write_text("\n".join(header + lines) + "\n", encoding="utf-8")
        return out, config
    finally:
        shutil.rmtree(work, ignore_errors=True)
