"""Workers pass uint8 pixels and the training side normalises each batch: the towers get the same input as before."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from fgcmr.dataset import iter_samples, open_dataset
from fgcmr.model.inputs import image_data_config
from fgcmr.train.config import DataConfig
from fgcmr.train.data import build_pipeline
from fgcmr.train.step import to_device

from test_train_data import inputs  # noqa: F401  (fixture)


def test_uint8_batches_normalised_on_the_device_equal_the_float_transform(synthetic_dataset, inputs):  # noqa: F811
    from timm.data import create_transform

    float_transform = create_transform(
        **image_data_config(inputs.cfg), is_training=False
    )  # ToTensor + Normalize in the worker
    samples = list(iter_samples(open_dataset(synthetic_dataset).shards("train")[0]))[:8]
    expected = torch.stack([float_transform(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples])
    pixels = torch.stack([inputs.pixels(s) for s in samples])
    assert pixels.dtype == torch.uint8 and pixels.shape == expected.shape
    batch = to_device(
        {"image": pixels, "text": torch.zeros(8, 4)}, torch.device("cpu"), torch.float32, inputs.normalize
    )
    torch.testing.assert_close(batch["image"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        inputs.image(samples[0]), expected[0], rtol=0, atol=1e-6
    )  # eval and validation: one sample
    assert (
        to_device({"image": pixels, "text": torch.zeros(8, 4)}, torch.device("cpu"), torch.bfloat16, inputs.normalize)[
            "image"
        ].dtype
        == torch.bfloat16
    )


def test_pipeline_batches_carry_uint8_pixels_and_need_the_normalisation(synthetic_dataset, inputs):  # noqa: F811
    urls = [str(p) for p in open_dataset(synthetic_dataset).shards("train")]
    batch = next(iter(build_pipeline(urls, inputs, DataConfig(micro_batch=4), 1, None, seed=0)))
    assert batch["image"].dtype == torch.uint8
    with pytest.raises(ValueError, match="normalize=inputs.normalize"):
        to_device(batch, torch.device("cpu"), torch.float32)
