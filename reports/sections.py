"""The report's sections, in order: each turns the tidy tables into notes, tables and plots."""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from . import hardware, hierarchical, ladder, plots, reference, significance, tables
from .load import Records
from .render import Note, Section, Table

log = logging.getLogger("seqbench.reports")


def all_sections(records: Records, dirs: list[Path], plot_dir: Path,
                 pairs: pd.DataFrame | None = None, archs: pd.DataFrame | None = None) -> list[Section]:
    """The report's sections, those with something to show; ``pairs`` is :func:`significance.pairwise` of the runs,
    ``archs`` :func:`hierarchical.architectures` (each computed here if not given).

    The overview leads: the architecture x task matrix of each task's primary metric and the headline figure
    (quality against training cost). Then, when runs are ladder rungs, the budget ladder (reports/ladder.py: which
    architecture wins at equal compute, rung by rung). Then fairness, tuning, the quality tables per task, the costs,
    Table 2 (BLEU runs; the paper's rows when its task ran), Table 1 (path-length records), the other plots, failures,
    appendix.
    """
    if records.runs.empty:
        return [overview(records, dirs)]
    from . import probe_suites, tuning  # here, not at the top: `python -m seqbench.reports.<module>` runs it as __main__

    runs = records.runs
    summ = tables.summary(runs)
    devices = tables.short_devices(summ["device_name"])
    figures = plots.make_all(records, plot_dir)
    headline = next((p for p in figures if p.name == plots.HEADLINE and not p.skipped), None)
    analysis = [p for p in figures if p.name in plots.TABLE1]
    rest = [p for p in figures if p.name not in plots.TABLE1 and p is not headline]
    cache: dict = {}  # each run's resampled test scores, drawn once for both tables
    pairs = significance.pairwise(runs, cache) if pairs is None else pairs
    archs = hierarchical.architectures(runs, cache) if archs is None else archs
    shown = [overview(records, dirs, summ, devices, headline), *ladder.sections(records, plot_dir, archs),
             fairness(runs), *tuning.sections(runs),
             *results(runs, pairs, devices, summ, archs), *probe_suites.sections(runs, plot_dir), costs(summ, devices),
             table2(runs, devices, summ),
             table1(records, analysis),
             plot_section(rest), failures(runs), appendix(runs)]
    return [s for s in shown if s is not None]


def overview(records: Records, dirs: list[Path], summ: pd.DataFrame | None = None,
             devices: dict[str, str] | None = None, headline: plots.Plot | None = None) -> Section:
    """What ran, then the answer: the matrix of each task's primary metric (best in bold) and the headline figure."""
    runs = records.runs
    skipped = [Note(n, "warning") for n in records.notes]  # copies counted once, files that are no records
    if runs.empty:
        return Section("Overview", [Note(f"No result records (record.json) found under: "
                                         f"{', '.join(map(str, dirs))}.", "warning"), *skipped])
    training, analysis = runs[runs["kind"] == "train"], tables.analyses(runs)
    status = training["status"].fillna("?").value_counts().sort_index()
    tasks = ", ".join(sorted(training["task"].dropna().astype(str).unique())) or "?"
    counts = (f"{len(training)} runs ({', '.join(f'{n} {s}' for s, n in status.items())}) on tasks: {tasks}."
              if len(training) else "No training runs.")
    if len(analysis):
        done = ", ".join(f"{n} {s}" for s, n in analysis["status"].fillna("?").value_counts().sort_index().items())
        found = [what for what, frame in (("path length", records.path_length), ("influence", records.influence))
                 if len(frame)]
        counts += (f" {len(analysis)} analysis-only jobs without training ({done}): not in the quality and cost "
                   f"tables; their analyses ({', '.join(found) or 'none'}) are in Table 1 and the plots.")
    summ = tables.summary(runs) if summ is None else summ
    devices = tables.short_devices(summ["device_name"]) if devices is None else devices
    matrix, best = tables.overview(summ, devices)
    if len(matrix):
        named = [n for n in summ["device_name"].unique()  # devices the row names show, by their short names
                 if any(f" · {devices.get(n, n)}" in name for name in matrix["architecture"])]
        legend = tables.device_legend(devices, named)
        answer = [Table(matrix, "Each task's primary test metric per architecture, as mean (low, high; n=k): the "
                                "mean over k seeds and the 95% confidence interval of the mean (Student t); ↑ higher "
                                "is better, ↓ lower is better; the best mean of each task in bold. Every metric: the "
                                "tables per task below; costs: the cost table.", name="overview", bold=best),
                  *([Note(legend, "note")] if legend else [])]
    else:
        answer = [Note("No finished training run has a test score: nothing to compare yet (see the failed and "
                       "unfinished jobs below).", "warning")]
    return Section("Overview", [
        Note(counts, "text"), *answer, *([headline] if headline is not None else []), *skipped,
        Note(f"Records read from: {', '.join(map(str, dirs))}. Built {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
             "Quality is mean ± sample standard deviation over seeds with the 95% confidence interval of the mean "
             "(Student t) and n seeds; costs are means. Differences between architectures are tested pairwise "
             "(paired bootstrap on the test set) below each task's table.", "note")])


def fairness(runs: pd.DataFrame) -> Section:
    blocks = [Note(m, "warning") for msgs in tables.fairness_warnings(runs).values() for m in msgs]
    for note in blocks:
        log.warning(note.text)
    low, unfair = hardware_blocks(tables.ok(runs))
    blocks += low
    differ = tables.differing_settings(runs)
    checked = ", ".join(label for _, label in tables.SETTINGS) + ", task.* (task settings and tokenization)"
    others = ("every other setting of the resolved config that can change a result (model hyperparameters, decoding, "
              "optimiser, loss, evaluation; seeds, output folders and logging aside)")
    if tables.ok(runs).empty:
        blocks.append(Note("no finished training runs to compare", "note"))
    elif differ.empty:
        blocks.append(Note(f"Within each task, all finished runs share these settings: {checked}."
                           + (" They did not share the hardware alike: the comparison is not fair for the runs "
                              f"flagged above ({unfair})." if unfair else "") + f" They also share {others}.", "text"))
    else:
        blocks.append(Table(differ, f"Settings that differ between the finished runs of one task (checked: {checked}, "
                                    f"and {others})"))
    return Section("Fair comparison", blocks)


def hardware_blocks(done: pd.DataFrame) -> tuple[list, int]:
    """The warning and table of runs that got too little of the machine (reports/hardware.py), and their number."""
    low = hardware.flagged(done)
    blocks = []
    if len(low):
        blocks.append(Note(f"WARNING: {len(low)} runs got less of the machine than the runs they are compared with "
                           f"(CPU utilisation below {hardware.RELATIVE} x their group's median or below "
                           f"{hardware.FLOOR}, or fewer CPUs busy training, threads x utilisation, than "
                           f"{hardware.RELATIVE} x their group's median; group: the finished runs of one task on one "
                           "device): their throughput "
                           "and budget-bound quality are not comparable; rerun them on a quiet machine.", "warning"))
        blocks.append(Table(low, "Runs with low hardware utilisation (CPU seconds / (training seconds x threads))"))
    missing = hardware.unknown(done)
    if missing:
        blocks.append(Note(f"{missing} finished runs record no CPU utilisation (older records): whether they had the "
                           "machine to themselves is unknown.", "note"))
    shared = hardware.memory_not_per_job(done)
    if shared:
        blocks.append(Note(f"The peak memory of {len(shared)} finished runs ({', '.join(shared[:5])}"
                           f"{', ...' if len(shared) > 5 else ''}) is the process's lifetime peak, not the job's own "
                           "(peak_memory_kind process_max_rss: older records, or no per-job measurement here): in a "
                           "sweep run in one process it includes the earlier jobs' memory; do not compare it.",
                           "warning"))
    return blocks, len(low)


def results(runs: pd.DataFrame, pairs: pd.DataFrame, devices: dict[str, str] | None = None,
            summ: pd.DataFrame | None = None, archs: pd.DataFrame | None = None) -> list[Section]:
    """A heading, then one section per task: its fairness warnings above its quality table, then its architectures
    compared (``archs``: :func:`hierarchical.architectures`, when given) and its pairwise significance table of seed
    pairs (``pairs``: :func:`significance.pairwise`). Costs are in :func:`costs`. ``summ``: :func:`tables.summary`
    of the runs (computed here if not given)."""
    summ = tables.summary(runs) if summ is None else summ
    warnings = tables.warnings_by_task(runs)
    sections = [Section("Results per task and architecture", [] if len(summ) else [Note("no finished runs")])]
    for task in sorted(summ["task"].unique()):
        sections.append(Section(f"Task {task}", [*(Note(m, "warning") for m in warnings.get(task, [])),
                                                 Table(tables.quality_display(summ, task, devices),
                                                       tables.summary_caption(summ, task)),
                                                 *architecture_blocks(archs, task),
                                                 *significance_blocks(pairs, task)], level=3))
    return sections


def costs(summ: pd.DataFrame, devices: dict[str, str]) -> Section | None:
    """Every finished system's mean costs in one table, with the full names of the devices it abbreviates."""
    if summ.empty:
        return None
    legend = tables.device_legend(devices, summ["device_name"])
    return Section("Costs", [
        Table(tables.costs_display(summ, devices),
              "Means over seeds: parameters, training FLOPs (counted by the harness), training wall-clock seconds, "
              "training tokens per second, decoding sentences per second (translation), peak memory of the job, "
              "CPU utilisation (CPU seconds / (training seconds x threads))", name="costs"),
        *([Note(legend, "note")] if legend else [])])


def architecture_blocks(archs: pd.DataFrame | None, task: str) -> list:
    """The task's systems compared as architectures (seeds and test items resampled); nothing for a lone system or
    where no pair could be tested (the seed-pair notes say why)."""
    if archs is None or not ((archs["task"] == task) & archs["p"].notna()).any():
        return []
    return [Table(hierarchical.display(archs, task), hierarchical.caption(archs, task))]


def significance_blocks(pairs: pd.DataFrame, task: str) -> list:
    """The task's pairwise significance table and why any seed pair went untested (nothing for a lone system)."""
    if not (pairs["task"] == task).any():
        return []
    shown = significance.display(pairs, task)
    blocks = [Table(shown, significance.caption(pairs, task))] if (shown["seed pairs"] > 0).any() else []
    return blocks + [Note(n, "note") for n in significance.notes(pairs, task)]


def table2(runs: pd.DataFrame, devices: dict[str, str] | None = None,
           summ: pd.DataFrame | None = None) -> Section | None:
    """Table 2 of the paper's layout for the translation runs scored by BLEU; the paper's own rows only when its
    task (``reference.TASK``) ran. None without such runs."""
    measured = tables.table2_display(tables.summary(runs) if summ is None else summ)
    if measured.empty:
        return None
    if devices:
        measured = measured.assign(device=measured["device"].map(lambda v: devices.get(v, v)))
    blocks = [Table(measured, "Measured here (test BLEU mean ± std over seeds, the 95% t-interval of the mean and n "
                    "seeds; training FLOPs counted by the harness)")]
    if (measured["task"] == reference.TASK).any():
        blocks += [
            Table(tables.reference_display(reference.table2()),
                  f"Reference values, not measured here: {reference.CITATION}", kind="reference"),
            Note(f"Reference rows are quoted from the paper for task {reference.TASK} at the paper's scale; compare "
                 "them with measured rows only for that task and budget, and like with like: the paper's BLEU is "
                 "tokenized and compound-split (set it beside the measured tokenized BLEU, which wmt14_en_de records "
                 "as bleu_tok), not sacreBLEU; its FLOPs are estimated from time and hardware, ours counted.", "note")]
    return Section("Table 2: BLEU and training cost", blocks)


def table1(records: Records, figures: list[plots.Plot] = ()) -> Section | None:
    """Table 1 from the path-length records, then its plots (path length and forward throughput against n); None
    without path-length records."""
    paths = records.path_length
    if paths.empty:
        return None
    frame = paths.assign(n=pd.to_numeric(paths["n"], errors="coerce").astype("Int64"),
                         arch=paths["arch"].fillna("?"), layer_type=paths["layer_type"].fillna("?"))
    pivot = frame.pivot_table(index=["arch", "layer_type"], columns="n", values="max_path_length",
                              aggfunc="mean").reset_index()
    pivot.columns = [str(c) if c in ("arch", "layer_type") else f"n={c}" for c in pivot.columns]
    return Section("Table 1: maximum path length", [
        Table(pivot.rename(columns={"arch": "architecture", "layer_type": "layer type"}).map(_round),
              "Maximum path length (steps) between positions, measured per architecture, by sequence length n"),
        *figures])


def plot_section(figures: list[plots.Plot]) -> Section | None:
    """The plots drawn, then one line naming those the records hold no data for; None when none was drawn."""
    drawn = [p for p in figures if not p.skipped]
    if not drawn:
        return None
    missing = [f"{p.title} ({p.skipped})" for p in figures if p.skipped]
    return Section("Plots", [*drawn, *([Note("Not drawn, for want of data in these records: "
                                             + "; ".join(missing) + ".", "note")] if missing else [])])


def failures(runs: pd.DataFrame) -> Section:
    bad = tables.failures(runs)
    if bad.empty:
        return Section("Failed and unfinished jobs", [Note("none: every job finished with status ok", "text")])
    return Section("Failed and unfinished jobs", [Table(bad, f"{len(bad)} jobs did not finish with status ok")])


def appendix(runs: pd.DataFrame) -> Section:
    """Every run and its record; the sacreBLEU signatures, package versions and plug-in models the records hold."""
    shown = [Table(tables.appendix(runs), "Every run and its record")]
    shown += [Table(frame, caption) for frame, caption in ((tables.signatures(runs), "sacrebleu signatures"),
                                                           (tables.package_versions(runs), "Package versions"),
                                                           (tables.plugins(runs), "Plug-in models (not seqbench's "
                                                            "own): where each came from and which code it was"))
              if len(frame)]
    return Section("Appendix: runs, signatures and versions", shown)


def _round(v):
    if isinstance(v, float) and v == v:
        return int(v) if v.is_integer() else round(v, 2)
    return v
