"""Reference values quoted from the paper; shown beside measured results, never mixed with them.

Vaswani, A., Shazeer, N., Parmar, N., Uszkoreit, J., Jones, L., Gomez, A. N., Kaiser, L., Polosukhin, I.
"Attention Is All You Need", NeurIPS 2017, arXiv:1706.03762, Table 2: BLEU on the WMT 2014
English-to-German newstest2014 set, and training cost in FLOPs.
"""
from __future__ import annotations

import pandas as pd

CITATION = ("Vaswani et al. 2017, \"Attention Is All You Need\", Table 2 "
            "(WMT 2014 English-German, newstest2014)")
TASK = "wmt14_en_de"

# (model, EN-DE BLEU, training cost in FLOPs; None where the paper gives none)
TABLE2_EN_DE = (
    ("ByteNet", 23.75, None),
    ("GNMT + RL", 24.6, 2.3e19),
    ("ConvS2S", 25.16, 9.6e18),
    ("Transformer (base)", 27.3, 3.3e18),
    ("Transformer (big)", 28.4, 2.3e19),
)


def table2() -> pd.DataFrame:
    return pd.DataFrame(TABLE2_EN_DE, columns=["model", "bleu", "train_flops"]).assign(source="reference")
