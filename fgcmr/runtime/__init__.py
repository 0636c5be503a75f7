"""The training runtime both training stages share (the two-tower ``train`` and the labeler's ``label train``):
the DeepSpeed ``engine`` and its schedule, and the ``monitor`` (TensorBoard, progress lines)."""
