"""What a run reports: the summary printed at its end, and report.html with its pictures.

The summary (`summary_table`): a row per member, the ensemble, whether it beats its best member beyond
noise, the estimates with data.folds, the pseudo-labelling rounds; and for a run that labelled all of
Kaggle's test.csv, the command that submits it (`kaggle_submit_line`).

The pictures: PNG plots and one self-contained report.html (images embedded) beside them.

- curves.png: each member's training and validation accuracy and loss by epoch;
- ensemble_size.png: ensemble holdout accuracy by number of members (in member order, and the mean
  over random orders), to see when more members stop helping;
- confusion.png: the ensemble's confusion matrix on the holdout;
- errors.png: the holdout digits the ensemble gets wrong, with true and predicted label and confidence;
- disagreement.png: how often each pair of members disagrees on the holdout (diversity).
The holdout plots are left out, with a note, when the run has no holdout.
"""

from __future__ import annotations

import base64
import html
import io
import shlex
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix

from ensemble.data import NUM_CLASSES
from ensemble.rundir import HTML_REPORT_FILE, SUBMISSION_FILE
from ensemble.storage import Storage
from ensemble.vote import vote, vote_probabilities

RANDOM_ORDERS = 50
MAX_ERRORS_SHOWN = 48
KAGGLE_TEST_ROWS = 28_000  # Kaggle's test.csv, every row of which a submission must label


def kaggle_submit_line(storage: Storage, report: dict[str, Any], test_rows: int) -> str | None:
    """The command that sends the run's submission to Kaggle's Digit Recognizer (with the kaggle CLI): for a run
    that labelled all of Kaggle's test.csv (Kaggle refuses any other row count)."""
    if test_rows != KAGGLE_TEST_ROWS:
        return None
    ensemble = report["ensemble"]
    message = f"digit-ensemble: {len(report['members'])} members, {ensemble['vote']} vote"
    if ensemble["holdout_accuracy"] is not None:
        message += f", holdout {100 * ensemble['holdout_accuracy']:.2f}% of {ensemble['holdout_size']:,}"
    submission = f"{storage.location}/{SUBMISSION_FILE}"
    local = shlex.quote(submission) if storage.is_local else SUBMISSION_FILE
    command = f"kaggle competitions submit -c digit-recognizer -f {local} -m {shlex.quote(message)}"
    return f"to submit it: {command}" if storage.is_local else f"to submit it, copy {submission} here, then: {command}"


def summary_table(report: dict[str, Any]) -> str:
    """The human summary printed at the end of a run: a row per member, the ensemble, and whether it beats
    its best member beyond noise (holdout accuracies with their 95% Wilson intervals)."""

    def percent(value: float | None, interval: list[float] | None = None) -> str:
        if value is None:
            return "n/a"
        return f"{100 * value:.2f}%" + (f" [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]" if interval else "")

    members, ensemble = report["members"], report["ensemble"]
    lines = [f"{'member':<10}{'strength':>9}{'epochs':>8}{'best':>6}{'val acc':>10}   holdout acc [95% interval]"]
    for member in members:
        lines.append(
            f"{member['name']:<10}{member['strength']:>9.2f}{member['epochs']:>8}{member['best_epoch']:>6}"
            f"{percent(member['val_accuracy']):>10}   {percent(member['holdout_accuracy'], member['holdout_interval'])}"
        )
    lines.append(f"{'ensemble':<43}   {percent(ensemble['holdout_accuracy'], ensemble['holdout_interval'])}")
    if "against_best_member" in ensemble:
        lines.append(verdict(ensemble["against_best_member"], ensemble["holdout_accuracy"]))
    lines += estimate_lines(ensemble)
    lines += [round_line(entry) for entry in report.get("rounds", [])]
    return "\n".join(lines)


def estimate_lines(ensemble: dict[str, Any]) -> list[str]:
    """With data.folds: the members' out-of-fold accuracy, and the accuracy to expect on unseen images."""
    if "out_of_fold" not in ensemble:
        return []
    fold, expected = ensemble["out_of_fold"], ensemble["expected_on_unseen"]

    def percent(value: float, interval: list[float]) -> str:
        return f"{100 * value:.2f}% [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]"

    by = "a member" if fold["members_per_image"] == 1 else "the members"
    lines = [
        f"out of fold: {percent(fold['accuracy'], fold['interval'])} on {fold['images']:,} pool images, each "
        f"predicted by {by} that never trained on it"
    ]
    gain = expected["holdout_gain_over_average_member"]
    if gain is None:
        lines.append(
            f"expected on unseen images: at least {percent(expected['accuracy'], expected['interval'])}, the "
            "members' out-of-fold accuracy (no holdout to measure what the vote adds)"
        )
    else:
        lines.append(
            f"expected on unseen images: {percent(expected['accuracy'], expected['interval'])}: the members out of "
            f"fold, {gain * 100:+.2f} points that the vote adds to its average member on the "
            f"{ensemble['holdout_size']:,}-image holdout"
        )
    return lines


def round_line(entry: dict[str, Any]) -> str:
    """One pseudo-labelling round: how many test images joined, and its ensemble's holdout accuracy."""
    added = f", with {entry['pseudo_labelled']} pseudo-labelled test images" if entry["round"] else ""
    accuracy = entry["holdout_accuracy"]
    score = "no holdout" if accuracy is None else f"holdout {100 * accuracy:.2f}%"
    interval = entry["holdout_interval"]
    score += f" [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]" if interval else ""
    return f"round {entry['round']} ({len(entry['members'])} members{added}): {score}"


def verdict(comparison: dict[str, Any], ensemble_accuracy: float) -> str:
    """One line: the ensemble against its best member, and whether the difference is beyond noise."""
    gain = 100 * (ensemble_accuracy - comparison["member_holdout_accuracy"])
    judged = "better beyond noise" if comparison["ensemble_better_beyond_noise"] else "not better beyond noise"
    return (
        f"ensemble vs best member ({comparison['member']}): {gain:+.2f} points; right only by the ensemble on "
        f"{comparison['ensemble_only_right']} holdout images, only by the member on {comparison['member_only_right']}; "
        f"exact McNemar p = {comparison['p_value']:.3g}: {judged}"
    )


def _figure(columns: int = 1, rows: int = 1, **options: Any) -> tuple[Figure, Any]:
    """A figure drawn without pyplot: no display, no global backend to choose, nothing to close."""
    figure = Figure(figsize=options.pop("figsize", None))
    return figure, figure.subplots(rows, columns, **options)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_curves(histories: dict[str, list[dict[str, float]]]) -> bytes:
    """Each member's accuracy and loss by epoch: validation solid, training dashed (training alone without
    a validation split)."""
    figure, axes = _figure(2, figsize=(12, 4.5))
    for index, (name, history) in enumerate(histories.items()):
        color = f"C{index % 10}"
        epochs = [epoch["epoch"] for epoch in history]
        validated = all("val_loss" in epoch for epoch in history)
        for axis, metric in zip(axes, ("accuracy", "loss"), strict=True):
            axis.plot(
                epochs, [e[metric] for e in history], "--", color=color, alpha=0.6, label=None if validated else name
            )
            if validated:
                axis.plot(epochs, [e[f"val_{metric}"] for e in history], color=color, label=name)
    for axis, metric in zip(axes, ("accuracy", "loss"), strict=True):
        axis.set(xlabel="epoch", ylabel=metric, title=f"{metric}: validation (solid), training (dashed)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return _png(figure)


def ensemble_size_curve(holdout_logits: np.ndarray, labels: np.ndarray, method: str, seed: int = 0) -> dict:
    """Holdout accuracy of the first k members, k = 1..M: in member order, and over random orders."""
    members = len(holdout_logits)

    def accuracy_of(order: np.ndarray) -> list[float]:
        # The weighted vote refits per subset elsewhere; here every subset gets the plain mean of logits.
        subset_method = "logits" if method == "weighted" else method
        return [
            float(np.mean(vote(holdout_logits[order[:k]], subset_method).argmax(1) == labels))
            for k in range(1, members + 1)
        ]

    rng = np.random.default_rng(seed)
    random = np.array([accuracy_of(rng.permutation(members)) for _ in range(RANDOM_ORDERS)])
    return {"in_order": accuracy_of(np.arange(members)), "random_mean": random.mean(0), "random_std": random.std(0)}


def plot_ensemble_size(curve: dict) -> bytes:
    sizes = np.arange(1, len(curve["in_order"]) + 1)
    figure, axis = _figure(figsize=(6.5, 4.5))
    axis.plot(sizes, curve["in_order"], "o-", label="members in order")
    axis.plot(sizes, curve["random_mean"], "s-", label=f"mean over {RANDOM_ORDERS} random orders")
    low, high = curve["random_mean"] - curve["random_std"], curve["random_mean"] + curve["random_std"]
    axis.fill_between(sizes, low, high, alpha=0.2, label="± 1 std")
    axis.set(xlabel="members in the vote", ylabel="holdout accuracy", title="Does another member help?")
    axis.set_xticks(sizes)
    axis.grid(alpha=0.3)
    axis.legend()
    return _png(figure)


def plot_confusion(labels: np.ndarray, predicted: np.ndarray) -> bytes:
    matrix = confusion_matrix(labels, predicted, labels=range(NUM_CLASSES))
    figure, axis = _figure(figsize=(6, 5.5))
    axis.imshow(np.log1p(matrix), cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        if count:
            color = "white" if row == column else "black"
            axis.text(column, row, count, ha="center", va="center", fontsize=8, color=color)
    digits = range(NUM_CLASSES)
    axis.set(xlabel="predicted", ylabel="true", title="Ensemble on the holdout", xticks=digits, yticks=digits)
    return _png(figure)


def plot_errors(images: np.ndarray, labels: np.ndarray, scores: np.ndarray, method: str) -> bytes:
    predicted = scores.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    probabilities = vote_probabilities(scores, method)
    shown = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:MAX_ERRORS_SHOWN]  # most confident first
    columns = 8
    rows = max(1, -(-len(shown) // columns))
    # One image of all the digits, each with its caption in the gap above it: drawn in 0.4 s of CPU, where a grid
    # of 48 axes took 2.2 s (measured on 2 cores), in every run's report.
    size, gap, caption = images.shape[1], 4, 12
    mosaic = np.zeros((rows * (size + caption), columns * (size + gap)), dtype=images.dtype)
    figure, axis = _figure(figsize=(columns * 1.3, rows * 1.5))
    for position, index in enumerate(shown):
        top, left = (position // columns) * (size + caption) + caption, (position % columns) * (size + gap)
        mosaic[top : top + size, left : left + size] = images[index, :, :, 0]
        confidence = probabilities[index, predicted[index]]
        text = f"{labels[index]}→{predicted[index]} ({confidence:.0%})"
        axis.text(left + size / 2, top - 2, text, ha="center", va="bottom", fontsize=8, color="firebrick")
    axis.imshow(mosaic, cmap="gray_r")
    axis.axis("off")
    axis.set_title(f"{len(wrong)} holdout digits misclassified (true→predicted, confidence); most confident first")
    return _png(figure)


def disagreement(holdout_logits: np.ndarray) -> np.ndarray:
    """Fraction of holdout images on which each pair of members predicts different digits."""
    predictions = holdout_logits.argmax(axis=2)
    return (predictions[:, None, :] != predictions[None, :, :]).mean(axis=2)


def plot_disagreement(matrix: np.ndarray, names: list[str]) -> bytes:
    figure, axis = _figure(figsize=(1.0 + 0.6 * len(names), 0.8 + 0.6 * len(names)))
    axis.imshow(matrix, cmap="Oranges")
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(column, row, f"{value:.1%}", ha="center", va="center", fontsize=7)
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(names)), names, fontsize=8)
    axis.set_title("Pairwise disagreement on the holdout")
    return _png(figure)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _interval(interval: list[float] | None) -> str:
    return "" if interval is None else f" [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]"


def _html(report: dict[str, Any], images: dict[str, bytes], notes: list[str]) -> str:
    ensemble = report["ensemble"]
    rows = "".join(
        f"<tr><td>{html.escape(m['name'])}</td><td>{m['seed']}</td><td>{m['split_seed']}</td>"
        f"<td>{m['strength']:.2f}</td><td>{m['epochs']}</td><td>{m['best_epoch']}</td>"
        f"<td>{_percent(m['val_accuracy'])}</td><td>{_percent(m.get('fold_accuracy'))}</td>"
        f"<td>{_percent(m['holdout_accuracy'])}{_interval(m['holdout_interval'])}</td></tr>"
        for m in report["members"]
    )
    figures = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{name}</figcaption></figure>"
        for name, png in images.items()
    )
    if "against_best_member" in ensemble:
        notes = [verdict(ensemble["against_best_member"], ensemble["holdout_accuracy"]), *notes]
    notes = estimate_lines(ensemble) + notes
    extra = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    tta = (
        f" ({_percent(ensemble['holdout_accuracy_without_tta'])} without test-time augmentation)"
        if "holdout_accuracy_without_tta" in ensemble
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>digit-ensemble report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} figure{{display:inline-block;margin:1em}}
img{{max-width:100%}}</style></head><body>
<h1>digit-ensemble report</h1>
<p>Ensemble of {len(report["members"])} members, vote <b>{html.escape(ensemble["vote"])}</b>:
holdout accuracy <b>{_percent(ensemble["holdout_accuracy"])}</b>{_interval(ensemble["holdout_interval"])}{tta}
on {ensemble["holdout_size"]} images.</p>
<ul>{extra}</ul>
<table><tr><th>member</th><th>seed</th><th>split seed</th><th>aug. strength</th><th>epochs</th>
<th>best epoch</th><th>val accuracy</th><th>fold accuracy</th><th>holdout accuracy</th></tr>{rows}</table>
{figures}
</body></html>
"""


def render_report(
    storage: Storage,
    report: dict[str, Any],
    histories: dict[str, list[dict[str, float]]],
    holdout_images: np.ndarray,
    holdout_labels: np.ndarray,
    holdout_logits: np.ndarray,
    holdout_scores: np.ndarray,
) -> dict[str, bytes]:
    """Write the PNGs and report.html into `storage`; returns the PNGs by file name.

    `report` is report.json's content; `holdout_logits` (members, images, classes) are what the members vote
    with, `holdout_scores` the vote's scores.
    """
    method = report["ensemble"]["vote"]
    images = {"curves.png": plot_curves(histories)}
    notes = []
    if len(holdout_labels):
        curve = ensemble_size_curve(holdout_logits, holdout_labels, method)
        images["ensemble_size.png"] = plot_ensemble_size(curve)
        images["confusion.png"] = plot_confusion(holdout_labels, holdout_scores.argmax(1))
        images["errors.png"] = plot_errors(holdout_images, holdout_labels, holdout_scores, method)
        pairs = disagreement(holdout_logits)
        images["disagreement.png"] = plot_disagreement(pairs, list(histories))
        if len(holdout_logits) > 1:
            mean_pair = pairs[np.triu_indices(len(pairs), k=1)].mean()
            notes.append(f"Members disagree on {mean_pair:.2%} of holdout images on average.")
    else:
        notes.append("No holdout (data.holdout_fraction is 0): holdout plots are left out.")
    if "cv_accuracy_weighted" in report["ensemble"]:
        ensemble = report["ensemble"]
        notes.append(
            f"Weighted vote, cross-validated on the holdout ({ensemble['cross_validation_folds']} folds): "
            f"{_percent(ensemble['cv_accuracy_weighted'])} vs {_percent(ensemble['cv_accuracy_equal_weights'])} "
            "with equal weights."
        )
    notes += [round_line(entry) for entry in report.get("rounds", [])]
    if report["members"][0].get("fold_accuracy") is not None:
        notes.append(
            "Fold accuracy: each member on its fold of the pool (data.folds) with its final weights, as it votes."
        )
    if any(member["val_accuracy"] is None for member in report["members"]):
        notes.append("Members without a validation split (data.val_fraction 0) trained on their whole pool.")
    for name, png in images.items():
        storage.write_bytes(png, name)
    storage.write_text(_html(report, images, notes), HTML_REPORT_FILE)
    return images
