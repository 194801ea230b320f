"""What every model family's builder shares (build side): the context the steps of one export travel with, and
the reference files every family writes alike. The families are family_encoder.py and family_decoder.py,
registered in families.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import BASE_OUTPUTS_NPZ, INPUTS_NPZ, OUTPUTS_NPZ, PROBES_JSON, REFERENCE_DIR, write_json
from .spec import ExportSpec
from .stages import Stages
from .tasks import TaskSpec

Arrays = list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class BuildContext:
    """What every step of one export shares; it travels as one object instead of eight arguments."""

    spec: ExportSpec
    modes: tuple[str, ...]
    stages: Stages
    base: Any  # loading.BaseRef
    arch: Any  # tasks.ArchSpec | tasks.DecoderArchSpec
    task: TaskSpec
    staging: Path
    adapter: Any = None  # loading.AdapterRef: the merged one, or the first of the swappable ones


class FamilyBuild:
    """The part of a builder every family has: the probe feeds (fixed by the family's probe step) and the
    reference files written from them."""

    family = ""

    def __init__(self, task: TaskSpec) -> None:
        self.task = task
        self.names: tuple[str, ...] = ()
        self.feeds: Arrays = []
        self.probes_json: dict[str, Any] = {}  # probes.json: the texts and how the batches use them

    def write_reference(self, staging: Path, reference: Arrays, base: Arrays | None) -> None:
        """probes.json, the probe inputs, PyTorch's outputs and (merged bundles) the base's outputs."""
        from .probes import save_arrays

        (staging / REFERENCE_DIR).mkdir(exist_ok=True)
        write_json(staging / PROBES_JSON, self.probes_json)
        save_arrays(staging / INPUTS_NPZ, self.feeds)
        save_arrays(staging / OUTPUTS_NPZ, reference)
        if base is not None:
            save_arrays(staging / BASE_OUTPUTS_NPZ, [{k: v.astype(np.float32) for k, v in b.items()} for b in base])
