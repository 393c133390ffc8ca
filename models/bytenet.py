"""Placeholder: replaced by the real implementation."""
from .common import LanguageModel, Seq2Seq
class ByteNet(Seq2Seq):
    def __init__(self, *a, **k): raise NotImplementedError
ByteNetLM = ByteNet
