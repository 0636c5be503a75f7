"""The label stage: a siamese text network that scores how related two texts are.

``tokenizer`` trains or loads the tokenizer, ``model`` holds the shared encoder and the pair head,
``texts`` reads texts and their relevance groups through the shard seam, ``metrics`` measures pair
ROC-AUC, ``train`` fits a labeler, ``infer`` writes the label sidecars described in ``fgcmr.labels``;
``config`` holds their configs and ``done`` checks, torch-free.
"""
