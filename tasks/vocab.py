"""The special token ids every translation vocabulary shares: ``PAD=0, BOS=1, EOS=2, UNK=3``.

They belong to the data: the tokenizers reserve them, the batches pad with them, and the models and the
decoder read them from here (``models.common`` re-exports them). Language-model vocabularies have no
padding (their batches are contiguous text).
"""

PAD, BOS, EOS, UNK = 0, 1, 2, 3
