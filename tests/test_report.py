"""report.html and its plots, rendered from real digits, checked as a browser shows them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from ensemble.config import Config
from ensemble.report import ensemble_size_curve, kaggle_submit_line, render_report
from ensemble.results import FinishedMember, RunResults, write_results
from ensemble.scoring import MemberLogits
from ensemble.storage import Storage
from ensemble.vote import vote

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def fake_run(tmp_path: Path, sample, holdout: int = 300) -> tuple[RunResults, dict]:
    """Three members' logits on real holdout digits: right most of the time, each wrong in its own way."""
    images, labels = sample[0][:holdout], sample[1][:holdout]
    rng = np.random.default_rng(0)
    members = []
    for index in range(3):
        logits = np.eye(10)[labels] * 3 + rng.normal(0, 1.2, (holdout, 10))
        history = [
            {
                "epoch": e,
                "accuracy": 0.8 + 0.03 * e,
                "val_accuracy": 0.78 + 0.03 * e,
                "loss": 1 / e,
                "val_loss": 1.1 / e,
            }
            for e in range(1, 6)
        ]
        name = f"member-{index:02d}"
        entry = {
            "name": name, "index": index, "seed": index, "split_seed": 10 + index, "strength": 0.5 + 0.5 * index,
            "epochs": 5, "best_epoch": 5, "val_accuracy": 0.93,
        }  # fmt: skip
        members.append(FinishedMember(entry, history, MemberLogits(name, logits, logits[:10], logits)))
    run = RunResults(Storage(str(tmp_path)), Config().to_dict(), members, [], images, labels, {})
    # The report as a run writes it (intervals and the paired test included), through the real code path.
    report = write_results(run, "logits")
    return run, report


def render(run: RunResults, report: dict) -> dict[str, bytes]:
    logits = np.stack([member.logits.holdout for member in run.members])
    histories = {member.entry["name"]: member.history for member in run.members}
    return render_report(run.storage, report, histories, run.holdout_images, run.holdout_labels, logits, vote(logits))


def test_every_plot_is_written_and_embedded(tmp_path: Path, sample) -> None:
    run, report = fake_run(tmp_path, sample)
    images = render(run, report)
    assert sorted(images) == sorted(["curves.png", "ensemble_size.png", "confusion.png", "errors.png",
                                     "disagreement.png"])  # fmt: skip
    for name in images:
        height, width, _ = matplotlib.image.imread(tmp_path / name).shape
        assert height > 100 and width > 200
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5
    assert "member-02" in page and "Members disagree on" in page
    # Every accuracy with its 95% interval, and the verdict of the paired test against the best member.
    assert len(re.findall(r"\d+\.\d\d%(?:</b>)? \[\d+\.\d\d, \d+\.\d\d\]", page)) == 4
    assert "exact McNemar p = " in page


def test_ensemble_size_curve_ends_at_the_full_ensemble(sample) -> None:
    labels = sample[1][:200]
    logits = np.stack([np.eye(10)[labels] + np.random.default_rng(i).normal(0, 0.8, (200, 10)) for i in range(4)])
    curve = ensemble_size_curve(logits, labels, "logits")
    full = float(np.mean(vote(logits).argmax(1) == labels))
    assert curve["in_order"][-1] == pytest.approx(full) and curve["random_mean"][-1] == pytest.approx(full)
    assert curve["in_order"][0] == pytest.approx(float(np.mean(logits[0].argmax(1) == labels)))
    assert curve["random_std"][-1] == pytest.approx(0.0)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (CI installs it)")
def test_report_shows_its_images_in_a_browser(tmp_path: Path, sample) -> None:
    run, report = fake_run(tmp_path, sample)
    render(run, report)
    # The page as a browser loads it, plus a check of every image: decoded, with a real size.
    probe = tmp_path / "probe.html"
    probe.write_text(
        (tmp_path / "report.html")
        .read_text()
        .replace(
            "</body>",
            "<script>window.addEventListener('load', () => { const images = [...document.images];"
            " document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 100).length;"
            " document.body.dataset.total = images.length; });</script></body>",
        )
    )
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run([*browser, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r'data-loaded="(\d+)" data-total="(\d+)"', dom.stdout)
    assert match, dom.stderr[-2000:]
    assert match[1] == match[2] == "5"
    screenshot = tmp_path / "report.png"
    subprocess.run([*browser, f"--screenshot={screenshot}", "--window-size=1300,2400", probe.as_uri()],
                   capture_output=True, timeout=120)  # fmt: skip
    assert matplotlib.image.imread(screenshot).std() > 0.05  # not a blank page


def test_a_run_on_all_of_kaggles_test_csv_ends_with_the_command_that_submits_it(tmp_path: Path, sample) -> None:
    run, report = fake_run(tmp_path / "my run", sample)
    accuracy = f"{100 * report['ensemble']['holdout_accuracy']:.2f}%"
    assert kaggle_submit_line(run.storage, report, 28_000) == (
        f"to submit it: kaggle competitions submit -c digit-recognizer -f '{tmp_path}/my run/submission.csv' "
        f"-m 'digit-ensemble: 3 members, logits vote, holdout {accuracy} of 300'"
    )
    assert kaggle_submit_line(run.storage, report, 1_000) is None  # Kaggle takes all 28,000 rows or none
