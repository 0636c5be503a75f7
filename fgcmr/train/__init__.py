"""The train stage: DeepSpeed two-tower training (``loop``), its data pipeline, checkpoints, signals,
monitoring, and ``export`` of a world-size-free model."""
