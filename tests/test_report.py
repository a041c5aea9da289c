"""The run report: metrics.jsonl (resumes, torn lines, the tail-only progress read), the summary in
result.json, and report.html (self-contained, every render, every status), on synthetic run folders."""

from __future__ import annotations

import base64
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from helpers import params, tiny_engine
from tailoredgen_train import __version__
from tailoredgen_train.cli import EXIT_USER_ERROR, main
from tailoredgen_train.engine.checkpoint import LORA_FILE, Checkpointer
from tailoredgen_train.outcome import clear_outcome, read_outcome, write_outcome
from tailoredgen_train.recipe import JobSpec
from tailoredgen_train.errors import ReportWriteError
from tailoredgen_train.report import (MetricsLog, build_report, read_metrics, read_progress, refresh_report,
                                      summarize, summarize_run)
from tailoredgen_train.report import metrics as metrics_module

TOTAL_STEPS, INTERVAL = 150, 50
PROMPTS = ["a red circle on a white background", "a blue square, flat illustration"]
COLORS = {0: (200, 40, 40), 50: (40, 160, 60), 75: (40, 60, 200), 100: (220, 180, 30)}


def loss_at(step: int, attempt: int) -> float:
    """Distinct per attempt, so a test can tell which pass's record was kept."""
    return round(1.0 / step + attempt, 6)


def write_job(run: Path) -> None:
    job = JobSpec(base="/models/tiny-fibo-base", dataset_dir="/data/mascot", output_dir=str(run),
                  training_version="fibo", params=params(TOTAL_STEPS, lr=2e-4, rank=16, interval=INTERVAL),
                  engine=tiny_engine())
    (run / "job.json").write_text(json.dumps({**job.to_dict(), "engine_version": __version__}, indent=1))


def write_render(folder: Path, color: tuple[int, int, int], size: int = 64) -> None:
    folder.mkdir(parents=True)
    for index in range(len(PROMPTS)):
        Image.new("RGB", (size, size), color).save(folder / f"{index:02d}.png")
    Image.new("RGB", (size * len(PROMPTS), size), color).save(folder / "grid.png")
    (folder / "prompts.json").write_text(json.dumps(
        [{"file": f"{i:02d}.png", "prompt": p, "seed": 1000 + i} for i, p in enumerate(PROMPTS)]))


def make_run(run: Path, *, last_step: int = 120, renders: bool = True) -> Path:
    """A run killed after step 80, resumed from its step-50 state, killed again mid-line after
    `last_step`: metrics 1..80, then 51..last_step, then a torn line."""
    run.mkdir(parents=True)
    write_job(run)
    with MetricsLog(run) as metrics:
        for step in range(1, 81):
            metrics.append({"step": step, "loss": loss_at(step, 0), "lr": 2e-4, "grad_norm": 0.5, "seconds": 0.1})
        for step in range(51, last_step + 1):
            bad = step == 90  # a non-finite step, skipped by the trainer
            metrics.append({"step": step, "loss": math.nan if bad else loss_at(step, 1), "lr": 2e-4,
                            "grad_norm": math.inf if bad else 0.5, "seconds": 0.1, "skipped": bad})
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": %d, "loss": 0.3' % (last_step + 1))  # killed mid-write
    checkpointer = Checkpointer(run)
    for step in (50, 100):
        if step <= last_step:
            checkpointer.publish(step, lambda folder: (folder / LORA_FILE).write_bytes(b"lora"))
    if renders:
        write_render(run / "samples" / "step-0", COLORS[0])
        write_render(run / "samples" / "step-75", COLORS[75])
        for step in (50, 100):
            write_render(run / f"checkpoint-{step}" / "samples", COLORS[step])
    return run


# ---- metrics.jsonl ------------------------------------------------------------------------------

def test_read_metrics_keeps_the_last_record_of_each_step_and_skips_the_torn_line(tmp_path):
    run = make_run(tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    # negative control: the raw file repeats steps 51..80 and ends in a line no JSON parser accepts
    assert len(lines) == 80 + 70 + 1
    with pytest.raises(ValueError):
        json.loads(lines[-1])

    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 121))
    assert records[49]["loss"] == loss_at(50, 0)  # before the resume point: the first pass's
    assert records[59]["loss"] == loss_at(60, 1)  # redone by the resume: the second pass's
    assert records[89]["skipped"] is True and records[89]["loss"] is None and records[89]["grad_norm"] is None
    # what the file holds is strict JSON: non-finite values are null, not NaN
    for line in lines[:-1]:
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_a_rewind_drops_the_steps_the_resume_has_not_redone_yet(tmp_path):
    with MetricsLog(tmp_path) as metrics:
        metrics.extend({"step": s, "loss": loss_at(s, 0)} for s in range(1, 81))
        metrics.extend({"step": s, "loss": loss_at(s, 1)} for s in range(51, 61))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 61))
    assert records[-1]["loss"] == loss_at(60, 1)


def test_appending_after_a_torn_line_keeps_the_new_record(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    with MetricsLog(tmp_path) as metrics:
        metrics.append({"step": 2, "loss": 0.25})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 0.5), (2, 0.25)]


class CountingOpen:
    """open() that counts the bytes read through it."""

    def __init__(self):
        self.bytes_read = 0

    def __call__(self, *args, **kwargs):
        handle = open(*args, **kwargs)
        spy = self

        class Handle:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def seek(self, *a):
                return handle.seek(*a)

            def read(self, *a):
                data = handle.read(*a)
                spy.bytes_read += len(data)
                return data

        return Handle()


def test_read_progress_reads_only_the_tail(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "w") as handle:  # a long run: 20,000 lines of an old pass first
        for step in range(1, 20_001):
            handle.write(json.dumps({"step": step, "loss": 9.0, "seconds": 5.0, "time": float(step)}) + "\n")
        for step in range(101, 121):  # the resumed process: 2 s of wall clock per step, 0.5 s measured
            handle.write(json.dumps({"step": step, "loss": loss_at(step, 1), "seconds": 0.5,
                                     "time": 1000.0 + 2 * step}) + "\n")
        handle.write('{"step": 121, "lo')
    size = (run / "metrics.jsonl").stat().st_size
    spy = CountingOpen()
    monkeypatch.setattr(metrics_module, "open", spy, raising=False)

    progress = read_progress(run)
    assert spy.bytes_read <= metrics_module.TAIL_BYTES < size
    assert progress["step"] == 120 and progress["total_steps"] == TOTAL_STEPS  # from job.json
    assert progress["loss"] == loss_at(120, 1)
    assert progress["step_seconds"] == 0.5
    assert progress["eta_s"] == pytest.approx((TOTAL_STEPS - 120) * 2.0)  # the wall-clock pace
    assert progress["updated_at"] == 1240.0
    assert read_progress(run, total_steps=200)["total_steps"] == 200

    # negative control: the spy does count; a tail as large as the file reads all of it
    spy.bytes_read = 0
    read_progress(run, tail_bytes=size)
    assert spy.bytes_read == size


def test_read_progress_reaches_back_past_steps_written_at_one_sync(tmp_path):
    """host_sync=log: the trainer writes 100 steps at a time, all with one timestamp."""
    with open(tmp_path / "metrics.jsonl", "w") as handle:
        for step in range(1, 201):
            handle.write(json.dumps({"step": step, "loss": 0.5, "seconds": 0.01 if step % 100 else 29.0,
                                     "time": 3000.0 if step <= 100 else 3300.0}) + "\n")
    progress = read_progress(tmp_path, total_steps=300)
    assert progress["step_seconds"] == 0.01  # the median sees the host time of the unsynced steps
    assert progress["eta_s"] == pytest.approx(100 * 3.0)  # the wall clock does not


def test_read_progress_without_timestamps_uses_the_median_step_time(tmp_path):
    with MetricsLog(tmp_path) as metrics:
        metrics.extend({"step": s, "loss": 0.5, "seconds": 3.0 if s == 4 else 1.0} for s in range(1, 6))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "time"}) + "\n"
                                                    for r in lines))
    progress = read_progress(tmp_path, total_steps=10)
    assert progress["step_seconds"] == 1.0 and progress["eta_s"] == 5.0
    assert read_progress(tmp_path)["total_steps"] is None and read_progress(tmp_path)["eta_s"] is None


def test_read_progress_is_none_before_the_first_step(tmp_path):
    assert read_progress(tmp_path) is None  # no file
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo')
    assert read_progress(tmp_path) is None  # only a torn line


# ---- the summary in result.json -----------------------------------------------------------------

def test_summary_ignores_skipped_steps_and_lists_published_checkpoints(tmp_path):
    run = make_run(tmp_path / "run")
    summary = summarize_run(run, started_at=0.0)
    assert summary["steps_done"] == 120 and summary["total_steps"] == TOTAL_STEPS
    assert summary["final_loss"] == loss_at(120, 1)
    # steps 51..80 of the first pass were redone: the best kept loss is step 50, the last of that pass
    assert summary["best_loss"] == loss_at(50, 0) and summary["best_loss_step"] == 50
    assert summary["skipped_steps"] == 1
    assert summary["step_seconds_median"] == 0.1 and summary["wall_time_s"] > 0
    assert summary["checkpoints"] == [{"step": 50, "path": "checkpoint-50"}, {"step": 100, "path": "checkpoint-100"}]
    memory = summary["peak_memory"]
    assert memory["host_rss_gib"] > 0 and memory["device"] in ("cpu", "cuda")

    write_outcome(run, "completed", final_step=120, summary=summary, rank=0)
    text = (run / "result.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in result.json"))
    outcome = read_outcome(run)
    assert outcome["status"] == "completed" and outcome["summary"] == summary
    clear_outcome(run)
    assert read_outcome(run) is None


def test_summarize_takes_step_records_too(tmp_path):
    from tailoredgen_train.engine.trainer import StepRecord

    history = [StepRecord(step=1, loss=0.5, lr=1e-4, grad_norm=1.0, seconds=0.2),
               StepRecord(step=2, loss=math.inf, lr=1e-4, grad_norm=math.nan, skipped=True, seconds=0.2),
               StepRecord(step=3, loss=0.25, lr=1e-4, grad_norm=1.0, seconds=0.4)]
    summary = summarize(history, total_steps=3)
    assert (summary["final_loss"], summary["best_loss"], summary["skipped_steps"]) == (0.25, 0.25, 1)
    assert summary["step_seconds_mean"] == pytest.approx(0.2667, abs=1e-4)
    assert summarize([])["final_loss"] is None


# ---- report.html --------------------------------------------------------------------------------

class Page(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attrs))
        if tag == "img":
            self.images.append(attrs)

    def handle_data(self, data):
        self.text.append(data)


def assert_self_contained(html: str) -> Page:
    page = Page(html)
    assert "http://" not in html and "https://" not in html
    for tag, attrs in page.tags:
        assert tag not in ("link", "iframe", "object", "embed"), tag
        assert not (tag == "script" and "src" in attrs)
        for name in ("src", "href", "srcset", "poster", "action"):
            if name in attrs:
                assert not attrs[name].startswith("//"), (tag, name)
                assert name != "src" or attrs[name].startswith("data:"), (tag, attrs[name][:40])
    assert "url(" not in html.replace("url(data:", "")
    return page


def thumbnail_color(src: str) -> tuple[int, int, int]:
    data = base64.b64decode(src.split(",", 1)[1])
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return image.convert("RGB").getpixel((image.width // 2, image.height // 2))


def test_report_is_self_contained_with_hyperparameters_curves_and_every_render(tmp_path):
    run = make_run(tmp_path / "run")
    write_outcome(run, "completed", final_step=TOTAL_STEPS, rank=0, summary=summarize_run(run))
    path = build_report(run)
    assert path == run / "report.html"
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no staging file left
    html = path.read_text()
    page = assert_self_contained(html)
    text = " ".join(page.text)

    assert "Completed" in text
    for key, value in (("learning_rate", "0.0002"), ("rank", "16"), ("total_training_steps", "150"),
                       ("checkpoint_interval", "50"), ("global_batch_size", "1"),
                       ("training_version", "fibo"), ("base", "/models/tiny-fibo-base"),
                       ("dataset_dir", "/data/mascot")):
        assert f"<th>{key}</th><td>{value}</td>" in html, key
    assert PROMPTS[0] in text and "seed 1000" in text

    curves = [i for i in page.images if i["src"].startswith("data:image/png")]
    assert len(curves) == 1
    samples = {i["alt"]: i["src"] for i in page.images if i["alt"].startswith("samples at step")}
    assert list(samples) == [f"samples at step {s}" for s in (0, 50, 75, 100)]  # in step order
    for step, src in zip((0, 50, 75, 100), samples.values()):
        assert max(abs(a - b) for a, b in zip(thumbnail_color(src), COLORS[step])) < 12, step
    assert "baseline · before training" in text and text.count("checkpoint") >= 2
    assert "validation render" in text


@pytest.mark.parametrize("leak", ["<img src='https://cdn.example/x.png'>", "<script src='app.js'></script>",
                                  "<link rel='stylesheet' href='//fonts.example/a.css'>",
                                  "<style>body { background: url(bg.png) }</style>", "<img src='grid.png'>"])
def test_the_self_containment_check_catches_a_reference(tmp_path, leak):
    """Negative control for assert_self_contained: a real page with one outside reference fails it."""
    run = tmp_path / "run"
    run.mkdir()
    html = build_report(run).read_text()
    assert_self_contained(html)
    with pytest.raises(AssertionError):
        assert_self_contained(html.replace("</main>", leak + "</main>"))


def test_report_keeps_a_long_run_small(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_job(run)
    noise = io.BytesIO()  # the worst case for JPEG: 40 renders of 1024 x 512 noise
    Image.effect_noise((1024, 512), 60).convert("RGB").save(noise, format="PNG", compress_level=0)
    for step in range(0, 4000, 100):
        folder = run / "samples" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / "grid.png").write_bytes(noise.getvalue())
    html = build_report(run).read_text()
    assert len(Page(html).images) == 40
    assert len(html) < 6 * 1024 * 1024


def test_running_and_failed_and_stopped_runs_show_their_status(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "train.log").write_text("INFO loading\ntrain:  79%|####  | 119/150\rtrain:  80%|####  | 120/150\n")
    text = " ".join(Page(build_report(run).read_text()).text)
    assert "Running" in text and "step 120 of 150" in text and "left" in text
    assert "train:  80%|####  | 120/150" in text  # the log's tail, each progress-bar state a line

    write_outcome(run, "failed", code="oom", message="out of memory in step 121 (CUDA)", rank=0)
    text = " ".join(Page(build_report(run).read_text()).text)
    assert "Failed [oom]" in text and "out of memory in step 121 (CUDA)" in text and "Running" not in text

    write_outcome(run, "preempted", code="preempted", message="stopped by signal 15 after step 120", rank=0)
    text = " ".join(Page(build_report(run).read_text()).text)
    assert "Stopped" in text and "stopped by signal 15" in text


@pytest.mark.parametrize("contents", ["nothing", "job only", "unreadable render"])
def test_an_unfinished_run_folder_still_gets_a_valid_page(tmp_path, contents):
    run = tmp_path / "run"
    run.mkdir()
    if contents != "nothing":
        write_job(run)
    if contents == "unreadable render":
        folder = run / "samples" / "step-0"
        folder.mkdir(parents=True)
        (folder / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n half written")
    html = build_report(run).read_text()
    text = " ".join(assert_self_contained(html).text)
    assert "No metrics yet" in text
    if contents == "nothing":
        assert "job.json is missing" in text and "No samples yet" in text
    elif contents == "job only":
        assert "learning_rate" in text and "No samples yet" in text
    else:
        assert "could not be read" in text
    assert "could not be built" not in text  # every section rendered


# ---- the CLI ------------------------------------------------------------------------------------

def test_cli_report_rebuilds_the_page_and_refuses_a_folder_that_is_not_a_run(capsys, tmp_path):
    run = make_run(tmp_path / "run", renders=False)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(run / "report.html") and Path(out).is_file()

    for folder in (tmp_path / "missing", tmp_path):
        assert main(["report", str(folder)]) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith("error [not_a_run_folder]:") and str(folder) in err


def test_a_report_that_cannot_be_written_is_a_coded_error_and_never_stops_training(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(ReportWriteError, match="cannot write"):
        build_report(not_a_folder)
    assert refresh_report(not_a_folder) is None  # what the training loop calls: a warning only
    assert refresh_report(make_run(tmp_path / "run", renders=False)) == tmp_path / "run" / "report.html"
