"""A real runner whose first pipeline call waits at a gate, so that tests can queue
requests behind it and see how the engine batches them."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from pipeline.engine import Emit, StopRequested
from pipeline.jobs import EngineError, Job, ModelProfile, Result
from pipeline.runner import FluxRunner


class HeldRunner:
    """The real runner, noting how many jobs each pipeline call runs; the first call waits
    for `gate`, so that the requests sent meanwhile queue behind it."""

    def __init__(self, runner: FluxRunner) -> None:
        self._runner = runner
        self.gate = threading.Event()
        self.calls: list[int] = []

    @property
    def profile(self) -> ModelProfile:
        return self._runner.profile

    def loaded_loras(self) -> frozenset[str]:
        return self._runner.loaded_loras()

    def run(self, job: Job, emit: Emit, stop_requested: StopRequested) -> Result:
        self._enter(1)
        return self._runner.run(job, emit, stop_requested)

    def run_batch(
        self, jobs: Sequence[Job], emits: Sequence[Emit], stop_requested: StopRequested
    ) -> list[Result | EngineError]:
        self._enter(len(jobs))
        return self._runner.run_batch(jobs, emits, stop_requested)

    def _enter(self, jobs: int) -> None:
        if not self.calls:
            self.gate.wait(timeout=60)
        self.calls.append(jobs)
