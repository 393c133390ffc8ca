"""Placeholder: replaced by the real implementation."""
from .common import LanguageModel, Seq2Seq
class ConvS2S(Seq2Seq):
    def __init__(self, *a, **k): raise NotImplementedError
ConvLM = ConvS2S
