"""Table 2 compares like with like: the paper's tokenized, compound-split BLEU (``bleu_tok``) against hand-computed
values, and the report's labels of how each row's BLEU and FLOPs were made."""
from __future__ import annotations

import pytest

from seqbench import reports
from seqbench.harness import metrics
from seqbench.reports import reference
from tests.test_reports import record, write_records

# one substituted compound part; the tokenizer splits the final period off ("lesen." -> "lesen .")
HYP, REF = "Sie öffnen den Web-Server und lesen.", "Sie öffnen den Web-Browser und lesen."


@pytest.mark.parametrize("text,split", [
    ("rich-text format", "rich ##AT##-##AT## text format"),
    ("Rich-Text-Formate", "Rich ##AT##-##AT## Text ##AT##-##AT## Formate"),
    ("a-b-c", "a ##AT##-##AT## b-c"),  # as perl's s{(\S)-(\S)}{...}g: the match that took "b" starts no other
    ("- Web - Server -", "- Web - Server -"),  # a hyphen between spaces is no compound
])
def test_compounds_are_split_as_get_ende_bleu_sh_does(text, split):
    assert metrics.split_compounds(text) == split


def test_split_compound_parts_count_as_matches():
    """Tokens after the split (9 each): Sie öffnen den Web ##AT##-##AT## Server und lesen . -- one of 9 differs.

    n-gram matches: 8/9, 6/8, 4/7, 2/6 (the n-grams that hold the sixth token miss); equal lengths, no brevity
    penalty: BLEU = (8/9 * 6/8 * 4/7 * 2/6) ** (1/4) = (384/3024) ** 0.25. Unsplit, every 4-gram of the 7 tokens
    holds "Web-Server", and multi-bleu.perl (no smoothing) gives 0."""
    scores = metrics.tokenized_bleu([HYP], [REF])
    assert scores["bleu_tok"] == pytest.approx(100 * (384 / 3024) ** 0.25)  # 59.69
    assert scores["bleu_tok"] == pytest.approx(59.69, abs=0.01)
    assert scores["bleu_tok_signature"].startswith("moses-tok:de|compound-split:##AT##|nrefs:1|case:mixed|eff:no|"
                                                   "tok:none|smooth:none|")
    from sacrebleu.metrics import BLEU
    unsplit = BLEU(tokenize="none", smooth_method="none", force=True).corpus_score(
        ["Sie öffnen den Web-Server und lesen ."], [["Sie öffnen den Web-Browser und lesen ."]])
    assert unsplit.score == 0.0


def test_both_sides_are_moses_tokenized():
    """Quotes and the final period split off and escaped alike on both sides: the same tokens, BLEU 100."""
    assert metrics.tokenized_bleu(['Er sagt "gut".'], ['Er sagt " gut " .'])["bleu_tok"] == pytest.approx(100.0)


def test_bleu_tok_is_a_registered_text_metric_and_wmt14_en_de_records_it(make_cfg):
    assert "bleu_tok" in metrics.TEXT_METRICS and metrics.METRICS["bleu_tok"].higher_is_better
    assert metrics.choose("bleu,bleu_tok", "bpe") == ("bleu", "bleu_tok")
    scores = metrics.score(("bleu", "bleu_tok"), [HYP], [REF])
    assert scores["bleu_tok"] == pytest.approx(100 * (384 / 3024) ** 0.25) and scores["bleu"] < scores["bleu_tok"]
    assert list(make_cfg("task=wmt14_en_de").task.metrics) == ["bleu", "chrf", "bleu_tok"]
    from seqbench.harness.evaluate import score_translations, scores_by_length  # what a translation job's evaluation calls
    assert score_translations([HYP], [REF], ("bleu", "chrf", "bleu_tok"))["bleu_tok_signature"].startswith("moses")
    buckets = scores_by_length([HYP, "ein Test"], [REF, "ein Test"], [8, 30], ("bleu", "bleu_tok"))
    assert [(b["bucket"], round(b["bleu_tok"], 2)) for b in buckets] == [("1-10", 59.69), ("21-30", 0.0)]


def test_table2_labels_each_rows_bleu_pipeline_and_flops_method(tmp_path):
    recs = [record("transformer", "wmt14_en_de", s, scores=(b, 50.0)) for s, b in ((1, 20.0), (2, 22.0))]
    for rec, tok in zip(recs, (21.0, 23.5)):
        rec["task"]["metrics"] = ["bleu", "chrf", "bleu_tok"]
        rec["metrics"]["test"]["bleu_tok"] = tok
    recs.append(record("lstm", "multi30k", 1, scores=(10.0, 40.0)))
    reports.build([write_records(tmp_path / "records", recs)], tmp_path / "report")
    t2 = (tmp_path / "report" / "report.md").read_text().split("## Table 2")[1].split("## Table 1")[0]
    measured, ref = t2.split("Reference values, not measured here")
    # mean ± std (95% t-interval: t(0.975, 1) = 12.706 x std / sqrt(2)); one seed says so
    assert ("| wmt14_en_de | transformer-tiny | x86_64 | 2 | 21.00 ± 1.41 (CI 8.29, 33.71; n=2) | "
            "22.25 ± 1.77 (CI 6.37, 38.13; n=2) | 1.00e+12 | "
            f"{reference.MEASURED['bleu']} | {reference.MEASURED['flops']} |") in measured
    assert "| multi30k | lstm-tiny | x86_64 | 1 | 10.00 (1 seed) | – | 1.00e+12 |" in measured
    assert "test BLEU, tokenized + compound split" in measured
    assert f"| Transformer (base) | 27.3 | 3.3e+18 | {reference.T2T_BLEU} | {reference.ESTIMATED_FLOPS} |" in ref
    assert f"| ByteNet | 23.75 | – | {reference.QUOTED_BLEU} | not given |" in ref
    assert "tensor2tensor get_ende_bleu.sh" in ref and "time x GPUs x assumed sustained" in ref
