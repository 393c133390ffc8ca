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

# How the paper's numbers were made, which is not how seqbench measures (MEASURED): the Transformer's BLEU is
# tensor2tensor's get_ende_bleu.sh (the other rows are quoted from their own papers), and every training cost is
# an estimate from time and hardware (section 6.1 and footnote 5), not a count.
T2T_BLEU = ("tokenized BLEU with compound splitting (tensor2tensor get_ende_bleu.sh: Moses tokenizer -l de, "
            "##AT## split, multi-bleu.perl)")
QUOTED_BLEU = "tokenized BLEU as published in the model's own paper, quoted by Vaswani et al."
ESTIMATED_FLOPS = ("estimated: training time x GPUs x assumed sustained single-precision TFLOPS per GPU (K80 2.8, "
                   "K40 3.7, M40 6.0, P100 9.5)")
MEASURED = {"bleu": "sacreBLEU 13a on detokenized text",
            "bleu_tok": "tokenized BLEU with compound splitting (the paper's pipeline; harness/metrics.py bleu_tok)",
            "flops": "counted: torch's FLOP counter, forward + backward per target token x training tokens"}

# (model, EN-DE BLEU, training cost in FLOPs; None where the paper gives none, BLEU pipeline)
TABLE2_EN_DE = (
    ("ByteNet", 23.75, None, QUOTED_BLEU),
    ("GNMT + RL", 24.6, 2.3e19, QUOTED_BLEU),
    ("ConvS2S", 25.16, 9.6e18, QUOTED_BLEU),
    ("Transformer (base)", 27.3, 3.3e18, T2T_BLEU),
    ("Transformer (big)", 28.4, 2.3e19, T2T_BLEU),
)


def table2() -> pd.DataFrame:
    ref = pd.DataFrame(TABLE2_EN_DE, columns=["model", "bleu", "train_flops", "bleu_pipeline"])
    return ref.assign(flops_method=[ESTIMATED_FLOPS if pd.notna(f) else "not given" for f in ref["train_flops"]],
                      source="reference")
