"""OUTPUT/report.html: one self-contained page about a run (no network: inline CSS, images as data: URIs).

Status (result.json, else the metrics' progress), the summary, the loss and learning-rate curves,
the sample grids of the baseline, the checkpoints and the renders between them, the resolved
hyperparameters (job.json) and the end of train.log. Any part may be missing (a run that is still
loading its model has none of them): the page says so instead of failing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import threading
import time
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from ..errors import ReportWriteError
from ..outcome import read_outcome
from .metrics import JOB_FILE, read_metrics, read_progress, tail_lines, total_steps_from
from .plots import curves_png
from .result import published_checkpoints, summarize
from .samples import Render, find_renders, grid_thumbnail, read_prompts

REPORT_FILE = "report.html"
LOG_FILE = "train.log"
LOG_TAIL_BYTES, LOG_TAIL_LINES = 16 * 1024, 40
IMAGE_BUDGET_RENDERS = 8  # up to this many renders get full-size thumbnails; more get smaller ones
IMAGE_BUDGET_BYTES = 3 * 1024 * 1024  # all sample thumbnails together, before base64

log = logging.getLogger(__name__)


# ---- formatting ---------------------------------------------------------------------------------

def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _step_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _clock(timestamp: float | None) -> str:
    if timestamp is None:
        return "—"
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(_value(v))}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def _empty(text: str) -> str:
    return f"<p class='empty'>{escape(text)}</p>"


# ---- reading the run folder ---------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _log_tail(path: Path) -> list[str]:
    try:
        lines = tail_lines(path, LOG_TAIL_BYTES)
    except OSError:
        return []
    # splitlines also splits at \r: each state of a progress bar that rewrites its line is a line
    return [line for line in lines if line.strip()][-LOG_TAIL_LINES:]


# ---- sections -----------------------------------------------------------------------------------

def _status(outcome: dict[str, Any] | None, progress: dict[str, Any] | None) -> tuple[str, str, str]:
    """(css class, label, detail)."""
    if outcome is None:
        if progress is None:
            return "running", "Running", "no step finished yet (loading, caching, or not started)"
        detail = f"step {progress['step']}"
        if progress["total_steps"]:
            detail += f" of {progress['total_steps']}"
        if progress["eta_s"] is not None:
            detail += f" · about {_duration(progress['eta_s'])} left"
        if progress["updated_at"] is not None:
            detail += (f" · last step {_duration(time.time() - progress['updated_at'])} ago "
                       "(no result.json yet: still running, or its process was killed)")
        return "running", "Running", detail
    status = outcome.get("status")
    code, message = outcome.get("code"), outcome.get("message") or ""
    if status == "completed":
        final = outcome.get("final_step")
        return "completed", "Completed", f"finished at step {final}" if final is not None else "finished"
    if status == "preempted":
        return "stopped", "Stopped", message
    label = f"Failed [{code}]" if code else "Failed"
    return "failed", label, message


def _progress_bar(step: int | None, total: int | None, css_class: str) -> str:
    if not step or not total:
        return ""
    share = min(1.0, step / total)
    return f"<div class='bar {css_class}'><div style='width:{share * 100:.1f}%'></div></div>"


def _cards(summary: dict[str, Any], running: bool) -> str:
    memory = summary.get("peak_memory") or {}
    if memory.get("device_allocated_gib") is not None:
        memory_text = f"{memory['device_allocated_gib']:.1f} GiB"
        memory_note = f"{memory.get('device', 'device')} allocated; host RSS {memory.get('host_rss_gib', 0):.1f} GiB"
    elif memory.get("host_rss_gib") is not None:
        memory_text, memory_note = f"{memory['host_rss_gib']:.1f} GiB", "host RSS (no accelerator)"
    else:
        memory_text, memory_note = "—", "measured when the run ends" if running else "not measured"
    total = summary.get("total_steps")
    best_step = summary.get("best_loss_step")
    cards = [
        ("steps", f"{summary.get('steps_done', 0)}" + (f" / {total}" if total else ""),
         f"{summary.get('skipped_steps', 0)} skipped (not finite)"),
        ("last loss" if running else "final loss", _number(summary.get("final_loss")), "last finite step"),
        ("best loss", _number(summary.get("best_loss")), f"at step {best_step}" if best_step else ""),
        # the mean: when the loss is read back only every few steps, those steps carry the others' device time
        ("time per step", _step_time(summary.get("step_seconds_mean")),
         f"mean; median {_step_time(summary.get('step_seconds_median'))}"),
        ("wall time", _duration(summary.get("wall_time_s")),
         "measured when the run ends" if running else "of the last process, load and cache included"
         if summary.get("wall_time_s") is not None else "not recorded"),
        ("peak memory", memory_text, memory_note),
        ("checkpoints", str(len(summary.get("checkpoints") or [])),
         ", ".join(str(c["step"]) for c in summary.get("checkpoints") or []) or "none published yet"),
    ]
    return "<div class='cards'>" + "".join(
        f"<div class='card'><div class='label'>{escape(label)}</div><div class='value'>{escape(value)}</div>"
        f"<div class='note'>{escape(note)}</div></div>" for label, value, note in cards) + "</div>"


def _curves(records: list[dict[str, Any]], checkpoint_steps: list[int]) -> str:
    if not records:
        return _empty("No metrics yet: the curves appear once the first optimizer step is logged "
                      "to metrics.jsonl.")
    png = curves_png(records, checkpoint_steps)
    return f"<img class='curves' alt='training loss and learning rate per step' src='{_data_uri('image/png', png)}'>"


def _prompt_list(prompts: list[dict[str, Any]]) -> str:
    rows = []
    for index, entry in enumerate(prompts):
        text = str(entry.get("prompt", ""))
        short = escape(text if len(text) <= 160 else text[:157] + "…")
        body = (f"<details><summary>{short}</summary><pre>{escape(text)}</pre></details>" if len(text) > 160
                else short)
        rows.append(f"<tr><td class='mono'>{escape(str(entry.get('file', f'{index:02d}')))}</td>"
                    f"<td class='seed'>seed {escape(str(entry.get('seed', '—')))}</td><td>{body}</td></tr>")
    return f"<table class='prompts'>{''.join(rows)}</table>"


def _thumbnail(render: Render, max_side: int, max_bytes: int) -> bytes | None:
    jpeg = grid_thumbnail(render.folder, max_side)
    if jpeg is not None and len(jpeg) > max_bytes:  # a busy image: smaller and coarser, the page stays small
        jpeg = grid_thumbnail(render.folder, max(160, int(max_side * 0.6)), quality=60)
    return jpeg


def _render_card(render: Render, jpeg: bytes | None, prompts: list[dict[str, Any]],
                 reference: list[dict[str, Any]]) -> str:
    label = {"baseline": "baseline · before training", "checkpoint": "checkpoint",
             "validation": "validation render"}[render.kind]
    image = (f"<img alt='samples at step {render.step}' src='{_data_uri('image/jpeg', jpeg)}'>" if jpeg
             else _empty("its images could not be read (still being written?)"))
    own = (f"<details><summary>prompts of this render</summary>{_prompt_list(prompts)}</details>"
           if prompts and prompts != reference else "")
    return (f"<figure class='render {render.kind}'><figcaption><b>step {render.step}</b> "
            f"<span class='tag'>{label}</span></figcaption>{image}{own}</figure>")


def _samples(run_dir: Path) -> str:
    renders = find_renders(run_dir)
    if not renders:
        return _empty("No samples yet: the baseline (samples/step-0) and the checkpoints' renders appear "
                      "here once they are written.")
    # the page stays a few MB: beyond IMAGE_BUDGET_RENDERS, each thumbnail shrinks with their number
    max_side = int(max(320, min(1024, 1024 * math.sqrt(IMAGE_BUDGET_RENDERS / len(renders)))))
    max_bytes = IMAGE_BUDGET_BYTES // len(renders)
    prompts = [read_prompts(r.folder) for r in renders]
    reference = next((p for p in prompts if p), [])
    cards = "".join(_render_card(r, _thumbnail(r, max_side, max_bytes), p, reference)
                    for r, p in zip(renders, prompts))
    notes = "" if any(r.kind == "baseline" for r in renders) else _empty(
        "No baseline (samples/step-0) in this run folder.")
    scope = ("and seeds, the same at every step" if all(p == reference for p in prompts if p)
             else "of the first render; a render that differs lists its own")
    listing = (f"<details open><summary>prompts ({len(reference)}) {scope}</summary>{_prompt_list(reference)}"
               "</details>" if reference else "")
    return f"{notes}<div class='renders'>{cards}</div>{listing}"


def _hyperparameters(job: dict[str, Any] | None) -> str:
    if job is None:
        return _empty("job.json is missing or unreadable: the run writes it when it starts.")
    run_rows = [(key, job.get(key)) for key in ("training_version", "base", "dataset_dir", "caption_prefix",
                                                "version_map", "resume", "engine_version") if key in job]
    params = job.get("params") or {}
    blocks = [("run", _table(run_rows)),
              ("training parameters", _table(list(params.items())) if isinstance(params, dict) else "")]
    engine = job.get("engine") or {}
    if isinstance(engine, dict):
        for section, values in engine.items():
            if isinstance(values, dict) and values:
                blocks.append((f"engine · {section}", _table(list(values.items()))))
    return "<div class='tables'>" + "".join(
        f"<div class='tablebox'><h3>{escape(title)}</h3>{table}</div>" for title, table in blocks) + "</div>"


def _log_section(run_dir: Path) -> str:
    lines = _log_tail(run_dir / LOG_FILE)
    if not lines:
        return ""
    return (f"<section><h2>train.log</h2><details><summary>last {len(lines)} lines</summary>"
            f"<pre class='log'>{escape(chr(10).join(lines))}</pre></details></section>")


def _section(title: str, build, *args) -> str:
    """A section that cannot be built says why on the page; the rest of the report still renders."""
    try:
        body = build(*args)
    except Exception as exc:  # a half-written run folder must never cost the report
        log.warning("report: the %s section failed: %s", title, exc, exc_info=True)
        body = _empty(f"This section could not be built: {type(exc).__name__}: {exc}")
    return f"<section><h2>{escape(title)}</h2>{body}</section>"


# ---- the page -----------------------------------------------------------------------------------

def render_html(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    job = _read_json(run_dir / JOB_FILE)
    outcome = read_outcome(run_dir)
    records = read_metrics(run_dir)
    total = total_steps_from(job)
    progress = read_progress(run_dir, total)
    checkpoints = published_checkpoints(run_dir)
    summary = (outcome or {}).get("summary")
    if not isinstance(summary, dict):  # running, or a result.json written before summaries existed
        summary = summarize(records, total_steps=total, checkpoints=checkpoints)
    css_class, label, detail = _status(outcome, progress)

    subtitle = " · ".join(escape(str(part)) for part in (
        (job or {}).get("training_version"), Path(str((job or {}).get("base") or "")).name or None,
        Path(str((job or {}).get("dataset_dir") or "")).name or None) if part)
    header = (f"<header><div class='title'><h1>{escape(run_dir.resolve().name)}</h1>"
              f"<div class='subtitle'>{subtitle or 'tailoredgen-train run'}</div></div>"
              f"<div class='status {css_class}'><span class='pill'>{escape(label)}</span>"
              f"<span class='detail'>{escape(detail)}</span></div></header>"
              f"{_progress_bar(summary.get('steps_done'), summary.get('total_steps'), css_class)}")
    body = "".join([
        header,
        _section("summary", _cards, summary, outcome is None),
        _section("loss and learning rate", _curves, records, [c["step"] for c in checkpoints]),
        _section("samples", _samples, run_dir),
        _section("hyperparameters", _hyperparameters, job),
        _log_section(run_dir),
        f"<footer>{escape(str(run_dir.resolve()))} · page built {escape(_clock(time.time()))} by "
        f"tailoredgen-train {escape(str((job or {}).get('engine_version', '')))}</footer>",
    ])
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{escape(run_dir.resolve().name)} · {escape(label)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main></body></html>")


def build_report(run_dir: str | Path) -> Path:
    """Write OUTPUT/report.html (staging file, fsync, rename) and return its path. Raises
    ReportWriteError only when the file cannot be written."""
    run_dir = Path(run_dir)
    page = render_html(run_dir)
    target = run_dir / REPORT_FILE
    staging = run_dir / f".{REPORT_FILE}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(staging, "w", encoding="utf-8") as handle:
            handle.write(page)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            staging.unlink(missing_ok=True)
        raise ReportWriteError(f"cannot write {target}: {exc}. Make the run folder writable or free disk space, "
                               "then run `tailoredgen-train report` on it again.") from None
    return target


def refresh_report(run_dir: str | Path) -> Path | None:
    """build_report for the training loop: a report that cannot be written is a warning, never the
    end of a run."""
    try:
        return build_report(run_dir)
    except Exception as exc:  # a report bug must not end a run that trains fine
        log.warning("could not write %s: %s", Path(run_dir) / REPORT_FILE, exc, exc_info=True)
        return None


CSS = """
:root { --ink:#1d2330; --muted:#6b7385; --line:#e3e6ec; --bg:#f5f6f8; --card:#fff;
        --blue:#1f4e96; --green:#1f7a4d; --red:#b3261e; --amber:#a15c00; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 28px 40px; }
header { display:flex; flex-wrap:wrap; gap:12px 32px; align-items:flex-end; justify-content:space-between; }
h1 { font-size: 24px; margin: 0; letter-spacing: -0.01em; }
.subtitle { color: var(--muted); margin-top: 2px; }
.status { display:flex; flex-direction:column; align-items:flex-end; gap:4px; max-width: 60%; }
.status .detail { color: var(--muted); text-align: right; overflow-wrap: anywhere; }
.pill { font-weight: 600; padding: 3px 12px; border-radius: 999px; color:#fff; font-size: 13px; }
.running .pill { background: var(--blue); } .completed .pill { background: var(--green); }
.failed .pill { background: var(--red); } .stopped .pill { background: var(--amber); }
.failed .detail { color: var(--red); }
.bar { height: 6px; background: var(--line); border-radius: 3px; margin-top: 14px; overflow: hidden; }
.bar > div { height: 100%; background: var(--blue); }
.bar.completed > div { background: var(--green); } .bar.failed > div { background: var(--red); }
.bar.stopped > div { background: var(--amber); }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 16px 20px;
          margin-top: 18px; }
h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: 0 0 12px; }
h3 { font-size: 13px; margin: 0 0 6px; }
.cards { display:grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 10px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.card .label { color: var(--muted); font-size: 12px; }
.card .value { font-size: 20px; font-weight: 600; margin: 2px 0; font-variant-numeric: tabular-nums; }
.card .note { color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
img.curves { width: 100%; height: auto; display: block; }
.renders { display:grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 14px; }
figure.render { margin: 0; border: 1px solid var(--line); border-radius: 8px; padding: 8px; background: #fafbfc; }
figure.render.baseline { border-color: #9aa3b5; background: #eef0f4; }
figure.render.checkpoint { border-color: #8fb39f; }
figure.render img { width: 100%; height: auto; display: block; border-radius: 4px; }
figcaption { margin: 0 2px 6px; }
.tag { color: var(--muted); font-size: 12px; margin-left: 4px; }
.checkpoint .tag { color: var(--green); } .baseline .tag { color: var(--ink); }
table.prompts { border-collapse: collapse; width: 100%; margin-top: 6px; }
table.prompts td { padding: 4px 10px 4px 0; border-top: 1px solid var(--line); vertical-align: top;
                   overflow-wrap: anywhere; }
table.prompts td.mono, table.prompts td.seed { white-space: nowrap; width: 1%; }
table.prompts details > summary { margin-top: 0; color: var(--ink); }
.mono, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
.seed { color: var(--muted); font-size: 12px; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: 6px 0; }
pre.log { background: #1d2330; color: #e6e9ef; padding: 10px 12px; border-radius: 6px; max-height: 480px;
          overflow: auto; }
details > summary { cursor: pointer; color: var(--muted); margin-top: 8px; }
.tables { display:grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 16px; }
table.kv { border-collapse: collapse; width: 100%; }
table.kv th, table.kv td { text-align: left; padding: 3px 8px 3px 0; border-top: 1px solid var(--line);
                           vertical-align: top; font-size: 13px; }
table.kv th { color: var(--muted); font-weight: normal; white-space: nowrap; width: 1%; }
table.kv td { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px;
              overflow-wrap: anywhere; }
.empty { color: var(--muted); font-style: italic; margin: 4px 0; }
footer { color: var(--muted); font-size: 12px; margin-top: 18px; overflow-wrap: anywhere; }
"""
