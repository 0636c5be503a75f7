"""Use a trained model: embed a corpus (``embed``), index it (``index``), search it (``search``, ``serve``)."""
