"""The registry of model families' builders (build side), keyed by the family names of ``tasks.FAMILIES``, in
the style of optimum's per-architecture export configs: each entry carries its behaviour (probes, wrapper,
export merged or with LoRA inputs, PyTorch reference, adapter effect, manifest fields). The device half of a
family is ``runners.RUNNERS[name]``, which reads what the builder writes.

One builder object serves one export (or one add-adapter): its probe step fixes the feeds every later step
runs on. The stage order itself is pipeline.py's (merged) and swap_build.py's (swappable).
"""

from __future__ import annotations

from typing import Any

from .family_base import Arrays, BuildContext
from .family_decoder import DecoderBuild
from .family_encoder import EncoderBuild
from .tasks import TaskSpec

Builder = EncoderBuild | DecoderBuild
BUILDERS: dict[str, type[EncoderBuild] | type[DecoderBuild]] = {"encoder": EncoderBuild, "decoder": DecoderBuild}


def builder_for(ctx: BuildContext) -> Builder:
    return BUILDERS[ctx.task.family].for_export(ctx)


def builder_from_bundle(task: TaskSpec, manifest: dict[str, Any], probes: dict, inputs: Arrays) -> Builder:
    return BUILDERS[task.family].from_bundle(task, manifest, probes, inputs)
