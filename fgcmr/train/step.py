"""One training micro-step through the DeepSpeed engine: the code both ``fgcmr train`` and the bench run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from fgcmr.losses import LossOutput, RetrievalLoss
from fgcmr.model.inputs import move

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def to_device(
    batch: dict,
    device: torch.device,
    dtype: torch.dtype,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Move a collated training batch; uint8 pixels are normalised there (``Inputs.normalize``), and floating
    inputs of the towers take the engine's compute dtype (labels and ids keep theirs)."""
    out = {k: move(v, device) for k, v in batch.items() if k not in ("image", "text")}
    image = batch["image"]
    if image.dtype == torch.uint8:
        if normalize is None:
            raise ValueError(
                "uint8 pixels need the input pipeline's normalisation: to_device(..., normalize=inputs.normalize)"
            )
        image = normalize(image.to(device, non_blocking=True))
    out["image"] = move(image, device, dtype)
    out["text"] = move(batch["text"], device, dtype)
    return out


def reports_grad_norm(engine: DeepSpeedEngine) -> bool:
    """DeepSpeed records the global gradient norm in its ZeRO and mixed-precision optimizers only."""
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()


def micro_step(
    engine: DeepSpeedEngine, loss_fn: RetrievalLoss, batch: dict, measure_grad_norm: bool = False
) -> tuple[LossOutput, float | None]:
    """Forward, global-batch loss, backward, and ``engine.step`` (an optimizer step at accumulation
    boundaries). With ``measure_grad_norm``, also the pre-clipping gradient norm of this step."""
    image_emb, text_emb, logit_scale = engine(batch["image"], batch["text"])
    out = loss_fn(image_emb, text_emb, batch, logit_scale)
    engine.backward(out.loss)
    norm = None
    if measure_grad_norm and engine.is_gradient_accumulation_boundary() and not reports_grad_norm(engine):
        norm = torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None]).item()
    engine.step()
    if measure_grad_norm and norm is None:
        norm = engine.get_global_grad_norm()
    return out, None if norm is None else float(norm)
