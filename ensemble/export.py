"""Export a finished run as one model: `python -m ensemble.export --run DIR --format FORMAT --output PATH`.

The model holds every member and the run's vote, in plain Keras layers (nothing of this package is needed to
load it). In: digits shaped (N, 28, 28, 1), pixel values 0..255 as in test.csv, as float32 (Keras also takes
uint8). Out: `scores`, the vote's scores as `ensemble.vote` computes them (for the default vote, the members'
mean logits), and `probabilities` per digit. With the run's test-time augmentation each member's logits are the
mean over the same one-pixel-shifted views as `ensemble.predict`'s. The members compute in float32 whatever
precision they trained in: ONNX needs it, and it is what a CPU serves fastest.

Formats (Keras 3's own saving and export):
- keras: one `.keras` file; `keras.models.load_model(PATH)`;
- saved_model: a TensorFlow SavedModel folder; `tf.saved_model.load(PATH).serve(images)`;
- onnx: one `.onnx` file, through tf2onnx (`pip install "digit-ensemble[onnx]"`; under JAX, jax2onnx);
  `onnxruntime.InferenceSession(PATH).run(None, {"pixels": images})`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ensemble.config import ConfigError, ModelConfig
from ensemble.data import IMAGE_SIDE, NUM_CLASSES, DataError
from ensemble.launch import native_stderr_silenced
from ensemble.rundir import read_report
from ensemble.storage import Storage

FORMATS = ("keras", "saved_model", "onnx")
# What Keras' ONNX export converts through, by backend (pyproject.toml's "onnx" extra holds TensorFlow's).
ONNX_CONVERTERS = {"tensorflow": ("tf2onnx", "onnx"), "jax": ("jax2onnx", "onnx")}


def inference_member(trained: Any, config: ModelConfig, name: str) -> Any:
    """`trained` rebuilt for inference: the same layers and weights without its training-only augmentation
    (a layer of this package), in float32."""
    from ensemble.augment import RandomAffine
    from ensemble.model import build_model

    member = build_model(config, name=name)
    kept = [layer for layer in trained.layers[1:] if not isinstance(layer, RandomAffine)]
    if len(kept) != len(member.layers) - 1:
        raise ConfigError(f"{name}: its saved layers do not match the run's model config")
    for source, target in zip(kept, member.layers[1:], strict=True):
        target.set_weights(source.get_weights())
    return member


def shifted(pixels: Any, shift: tuple[int, int]) -> Any:
    """`pixels` moved by one pixel or none each way (dx, dy), right and down when positive, zeros shifted in:
    the view ensemble.predict takes (augment.transform_images through shift_matrices), in layers that every
    format exports."""
    dx, dy = shift
    if shift == (0, 0):
        return pixels
    import keras

    padded = keras.layers.ZeroPadding2D(1)(pixels)
    return keras.layers.Cropping2D(((1 - dy, 1 + dy), (1 - dx, 1 + dx)))(padded)


def voted(member_logits: list[Any], method: str, weights: list[float] | None) -> tuple[Any, Any]:
    """(scores, probabilities) of the vote, as layers: what ensemble.vote.vote and vote_probabilities compute
    (tests/test_export.py holds them to it)."""
    import keras
    from keras import ops

    def mean(tensors: list[Any]) -> Any:
        return tensors[0] if len(tensors) == 1 else keras.layers.Average()(tensors)

    if method == "logits":
        scores = mean(member_logits)
    elif method == "weighted":
        scaled = [keras.layers.Rescaling(weight)(logits) for weight, logits in zip(weights, member_logits, strict=True)]
        scores = scaled[0] if len(scaled) == 1 else keras.layers.Add()(scaled)
    elif method == "probabilities":
        scores = mean([keras.layers.Softmax()(logits) for logits in member_logits])
    elif method == "majority":  # one vote each; mean probabilities (below 1) only order equal counts
        # top_k, not argmax, whose TensorFlow kernel converts to an op ONNX lacks; both take the lower index on ties.
        votes = [ops.one_hot(ops.top_k(logits, 1)[1][:, 0], NUM_CLASSES) for logits in member_logits]
        shares = mean([keras.layers.Softmax()(logits) for logits in member_logits])
        scores = keras.layers.Add()([*votes, keras.layers.Rescaling(0.5)(shares)])
    else:
        raise ConfigError(f"the run's vote {method!r} cannot be exported")
    if method in ("logits", "weighted"):
        probabilities = keras.layers.Softmax()(scores)
    else:
        probabilities = scores / ops.sum(scores, axis=-1, keepdims=True)
    return keras.layers.Identity(name="scores")(scores), keras.layers.Identity(name="probabilities")(probabilities)


def ensemble_model(storage: Storage, report: dict[str, Any]) -> Any:
    """The run's members, their test-time augmentation and their vote, as one Keras model."""
    from ensemble.predict import load_members

    trained = load_members(storage, report)  # first: it imports Keras with TensorFlow's start-up lines silenced
    import keras

    from ensemble.train import TTA_SHIFTS

    config = ModelConfig(**report["config"]["model"])
    members = [
        inference_member(model, config, name=entry["name"].replace("-", "_"))
        for model, entry in zip(trained, report["members"], strict=True)
    ]
    pixels = keras.Input((IMAGE_SIDE, IMAGE_SIDE, 1), name="pixels")
    views = [shifted(pixels, shift) for shift in TTA_SHIFTS[: report["config"]["ensemble"]["tta"]]]
    member_logits = []
    for member in members:
        logits = [member(view) for view in views]
        member_logits.append(logits[0] if len(logits) == 1 else keras.layers.Average()(logits))
    ensemble = report["ensemble"]
    scores, probabilities = voted(member_logits, ensemble["vote"], ensemble.get("weights"))
    return keras.Model(pixels, {"scores": scores, "probabilities": probabilities}, name="digit_ensemble")


def save(model: Any, fmt: str, output: Path) -> None:
    """`model` written as `fmt` at `output` with Keras' own saving (keras) or export (the others): first under
    a temporary name beside it, so that an export cut short leaves no partial model."""
    partial = output.with_name(f".{output.stem}.partial-{os.getpid()}{output.suffix}")
    try:
        if fmt == "keras":
            model.save(partial)
        else:
            # The input's spec given, not inferred: Keras infers it only from a model that was called.
            export_format = "tf_saved_model" if fmt == "saved_model" else "onnx"
            model.export(str(partial), format=export_format, input_signature=model.inputs, verbose=False)
        os.replace(partial, output)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial)
        partial.unlink(missing_ok=True)


def check_output(fmt: str, output: Path) -> None:
    """What would stop the export, said before the members load: a wrong file name, or an output that exists
    (never overwritten: it may be another run's model)."""
    suffix = {"keras": ".keras", "onnx": ".onnx"}.get(fmt)
    if suffix and output.suffix != suffix:
        raise ConfigError(f"--output {output}: a {fmt} model's file name ends in {suffix}")
    if output.exists():
        raise ConfigError(f"--output {output} exists; remove it or name another")


def check_converters(fmt: str, backend: str) -> None:
    """The packages Keras needs to write `fmt` under `backend`, installed, or a ConfigError saying what to install."""
    needed = ONNX_CONVERTERS.get(backend, ()) if fmt == "onnx" else ()
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"--format onnx under Keras' {backend} backend needs {', '.join(missing)}: pip install "
            + ('"digit-ensemble[onnx]"' if backend == "tensorflow" else " ".join(missing))
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ensemble.export", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run's output directory (or URI)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="keras, saved_model or onnx")
    parser.add_argument("--output", required=True, type=Path, help="the file (keras, onnx) or folder to write")
    args = parser.parse_args(argv)
    try:
        check_output(args.format, args.output)
        with native_stderr_silenced(True):
            import keras

        check_converters(args.format, keras.backend.backend())
        storage = Storage(args.run)
        report = read_report(storage)
        keras.config.set_dtype_policy("float32")  # members rebuilt in float32 whatever they trained in
        model = ensemble_model(storage, report)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with native_stderr_silenced(True):
        save(model, args.format, args.output)
    ensemble = report["ensemble"]
    print(
        f"wrote {args.output} ({args.format}): the {ensemble['vote']} vote of {len(report['members'])} members, "
        f"{report['config']['ensemble']['tta']} test-time view(s) each; "
        f"in: float32 pixels 0..255 shaped (N, {IMAGE_SIDE}, {IMAGE_SIDE}, 1); out: scores, probabilities"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
