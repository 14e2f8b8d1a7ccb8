"""Turns run records into numbers, a JSON report, a PNG and a terminal summary.

Definitions used throughout (and in docs/loadtest.md):

* lines/s: lines finished OK divided by the run's length: the sending window,
  or up to the last line finished if that came later. For a server that keeps
  up this is the offered rate; for one that falls behind it is what it
  manages (its capacity).
* A server sustains a load when no request failed and p99 time to first
  token stays within the target.
* Percentiles are nearest-rank over all requests of a run.
"""

from __future__ import annotations

import collections
import datetime
import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npcd.tools.loadtest.scenario import PersonaRef, Scenario
from npcd.tools.loadtest.traffic import RequestRecord

TEXT_PANEL_PT = 260.0  # font size (pt) x lines that fit in one text panel of the PNG, line spacing included
REPORT_VERSION = 2  # 2: a comparison per baseline (`comparisons`), the capacity search


@dataclass
class RunResult:
    """One replay of the schedule against one server."""

    label: str                    # "npcd", "naive", "naive x0.25", "llama.cpp 4 NPCs"
    server: str                   # npcd, or a baseline's name (targets.BASELINES)
    address: str
    load_fraction: float          # share of the full schedule replayed
    records: list[RequestRecord]
    metrics_samples: list[dict[str, float]] = field(default_factory=list)
    client_cpu_s: float = 0.0     # CPU the load generator itself used: it shares the machine with the server
    wall_s: float = 0.0

    def summary(self, duration_s: float) -> dict[str, Any]:
        return summarize(self.records, self.metrics_samples, duration_s)


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    v = sorted(values)

    def rank(q: float) -> float:
        return round(v[max(0, math.ceil(q * len(v)) - 1)], 2)

    return {"n": len(v), "mean": round(sum(v) / len(v), 2), "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99),
            "max": round(v[-1], 2)}


def batch_stats(samples: list[dict[str, float]]) -> dict[str, Any]:
    """Batch sizes the engine ran: sampled gauge values while busy, and exact tokens per engine step."""
    busy = [int(s["batch_size"]) for s in samples if s.get("running", 0) > 0 and "batch_size" in s]
    counted = [s for s in samples if "steps" in s and "tokens" in s]
    tokens_per_step = None
    if len(counted) >= 2 and counted[-1]["steps"] > counted[0]["steps"]:
        tokens_per_step = round((counted[-1]["tokens"] - counted[0]["tokens"])
                                / (counted[-1]["steps"] - counted[0]["steps"]), 2)
    # Between two samples that both saw work running, the engine was (nearly) always busy:
    # time over steps there is what one engine step costs under this load.
    busy_s = busy_steps = 0.0
    for a, b in zip(counted, counted[1:]):
        if a.get("running", 0) > 0 and b.get("running", 0) > 0:
            busy_s += b["t"] - a["t"]
            busy_steps += b["steps"] - a["steps"]
    return {
        "samples": len(samples),
        "sampled_batch_sizes": dict(sorted(collections.Counter(busy).items())),
        "batch_size": percentiles([float(b) for b in busy]),
        "tokens_per_engine_step": tokens_per_step,
        "ms_per_engine_step_busy": round(busy_s / busy_steps * 1000.0, 1) if busy_steps else None,
        "max_queue_depth": max((s.get("queue_depth", 0) for s in samples), default=None),
    }


def summarize(records: list[RequestRecord], samples: list[dict[str, float]], duration_s: float) -> dict[str, Any]:
    sent = [r for r in records if r.sent_s is not None]
    ok = [r for r in sent if r.ok]
    errors = collections.Counter(r.status for r in sent if not r.ok)
    span = max([duration_s] + [r.finished_s for r in ok])
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "sent": len(sent),
        "not_sent": len(records) - len(sent),
        "done": len(ok),
        "errors": sum(errors.values()),
        "errors_by_status": dict(sorted(errors.items())),
        "offered_lines_per_s": round(len(sent) / duration_s, 3),
        "lines_per_s": round(len(ok) / span, 3),
        "tokens_per_s": round(tokens / span, 1),
        "completion_tokens": tokens,
        "mean_completion_tokens": round(tokens / len(ok), 1) if ok else None,
        "mean_prompt_tokens": round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else None,
        "ttft_ms": percentiles([r.ttft_ms for r in ok]),
        "inter_token_ms": percentiles([g for r in ok for g in r.gaps_ms]),
        "total_ms": percentiles([r.total_ms for r in ok]),
        "server_queued_ms": percentiles([r.server_queued_ms for r in ok if r.server_queued_ms is not None]),
        "batches": batch_stats(samples) if samples else None,
    }


def sustains(summary: dict[str, Any], target_p99_ms: float) -> bool:
    p99 = summary["ttft_ms"]["p99"]
    return summary["errors"] == 0 and summary["done"] > 0 and p99 is not None and p99 <= target_p99_ms


def compare(summaries: dict[str, dict[str, Any]], runs: list[RunResult], target_p99_ms: float,
            baseline: str) -> dict[str, Any]:
    """npcd against one baseline's runs: lines/s both sustain at the same p99, and the ratio.

    The baseline's lines/s at npcd's p99 comes from its runs (the full schedule
    and any thinned ones) that met that p99 without errors. If none did, its
    best lines/s at any latency is an upper bound on what it could sustain, so
    the ratio against it is a lower bound, and is labelled so.
    """
    npcd_run = next(r for r in runs if r.server == "npcd")
    base_runs = [r for r in runs if r.server == baseline]
    d = summaries[npcd_run.label]
    d_p99 = d["ttft_ms"]["p99"]
    full = next((r for r in base_runs if r.load_fraction == 1.0), None)
    out: dict[str, Any] = {
        "baseline": baseline,
        "target_p99_ttft_ms": target_p99_ms,
        "npcd_lines_per_s": d["lines_per_s"],
        "npcd_p99_ttft_ms": d_p99,
        "npcd_sustains_target": sustains(d, target_p99_ms),
    }
    if full is not None:
        n = summaries[full.label]
        # Greedy decoding makes both servers' work checkable: the same request should give the same line.
        texts = {r.request_id: r.text for r in full.records if r.ok}
        both = [r for r in npcd_run.records if r.ok and r.request_id in texts]
        out["same_schedule"] = {
            "baseline_lines_per_s": n["lines_per_s"], "baseline_p99_ttft_ms": n["ttft_ms"]["p99"],
            "baseline_errors": n["errors"],
            "lines_per_s_ratio": round(d["lines_per_s"] / n["lines_per_s"], 2) if n["lines_per_s"] else None,
            "lines_finished_by_both": len(both),
            "identical_text_share": round(sum(r.text == texts[r.request_id] for r in both) / len(both), 3)
            if both else None,
        }
    meeting = [r for r in base_runs if d_p99 is not None and sustains(summaries[r.label], d_p99)]
    if meeting:
        best = max(meeting, key=lambda r: summaries[r.label]["lines_per_s"])
        rate = summaries[best.label]["lines_per_s"]
        out["at_same_p99"] = {"baseline_run": best.label, "baseline_lines_per_s": rate, "bound": "measured",
                              "ratio": round(d["lines_per_s"] / rate, 2) if rate else None}
    elif base_runs:
        ceiling = max(summaries[r.label]["lines_per_s"] for r in base_runs)
        out["at_same_p99"] = {
            "baseline_run": None, "baseline_lines_per_s": ceiling, "bound": f"{baseline} never met npcd's p99; its "
            "best lines/s at any latency is an upper bound on what it sustains, so the ratio is a lower bound",
            "ratio": round(d["lines_per_s"] / ceiling, 2) if ceiling else None,
        }
    return out


def build(scenario: Scenario, runs: list[RunResult], target_p99_ms: float, cast: list[PersonaRef],
          environment: dict[str, Any], capacity: dict[str, Any] | None = None) -> dict[str, Any]:
    """`environment`: what the numbers depend on besides the scenario (engine settings, cores, machine load).

    `capacity`: a capacity search's section (`capacity.report_section`); its runs are each server's trial at
    capacity, on different schedules, so they are not compared request by request.
    """
    summaries = {r.label: r.summary(scenario.duration_s) for r in runs}
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment,
        "scenario": scenario.to_dict(),
        "personas_used": [p.id for p in cast],
        "personas_with_adapter": [p.id for p in cast if p.adapter],
        "offered_lines_per_s_expected": round(scenario.offered_lines_per_s, 3),
        "target_p99_ttft_ms": target_p99_ms,
        "runs": [{"label": r.label, "server": r.server, "address": r.address, "load_fraction": r.load_fraction,
                  "client_cpu_s": r.client_cpu_s, "wall_s": r.wall_s, "summary": summaries[r.label],
                  "metrics_samples": r.metrics_samples, "requests": [rec.to_dict() for rec in r.records]}
                 for r in runs],
    }
    if capacity is not None:
        report["capacity"] = capacity
    elif any(r.server == "npcd" for r in runs):
        baselines = dict.fromkeys(r.server for r in runs if r.server != "npcd")
        if baselines:
            report["comparisons"] = {b: compare(summaries, runs, target_p99_ms, b) for b in baselines}
    return report


def write_json(report: dict[str, Any], path: Path) -> None:
    """Indented, except one line per request and per metrics sample: readable, diffable, not huge."""
    compact: dict[str, str] = {}

    def mark(item: Any) -> str:
        key = f"@@{len(compact)}@@"
        compact[key] = json.dumps(item, separators=(",", ":"))
        return key

    shallow = {**report, "runs": [{**run, "requests": [mark(r) for r in run["requests"]],
                                   "metrics_samples": [mark(m) for m in run["metrics_samples"]]}
                                  for run in report["runs"]]}
    text = re.sub(r'"(@@\d+@@)"', lambda m: compact[m.group(1)], json.dumps(shallow, indent=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _cdf(ax: Any, report: dict[str, Any], key: str, title: str, xlabel: str, target: float | None = None) -> None:
    for run in report["runs"]:
        values = sorted(r[key] for r in run["requests"] if r["status"] == "OK" and r[key] is not None)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=run["label"])
    _finish_cdf(ax, title, xlabel, target)


def _finish_cdf(ax: Any, title: str, xlabel: str, target: float | None = None) -> None:
    if target is not None:
        ax.axvline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g} ms")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of requests")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def write_png(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenario = report["scenario"]
    section = report.get("capacity")
    rows = 5 if section else 4
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.25 * rows))
    (ttft, gap), (total, thr), (queue, batch), (errs, text) = axes[:4]
    target = report["target_p99_ttft_ms"]
    _cdf(ttft, report, "ttft_ms", "Time to first token (client side)", "ms (log)", target)
    _cdf(total, report, "total_ms", "Total time per line", "ms (log)")
    for run in report["runs"]:
        gaps = sorted(g for r in run["requests"] if r["status"] == "OK" for g in r["gaps_ms"])
        if gaps:
            gap.plot(gaps, [(i + 1) / len(gaps) for i in range(len(gaps))], label=run["label"])
    _finish_cdf(gap, "Inter-token gap (between text deltas)", "ms (log)")

    horizon = scenario["duration_s"] + scenario["drain_s"]
    bins = max(1, math.ceil(horizon))
    deltas_axis = thr.twinx()
    for run in report["runs"]:
        done, deltas = [0] * bins, [0] * bins
        for r in run["requests"]:
            if r["status"] == "OK":
                done[min(bins - 1, int(r["sent_s"] + r["total_ms"] / 1000.0))] += 1
            if r["ttft_ms"] is not None:  # every delta streamed, cut-off lines' included
                at = r["sent_s"] + r["ttft_ms"] / 1000.0
                for gap in [0.0, *r["gaps_ms"]]:
                    at += gap / 1000.0
                    deltas[min(bins - 1, int(at))] += 1
        last = max((i for i, n in enumerate(done) if n), default=0)
        line, = thr.plot(range(last + 1), done[: last + 1], label=f"{run['label']} lines finished", linewidth=1)
        last = max((i for i, n in enumerate(deltas) if n), default=0)
        deltas_axis.plot(range(last + 1), deltas[: last + 1], color=line.get_color(), linestyle=":", linewidth=1,
                         label=f"{run['label']} text deltas")
    deltas_axis.set_ylabel("text deltas per second (dotted; about tokens/s)")
    sent = [0] * bins
    for r in report["runs"][0]["requests"]:
        if r["sent_s"] is not None:
            sent[min(bins - 1, int(r["sent_s"]))] += 1
    thr.plot(range(math.ceil(scenario["duration_s"])), sent[: math.ceil(scenario["duration_s"])], color="grey",
             linestyle="--", linewidth=1, label=f"{report['runs'][0]['label']} sent")
    thr.set_title("Throughput over time")
    thr.set_xlabel("s since start")
    thr.set_ylabel("lines per second")
    thr.grid(True, alpha=0.3)
    handles = [h for ax in (thr, deltas_axis) for h in ax.get_legend_handles_labels()[0]]
    thr.legend(handles=handles, fontsize=7, loc="upper right")

    for run in report["runs"]:
        points = [(r["sent_s"], r["server_queued_ms"]) for r in run["requests"]
                  if r["status"] == "OK" and r["server_queued_ms"] is not None]
        if points:
            queue.scatter(*zip(*points), s=4, label=run["label"])
    queue.set_yscale("symlog", linthresh=1.0)
    queue.set_title("Queue wait (server side) by send time")
    queue.set_xlabel("s since start (request sent)")
    queue.set_ylabel("ms queued before running")
    queue.grid(True, alpha=0.3)
    if queue.get_legend_handles_labels()[0]:
        queue.legend(fontsize=8)

    shown = False
    for run in report["runs"]:
        batches = (run["summary"].get("batches") or {}).get("sampled_batch_sizes") or {}
        if batches:
            sizes = [int(k) for k in batches]
            batch.bar(sizes, [batches[k] for k in batches], label=run["label"], alpha=0.7)
            shown = True
    batch.set_title("Batch sizes the engine ran (sampled from /metrics while busy)")
    batch.set_xlabel("sequences in the engine step")
    batch.set_ylabel("samples")
    if shown:
        batch.legend(fontsize=8)
    else:
        batch.text(0.5, 0.5, "no metrics endpoint scraped", ha="center", va="center", transform=batch.transAxes)

    statuses = sorted({s for run in report["runs"] for s in run["summary"]["errors_by_status"]})
    width = 0.8 / max(1, len(report["runs"]))
    for i, run in enumerate(report["runs"]):
        counts = [run["summary"]["errors_by_status"].get(s, 0) for s in statuses]
        errs.bar([j + i * width for j in range(len(statuses))], counts, width=width, label=run["label"])
    errs.set_xticks([j + width * (len(report["runs"]) - 1) / 2 for j in range(len(statuses))], statuses)
    errs.set_title("Errors by status code")
    errs.set_ylabel("requests")
    if statuses:
        errs.legend(fontsize=8)
    else:
        errs.set_yticks([])
        errs.text(0.5, 0.5, "no errors", ha="center", va="center", transform=errs.transAxes)

    _text(text, run_lines(report) + comparison_lines(report))
    if section:
        curve, table = axes[4]
        _capacity_curve(curve, section)
        _text(table, capacity_lines(report)[1:])
        title = (f"npcd loadtest --find-capacity: {len(report['personas_used'])} personas, one line per "
                 f"{scenario['speak_every_s']:g} s per NPC, max {scenario['max_tokens']} tokens, api {scenario['api']};"
                 f" runs above: each server's trial at its capacity")
    else:
        title = (f"npcd loadtest: {scenario['npcs']} NPCs, {len(report['personas_used'])} personas, one line per "
                 f"{scenario['speak_every_s']:g} s per NPC, max {scenario['max_tokens']} tokens, api {scenario['api']}")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _text(ax: Any, lines: list[str]) -> None:
    """Monospaced text filling the panel; the font shrinks when there are more lines than fit at 7.5 pt."""
    ax.axis("off")
    wrapped = [part for line in lines for part in textwrap.wrap(line, 88, subsequent_indent="    ") or [""]]
    ax.text(-0.05, 1, "\n".join(wrapped), va="top", family="monospace",
            fontsize=min(7.5, TEXT_PANEL_PT / max(1, len(wrapped))))


def _capacity_curve(ax: Any, section: dict[str, Any]) -> None:
    """p99 TTFT against NPC count, one curve per server: filled markers passed, crosses failed; the dotted
    vertical line is the server's capacity."""
    from matplotlib.ticker import FuncFormatter

    target = section["target_p99_ttft_ms"]
    for server in section["servers"]:
        trials = sorted((t for t in server["trials"] if t["ttft_p99_ms"] is not None), key=lambda t: t["npcs"])
        if not trials:
            continue
        line, = ax.plot([t["npcs"] for t in trials], [t["ttft_p99_ms"] for t in trials], linewidth=1,
                        label=server["server"])
        for passed, marker in ((True, "o"), (False, "x")):
            points = [(t["npcs"], t["ttft_p99_ms"]) for t in trials if t["passed"] == passed]
            if points:
                ax.scatter(*zip(*points), marker=marker, color=line.get_color(), zorder=3)
        if server["capacity"]["npcs"]:
            ax.axvline(server["capacity"]["npcs"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g} ms")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))  # 2, 5 only
    ax.set_title("Capacity: p99 time to first token by NPC count (o passed, x failed)")
    ax.set_xlabel("NPCs in the scene (log)")
    ax.set_ylabel("p99 TTFT, ms (log)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The plain-text summary: one block per run, the comparisons with each baseline, the capacity search."""
    return run_lines(report) + comparison_lines(report) + capacity_lines(report)


def run_lines(report: dict[str, Any]) -> list[str]:
    env = report["environment"]
    lines = [f"machine: {env['cpu_count']} cores, 1-min load average {env['load_average_1m_before']} before the run"
             f" (the load test's own processes included: {env['load_average_1m_after']} after)",
             f"personas: {', '.join(report['personas_used'])}; with a LoRA adapter: "
             f"{', '.join(report['personas_with_adapter']) or 'none'}"]
    for run in report["runs"]:
        s = run["summary"]
        t, g, tot, q = s["ttft_ms"], s["inter_token_ms"], s["total_ms"], s["server_queued_ms"]
        lines += [
            f"{run['label']} ({run['address']})",
            f"  sent {s['sent']}  done {s['done']}  errors {s['errors']} {s['errors_by_status'] or ''}",
            f"  lines/s {s['lines_per_s']:.2f} (offered {s['offered_lines_per_s']:.2f})  tokens/s {s['tokens_per_s']:.0f}"
            f"  mean tokens/line {s['mean_completion_tokens'] or '-'} (prompt {s['mean_prompt_tokens'] or '-'})",
            f"  TTFT ms   p50 {_ms(t['p50'])}  p90 {_ms(t['p90'])}  p99 {_ms(t['p99'])}  max {_ms(t['max'])}",
            f"  gap ms    p50 {_ms(g['p50'])}  p99 {_ms(g['p99'])}   total ms p50 {_ms(tot['p50'])}  p99 {_ms(tot['p99'])}",
            f"  queued ms p50 {_ms(q['p50'])}  p99 {_ms(q['p99'])}   load generator CPU {run['client_cpu_s']:.1f} s"
            f" in {run['wall_s']:.0f} s",
        ]
        b = s.get("batches")
        if b:
            lines.append(f"  batch size (sampled) p50 {b['batch_size']['p50']}  max {b['batch_size']['max']}"
                         f"  tokens/engine step {b['tokens_per_engine_step']}  ms/engine step (busy)"
                         f" {b['ms_per_engine_step_busy']}  max queue {b['max_queue_depth']}")
    return lines


def comparison_lines(report: dict[str, Any]) -> list[str]:
    comparisons = list((report.get("comparisons") or {}).values())
    if not comparisons:
        return []
    c = comparisons[0]
    lines = ["", f"npcd: {c['npcd_lines_per_s']:.2f} lines/s at p99 TTFT {_ms(c['npcd_p99_ttft_ms'])} ms; "
                 f"target p99 <= {c['target_p99_ttft_ms']:g} ms {'met' if c['npcd_sustains_target'] else 'NOT met'}"]
    for c in comparisons:
        name = c["baseline"]
        same = c.get("same_schedule")
        if same:
            lines.append(f"same schedule: {name} {same['baseline_lines_per_s']:.2f} lines/s at p99 TTFT "
                         f"{_ms(same['baseline_p99_ttft_ms'])} ms ({same['baseline_errors']} errors); "
                         f"lines/s ratio {same['lines_per_s_ratio']}; identical text in "
                         f"{same['identical_text_share']} of the {same['lines_finished_by_both']} lines both finished")
        at = c.get("at_same_p99")
        if at:
            if at["baseline_run"]:
                lines.append(f"at npcd's p99: {name} sustains {at['baseline_lines_per_s']:.2f} lines/s "
                             f"({at['baseline_run']}); ratio {at['ratio']}")
            else:
                lines.append(f"at npcd's p99: {name} sustains at most {at['baseline_lines_per_s']:.2f} lines/s "
                             f"(it never met that p99); ratio >= {at['ratio']}")
    return lines


CAPACITY_COLUMNS = ("server", "NPCs", "offered/s", "TTFT p50", "TTFT p99", "tokens/s", "lines/s", "errors", "result")
_WIDTHS = (10, 5, 9, 8, 8, 8, 7, 6, 6)


def _table_row(cells: tuple[Any, ...]) -> str:
    return "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, _WIDTHS)))


def capacity_header() -> str:
    return _table_row(CAPACITY_COLUMNS)


def capacity_row(server: str, trial: dict[str, Any]) -> str:
    """One trial as a row of the capacity table (TTFT in ms)."""
    return _table_row((server, trial["npcs"], f"{trial['offered_lines_per_s']:.2f}", _ms(trial["ttft_p50_ms"]),
                       _ms(trial["ttft_p99_ms"]), f"{trial['tokens_per_s']:.1f}", f"{trial['lines_per_s']:.2f}",
                       trial["errors"], "pass" if trial["passed"] else "FAIL"))


def _capacity_text(c: dict[str, Any]) -> str:
    if c["reached_max"]:
        return f">= {c['npcs']} NPCs (--capacity-max passed)"
    if c["failed_at"] is None:
        return f">= {c['npcs']} NPCs (no count failed; the trial budget ran out)"
    if c["npcs"] == 0:
        return f"0 NPCs (even {c['failed_at']} failed)"
    budget = "" if c["resolved"] else "; the trial budget ran out before the bracket closed"
    return f"{c['npcs']} NPCs ({c['failed_at']} failed{budget})"


def capacity_lines(report: dict[str, Any]) -> list[str]:
    """The capacity search: every trial, each server's capacity, npcd's ratio to each baseline."""
    section = report.get("capacity")
    if not section:
        return []
    plan = section["plan"]
    lines = ["", f"capacity: the most NPCs served with p99 TTFT <= {section['target_p99_ttft_ms']:g} ms and no errors; "
                 f"trials of {plan['capacity_trial_s']:g} s (+{plan['capacity_drain_s']:g} s drain), at most "
                 f"{plan['capacity_trials']} per server", capacity_header()]
    lines += [capacity_row(s["server"], t) for s in section["servers"] for t in s["trials"]]
    lines += [f"capacity of {s['server']}: {_capacity_text(s['capacity'])}" for s in section["servers"]]
    for r in section.get("ratios", []):
        name = f"npcd / {r['baseline']}"
        if r["ratio"] is None:
            lines.append(f"{name}: no ratio, {r['baseline']} sustained none of the NPC counts tried")
        elif r["low"] == r["high"]:
            lines.append(f"{name}: {r['ratio']}x")
        else:
            low = f"at least {r['low']}x" if r["low"] is not None else "no lower limit"
            high = f"at most {r['high']}x" if r["high"] is not None else "no upper limit"
            lines.append(f"{name}: {r['ratio']}x as found ({low}, {high}, from the trials' brackets)")
    return lines
