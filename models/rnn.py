"""Placeholder: replaced by the real implementation."""
from .common import LanguageModel, Seq2Seq
class LSTMSeq2Seq(Seq2Seq):
    def __init__(self, *a, **k): raise NotImplementedError
LSTMLM = GRUSeq2Seq = GRULM = LSTMSeq2Seq
