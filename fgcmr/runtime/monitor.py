"""What a training run reports: TensorBoard on rank 0 and a progress line every N steps with ETA.

Per-step values stay tensors and are summed on the device; they are read (one sync) only every
``log_every`` steps, so monitoring does not slow the step it measures.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from fgcmr.losses import LossOutput, hardness_stats

log = logging.getLogger("fgcmr.train")


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Monitor:
    def __init__(
        self, run_dir: Path, enabled: bool, total_steps: int, samples_per_step: int, log_every: int, hist_every: int
    ):
        self.enabled, self.total_steps, self.samples_per_step = enabled, total_steps, samples_per_step
        self.log_every, self.hist_every = log_every, hist_every
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self._reset()
        self.last_values: dict[str, float] = {}

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0
        self.step_time = self.data_time = 0.0
        self.window_start = time.perf_counter()

    def text(self, tag: str, body: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, f"```\n{body}\n```", 0)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
            self.writer.flush()
        self.last_values.update({f"{prefix}/{k}": v for k, v in values.items()})

    def histograms(self, prefix: str, values: dict[str, np.ndarray], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_histogram(f"{prefix}/{name}", value, step)

    def logs_at(self, step: int) -> bool:
        return self.enabled and (step % self.log_every == 0 or step == self.total_steps)

    def update(
        self, step: int, out: LossOutput, step_time: float, data_time: float, lr: float, grad_norm: float | None
    ) -> None:
        if not self.enabled:
            return
        self.n += 1
        self.step_time += step_time
        self.data_time += data_time
        for name, value in {"loss": out.loss.detach(), **out.parts}.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        if step % self.hist_every == 0:
            self._histograms(step, out)
        if self.logs_at(step):
            self._flush(step, lr, grad_norm, {f"labels/{k}": v for k, v in hardness_stats(out).items()})

    def _histograms(self, step: int, out: LossOutput) -> None:
        pos = out.y > 0
        self.writer.add_histogram("similarity/positive", out.s[pos].float().cpu(), step)
        self.writer.add_histogram("similarity/negative", out.s[~pos].float().cpu(), step)
        if out.omega is not None:
            self.writer.add_histogram("weights/omega", out.omega.float().cpu(), step)

    def _flush(self, step: int, lr: float, grad_norm: float | None, label_stats: dict[str, float]) -> None:
        """``label_stats``: how much the fine-grained labels can move the loss, on the step's last batch."""
        values = {f"train/{k}": (v / self.n).item() for k, v in self.sums.items()} | label_stats
        step_s = self.step_time / self.n
        values.update(
            {
                "train/lr": lr,
                "perf/samples_per_s": self.samples_per_step / step_s,
                "perf/step_time_s": step_s,
                "perf/data_wait_s": self.data_time / self.n,
                "perf/data_wait_frac": self.data_time / max(self.step_time, 1e-9),
            }
        )
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        eta = (self.total_steps - step) * step_s
        log.info(
            "step %d/%d loss %.4f lr %.2e %.1f samples/s step %.3fs data-wait %.0f%% eta %s",
            step,
            self.total_steps,
            values["train/loss"],
            values["train/lr"],
            values["perf/samples_per_s"],
            step_s,
            100 * values["perf/data_wait_frac"],
            _fmt_duration(eta),
        )
        self.last_values = values
        self._reset()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
