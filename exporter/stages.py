"""The build side's stage runner: progress and timing per stage, interrupt checks between stages, and quiet
third-party libraries while stages run."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("exporter.pipeline")


Progress = Callable[[str], None]


class Stages:
    """Times each stage and reports it on the progress callback."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress or (lambda msg: log.info(msg))
        self.timings: dict[str, float] = {}

    def run(self, name: str, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from .interrupts import check

        check()
        self.progress(f"{what} ...")
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        check()
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.progress(f"{what}: done in {self.timings[name]:.1f}s")
        return result


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers' load reports and progress bars would bury our progress and one-line errors on stderr."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    onnx_log = logging.getLogger("torch.onnx")
    onnx_level = onnx_log.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed" notices from the exporter's registry
    try:
        with warnings.catch_warnings():
            # peft's note that it resolved our embedded: base name, transformers' deprecation notices.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        onnx_log.setLevel(onnx_level)
        if bars:
            hf_logging.enable_progress_bar()
