"""The `fmnist` command. Thin: parse flags, call the library, print what fmnist.report formats.

Exit 0 ok, 1 failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from fmnist import __version__, report
from fmnist.checkpoint import EVALUATION_FILE, META_FILE
from fmnist.config import PRESETS, TrainConfig, preset_settings, setting_names
from fmnist.errors import ConfigError, FmnistError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows `(default: N)` in every --help (unless there is none) and keeps description line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="folder with the dataset (IDX or Kaggle CSV); default: $FMNIST_DATA, the cache, "
                             "Debian's folder, then a download")
    parser.add_argument("--no-verify", action="store_true", help="skip the MD5 check (for custom IDX data)")


def _add_tracking_flags(parser: argparse.ArgumentParser, register: bool = True) -> None:
    """`--log` (train and sweep) and `--register` (train), see `fmnist.tracking`."""
    what, folder, holder = ("the run", "RUN", "the run") if register else ("every trial", "OUT/trials/<trial>",
                                                                           "the sweep folder")
    parser.add_argument("--log", action="append", metavar="BACKEND", default=None,
                        help=f"also track {what} in tensorboard (event files in {folder}/tb/; view with `tensorboard "
                             "--logdir runs`) or mlflow (in $MLFLOW_TRACKING_URI, else sqlite:///<folder holding "
                             f"{holder}>/mlflow.db, e.g. runs/mlflow.db; view with `mlflow ui --backend-store-uri "
                             "sqlite:///runs/mlflow.db`); repeat it or give a comma list: --log tensorboard,mlflow. "
                             "Needs pip install 'fmnist[tensorboard]' or 'fmnist[mlflow]'")
    if register:
        parser.add_argument("--register", metavar="NAME", default=None,
                            help="with --log mlflow: also register the model under NAME in MLflow's model registry")


def _print_lines(lines: Sequence[str], file: typing.TextIO | None = None) -> None:
    """Print report lines one by one (nothing at all for no lines), like the single prints they replace."""
    for line in lines:
        print(line, file=file)


# ----------------------------------------------------------------------------------------------- data
def _add_device(parser: argparse.ArgumentParser) -> None:
    from fmnist.hardware import DEVICE_HELP

    parser.add_argument("--device", default="auto", help=f"where to compute: {DEVICE_HELP}")


def _cmd_data_info(args: argparse.Namespace) -> int:
    import numpy as np

    from fmnist import data

    source = data.locate_data(args.data_dir)
    print(report.dataset_line(source.format, source.path, source.origin))
    splits = {split: data.load_split(source, split, verify=not args.no_verify) for split in ("train", "test")}
    if source.format == "idx":
        print(report.checksums_line(verified=not args.no_verify))
    counts = {s: np.bincount(y, minlength=data.NUM_CLASSES).tolist() for s, (_, y) in splits.items()}
    _print_lines(report.class_count_table(data.CLASS_NAMES, counts))
    for split, (x, _) in splits.items():
        pixels = x.astype(np.float32) / 255.0
        print(report.pixel_stats_line(split, float(pixels.mean()), float(pixels.std()), x.shape, str(x.dtype)))
    return 0


def _cmd_data_show(args: argparse.Namespace) -> int:
    from fmnist import data, plots

    source = data.locate_data(args.data_dir)
    images, labels = data.load_split(source, args.split, verify=not args.no_verify)
    path = plots.save_figure(plots.sample_grid(images, labels, per_class=args.per_class, seed=args.seed), args.out)
    print(f"wrote {path} ({args.per_class} {args.split} images per class)")
    return 0


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from fmnist import data

    mirrors = tuple(args.mirror) if args.mirror else None
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  disable=not sys.stderr.isatty(), transient=True) as progress:
        tasks: dict[str, int] = {}

        def report(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total)
            progress.update(tasks[name], completed=done)

        directory = data.fetch(args.dest, mirrors=mirrors, retries=args.retries, progress=report)
    print(f"Fashion-MNIST verified in {directory}")
    return 0


# ----------------------------------------------------------------------------------------------- train
def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 300,100, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive sizes like 300,100, got {text!r}")
    return values


def _json_object(text: str) -> dict:
    """An argparse type: a JSON object such as '{"width": 64}' (the schema then checks its values)."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"width\": 64}}', got {text[:60]!r}")
    return value


def _add_trust_code(parser: argparse.ArgumentParser) -> None:
    """`--trust-code`, on every command that may import a network a run or config names: off by default, because a
    run folder is data someone may send you and importing its module would run their code."""
    parser.add_argument("--trust-code", action="store_true",
                        help="allow a run or config of your own network (--model custom) to import the Python class "
                             "it names; importing runs that module's code, so pass it only for runs you trust")


def _count(low: int, high: int | None = None) -> typing.Callable[[str], int]:
    """An argparse type: an integer from `low` (to `high`), so a bad count is a usage error before any work."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text[:40]!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    return parse


def _overrides(args: argparse.Namespace) -> dict:
    values = _config_file(args.config) if args.config else {}
    for name in _setting_flags():
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.dry_run:
        values.update(train_subset=512, test_subset=512, epochs=1)
        if "validation" in values or PRESETS.get(args.preset, {}).get("validation"):
            values["validation"] = 128
    return values


MAX_CONFIG_BYTES = 1024 * 1024  # a config file of settings is a few hundred bytes


def _config_file(path: str) -> dict:
    """The settings object of a `--config` JSON file, read at bounded cost: a size cap, and deep nesting (which
    makes Python's JSON parser recurse out of stack) is a one-line error too."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a config file holds a JSON "
                              "object of a few settings, like {\"epochs\": 5}")
        loaded = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the config file ({error}); give a JSON object") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config file; give a flat JSON object of settings, "
                          "like {\"epochs\": 5}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings, like {{\"epochs\": 5}}")
    return loaded


def _setting_flags() -> list[str]:
    """The TrainConfig fields that get a `fmnist train --flag` (all but `preset`, which has its own)."""
    return [name for name in setting_names() if name != "preset"]


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed and documented from the field itself: a new setting needs no CLI edit."""
    group = parser.add_argument_group("settings (each overrides the preset; see `--list-presets`)")
    for name in _setting_flags():
        field = TrainConfig.model_fields[name]
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `int | None`: the flag takes an int
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        help_text = f"{field.description} (default: the preset's)"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        if (field.json_schema_extra or {}).get("flag") == "duration":  # "3m", "90s": the schema parses it
            parse, metavar = str, "TIME"
        elif (field.json_schema_extra or {}).get("flag") == "json":  # an object of values: the schema checks them
            parse, metavar = _json_object, "JSON"
        elif typing.get_origin(kind) is typing.Literal:
            parse, metavar = str, "{" + ",".join(typing.get_args(kind)) + "}"
        else:
            parse = _ints if typing.get_origin(kind) is list else kind if kind in (int, float) else str
            metavar = {_ints: "N,N,...", int: "N", float: "X"}.get(parse, "TEXT")
        group.add_argument(flag, type=parse, default=None, metavar=metavar, help=help_text)


def _list_presets() -> int:
    from fmnist.config import preset_expectations

    _print_lines(report.presets_table(PRESETS, preset_expectations()))
    return 0


class _ProgressPrinter:
    """A live bar on a terminal (rich), and one plain summary line per epoch always, unless quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.task = None

    def __call__(self, event) -> None:
        from fmnist import events

        if self.quiet:
            return
        if isinstance(event, events.Start):
            self._start(event)
        elif isinstance(event, events.EpochStart) and self.bar:
            self.bar.reset(self.task, epoch=event.epoch, metrics="")
        elif isinstance(event, events.Step) and self.bar:
            self.bar.update(self.task, completed=event.step, metrics=report.step_metrics(event.loss, event.accuracy))
        elif isinstance(event, events.EpochEnd):
            line = report.epoch_line(event.epoch, event.row)
            (self.bar.console.print(line, highlight=False) if self.bar else print(line, flush=True))
        elif isinstance(event, events.End) and self.bar:
            self.bar.stop()

    def _start(self, event) -> None:
        print(report.train_start_line(event))
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("train", total=event.steps_per_epoch, epoch=1, metrics="")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def _trackers(args: argparse.Namespace) -> list:
    """The `--log` loggers, checked before any work (an unknown name or a missing package is one line); none on
    the other processes under torchrun, where rank 0 reports for the group."""
    from fmnist import tracking
    from fmnist.distributed import is_main_process

    backends = tracking.parse_backends(args.log)
    tracking.require(backends)
    if args.register and "mlflow" not in backends:
        raise ConfigError("--register names the model in MLflow's model registry; add --log mlflow")
    if not is_main_process():
        return []
    return tracking.loggers(backends, data_dir=args.data_dir, registered_model=args.register)


def _cmd_train(args: argparse.Namespace) -> int:
    if args.list_presets:
        return _list_presets()
    from fmnist import plots, tracking, training

    trackers = _trackers(args)
    overrides = _overrides(args)
    if args.resume:
        config, out_dir = None, Path(args.resume)
    else:
        config = training.resolve_config(args.preset, overrides)
        out_dir = Path(args.out) if args.out else training.default_run_dir(config.preset)
        if (out_dir / META_FILE).exists() and not args.overwrite:
            raise ConfigError(f"{out_dir} already holds a trained model; pass --overwrite or choose another --out")
    from fmnist.distributed import is_main_process

    if args.summary and config is not None and is_main_process():
        from fmnist.model_summary import summarize_module
        from fmnist.models import CUSTOM, check_trust, create_model

        if config.model == CUSTOM:  # building it imports the code the config names
            check_trust(config.custom, "the config", args.trust_code)
        architecture = config.architecture()
        print(summarize_module(create_model(architecture["name"], **architecture["config"]),
                               f"{architecture['name']}, preset {config.preset}"))
    printer = _ProgressPrinter(args.quiet or not is_main_process())
    tracker = tracking.Fanout(*trackers)  # closed after the curves are drawn: MLflow uploads them too
    try:
        result = training.train(config, out_dir=out_dir, data_dir=args.data_dir, resume=args.resume,
                                progress=tracking.Fanout(printer, tracker) if trackers else printer,
                                device=args.device, trust_code=args.trust_code)
    except BaseException:
        tracker.close()  # a failed or interrupted training's MLflow run is marked FAILED, not left RUNNING
        raise
    finally:
        printer.close()
    if not is_main_process():  # under torchrun, rank 0 reports and writes for the whole group
        return 130 if result.interrupted else 0
    metrics = result.metrics
    if not args.no_plots and result.history:
        plots.save_figure(plots.training_curves(result.history, result.config.label_smoothing),
                          out_dir / "plots" / "curves.png")
    tracker.close()
    if not args.quiet:
        _print_lines(report.train_summary_lines(metrics, out_dir))
    if result.interrupted:
        print(f"interrupted after epoch {metrics['epochs_run']}; continue with "
              f"`fmnist train --resume {out_dir}`", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------------------------- evaluate etc.
def _test_set(classifier, data_dir):
    from fmnist.training import test_split

    return test_split(classifier.meta.train_config(), data_dir)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fmnist.files import write_json
    from fmnist.predict import Classifier

    classifier = Classifier.load(args.run, device=args.device, trust_code=args.trust_code)
    x_test, y_test = _test_set(classifier, args.data_dir)
    scores = classifier.evaluate(x_test, y_test)
    result = {"test_size": len(y_test), "calibrated": classifier.calibrated,
              "temperature": classifier.temperature, **scores, "tta": None}
    if classifier.meta.config.get("flip"):  # mirror images help only a model that trained on them (an MLP: worse)
        scores_tta = classifier.evaluate(x_test, y_test, tta=True)
        result["tta"] = {"accuracy": scores_tta["accuracy"], "loss": scores_tta["loss"]}
    write_json(Path(args.run) / EVALUATION_FILE, result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    _print_lines(report.evaluation_lines(repr(classifier), result))
    print(f"\nwrote {Path(args.run) / EVALUATION_FILE}")
    return 0


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def _image_files(paths: Sequence[str]) -> list[Path]:
    """Files as given, folders walked (image suffixes only, sorted); a missing path is kept to be reported."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def _predict_files(args: argparse.Namespace, classifier) -> int:
    import numpy as np

    from fmnist import images
    from fmnist.files import atomic_write_text

    rows, failures, shown = [], 0, []
    for path in _image_files(args.files):
        try:
            prepared = images.prepare(path, upright=args.upright)
        except FmnistError as error:
            failures += 1
            rows.append({"file": str(path), "error": str(error)})
            print(f"fmnist: error: {error}", file=sys.stderr)
            continue
        answer = classifier.answer(prepared.image, k=args.top)[0]
        rows.append({"file": str(path), "inverted": prepared.inverted, **answer})
        shown.append((path.name, prepared, answer))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.csv:
        atomic_write_text(Path(args.csv), report.predictions_csv(rows, classifier.classes))
        print(f"wrote {args.csv} ({len(rows) - failures} predicted, {failures} failed)")
    else:
        for row in rows:
            if "error" not in row:
                _print_lines(report.answer_lines(row["file"], row))
    if args.show and shown:
        from fmnist import plots

        figure = plots.photo_predictions([p.original for _, p, _ in shown], np.stack([p.image for _, p, _ in shown]),
                                         [a["probabilities"] for _, _, a in shown], [n for n, _, _ in shown])
        print(f"wrote {plots.save_figure(figure, args.show)}", file=sys.stderr if args.json else sys.stdout)
    if not classifier.calibrated and not args.json:
        print("note: this model was trained without a validation split, so its probabilities are not calibrated",
              file=sys.stderr)
    return 2 if failures else 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fmnist.predict import Classifier

    if not args.files and not args.index:
        raise ConfigError("give image files or folders to predict, or --index N for test images")
    classifier = Classifier.load(args.run, device=args.device, trust_code=args.trust_code)
    if args.files:
        return _predict_files(args, classifier)
    x_test, y_test = _test_set(classifier, args.data_dir)
    bad = [i for i in args.index if not 0 <= i < len(y_test)]
    if bad:
        raise ConfigError(f"--index {bad[0]} is outside the test set (0..{len(y_test) - 1})")
    probabilities = classifier.predict_proba(x_test[args.index])
    rows = []
    for index, row in zip(args.index, probabilities, strict=True):
        predicted = int(row.argmax())
        rows.append({"index": index, "predicted": classifier.classes[predicted], "probability": float(row[predicted]),
                     "true": classifier.classes[int(y_test[index])],
                     "probabilities": {name: float(p) for name, p in zip(classifier.classes, row, strict=True)}})
    if args.show:
        from fmnist import plots

        figure = plots.probability_grid(x_test[args.index], probabilities, y_test[args.index],
                                        class_names=classifier.classes)
        print(f"wrote {plots.save_figure(figure, args.show)}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for item in rows:
        _print_lines(report.labelled_image_lines(item, args.top))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    import numpy as np

    from fmnist import evaluate, plots
    from fmnist.predict import Classifier
    from fmnist.runs import read_history

    run = Path(args.run)
    classifier = Classifier.load(run, trust_code=args.trust_code)
    x_test, y_test = _test_set(classifier, args.data_dir)
    probabilities = classifier.predict_proba(x_test)
    out = run / "plots"
    written = []
    history = read_history(run)
    if history:
        smoothing = float(classifier.meta.config.get("label_smoothing", 0.0))
        written.append(plots.save_figure(plots.training_curves(history, smoothing), out / "curves.png"))
    report = evaluate.classification_report(probabilities, y_test, classifier.classes)
    written.append(plots.save_figure(plots.confusion_matrix(np.array(report["confusion_matrix"]), classifier.classes),
                                     out / "confusion.png"))
    chosen = np.random.default_rng(args.seed).choice(len(y_test), size=min(18, len(y_test)), replace=False)
    written.append(plots.save_figure(plots.prediction_grid(x_test[chosen], probabilities[chosen], y_test[chosen],
                                                           class_names=classifier.classes), out / "predictions.png"))
    shown = chosen[:15]
    written.append(plots.save_figure(plots.probability_grid(x_test[shown], probabilities[shown], y_test[shown],
                                                            class_names=classifier.classes),
                                     out / "probabilities.png"))
    written.append(plots.save_figure(plots.confident_mistakes(x_test, probabilities, y_test,
                                                              class_names=classifier.classes), out / "mistakes.png"))
    if args.embedding:
        written.append(_plot_embedding(args, classifier, x_test, y_test, probabilities, out))
    for path in written:
        print(f"wrote {path}")
    return 0


def _plot_embedding(args: argparse.Namespace, classifier, x_test, y_test, probabilities, out: Path) -> Path:
    from fmnist import embedding, plots

    if args.points < 10:
        raise ConfigError(f"--points {args.points} is too few for a map; use at least 10")
    chosen = embedding.stratified_sample(y_test, args.points, args.seed)
    method = args.method if args.method != "auto" else embedding.available_methods()[0]
    print(f"mapping {len(chosen):,} test images to 2-D with {method.upper()} (pixels, then network features)...",
          flush=True)
    pixels, _ = embedding.embed_2d(x_test[chosen].reshape(len(chosen), -1) / 255.0, method, args.seed)
    features, _ = embedding.embed_2d(embedding.penultimate_features(classifier, x_test[chosen]), method, args.seed)
    figure = plots.embedding_maps(pixels, features, y_test[chosen], probabilities[chosen].argmax(1), method,
                                  classifier.classes)
    return plots.save_figure(figure, out / "embedding.png")


def _cmd_export(args: argparse.Namespace) -> int:
    from fmnist.export import OPSET, export_onnx

    path = export_onnx(args.run, args.out, trust_code=args.trust_code)
    print(f"wrote {path} (ONNX opset {OPSET}, {path.stat().st_size / 1e6:.1f} MB): uint8 images "
          "(batch, 28, 28) in, calibrated probabilities and logits out")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fmnist import data, sweep, tracking

    sweep.require_extra()  # one line naming the extra, before any work, when ray or pyyaml is missing
    tracking.require(tracking.parse_backends(args.log))  # the same for --log
    spec = sweep.load_spec(args.spec)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {args.max_concurrent} must be at least 1")
    out_dir = Path(args.out) if args.out else Path("runs") / f"sweep-{spec.name}"
    concurrency = args.max_concurrent or min(sweep.default_concurrency(spec.trial_threads), spec.trial_count())
    arrays = data.load_data(args.data_dir, verify=not args.no_verify)
    if not args.quiet:
        print(report.sweep_start_line(spec, concurrency, out_dir), flush=True)

    def on_event(event: dict) -> None:
        line = None if args.quiet else report.sweep_event_line(event)
        if line is not None:
            print(line, flush=True)

    trials = sweep.run_sweep(spec, out_dir, arrays=arrays, max_concurrent=concurrency, progress=on_event,
                             log=args.log)
    _print_lines(report.sweep_table(spec.metric, trials, out_dir))
    _print_lines(report.sweep_failures(trials), file=sys.stderr)
    print(f"wrote {out_dir / 'sweep.json'} and {out_dir / 'sweep.md'}")
    cut = [trial["trial"] for trial in trials if trial["status"] == "interrupted"]
    if cut:
        print(f"interrupted: {len(cut)} trial(s) did not finish ({', '.join(cut)})", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------------------------- parser
def _check_port_free(host: str, port: int) -> None:
    """Fail with one line before loading anything when the address is taken (uvicorn would log a traceback-ish
    error and exit later)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ConfigError(f"cannot listen on {host!r}: {error.strerror}; use an address of this machine, "
                          "e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port "
                              "or stop the program using it") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from fmnist import serve
    except ImportError as error:
        raise ConfigError(f"the web service needs the serve extra ({error.name} is missing); "
                          "run: pip install 'fmnist[serve]'") from None
    if args.run is None:
        try:
            args.run = serve.latest_run()
        except FileNotFoundError:
            raise ConfigError("no trained run under runs/; name one (fmnist serve RUN) or train one with "
                              "`make demo` or `fmnist train`") from None
    settings = serve.ServeSettings(  # checks every range; --threads 0 means the default, one per core
        host=args.host, port=args.port, max_bytes=args.max_mb * serve.MiB, max_pixels=args.max_pixels,
        max_images=args.max_images, prepare_workers=args.workers, max_batch=args.max_batch,
        torch_threads=args.threads or None, decode_pixels=args.max_decode_pixels, max_uploads=args.max_uploads,
        body_timeout=args.body_timeout, keep_alive=args.keep_alive, max_connections=args.max_connections,
        allowed_hosts=tuple(args.allow_host), docs=args.docs)
    _check_port_free(settings.host, settings.port)
    serve.run_server(args.run, settings, log_level=args.log_level, trust_code=args.trust_code)
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from fmnist.runs import list_runs

    rows = list_runs(args.dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs under {args.dir}; train one with `fmnist train`")
        return 0
    _print_lines(report.runs_table(rows))
    for row in rows:  # listed as "damaged" in the table; here is why, one line each
        if row["state"] == "damaged":
            print(f"fmnist: warning: {row['name']} is damaged: {row['error']}", file=sys.stderr)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from fmnist.model_summary import summary

    if (args.run is None) == (args.preset is None):
        raise ConfigError("give a run folder or --preset NAME (not both), e.g. `fmnist summary --preset fast`")
    if args.preset is not None:
        preset_settings(args.preset)  # an unknown preset: the usual one-line "did you mean"
    print(summary(args.preset if args.preset is not None else args.run, trust_code=args.trust_code))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from fmnist import plots
    from fmnist.runs import read_history, summary

    if len(args.runs) < 2:
        raise ConfigError("give at least two run folders to compare")
    rows = [summary(run) for run in args.runs]
    names = [row["name"] for row in rows]
    if len(set(names)) < len(names):
        names = [row["path"] for row in rows]
    histories = {name: read_history(Path(run)) for name, run in zip(names, args.runs, strict=True)}
    histories = {name: history for name, history in histories.items() if history}
    if args.json:  # printed once every folder has been read: a damaged one is one line, not half a table
        print(json.dumps(rows, indent=2))
    else:
        _print_lines(report.compare_table(names, rows))
    if histories:
        written = plots.save_figure(plots.compare_curves(histories), args.out)
        print(f"wrote {written}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _add_data(commands: argparse._SubParsersAction) -> None:
    """`fmnist data info|show|fetch`."""
    data_parser = commands.add_parser("data", help="find, inspect, show and fetch the dataset",
                                      formatter_class=_Formatter)
    data_commands = data_parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    info = data_commands.add_parser("info", help="where the data is, counts per class, pixel statistics, checksums",
                                    formatter_class=_Formatter)
    _add_data_dir(info)
    info.set_defaults(func=_cmd_data_info)
    show = data_commands.add_parser("show", help="save a grid of sample images, one row per class",
                                    formatter_class=_Formatter)
    _add_data_dir(show)
    show.add_argument("--out", default="runs/samples.png", help="PNG file to write")
    show.add_argument("--per-class", type=_count(1, 100), default=10, help="images per class (row)")
    show.add_argument("--split", choices=("train", "test"), default="train", help="which split to sample")
    show.add_argument("--seed", type=_count(0, 2**32 - 1), default=0, help="which random examples")
    show.set_defaults(func=_cmd_data_show)
    fetch = data_commands.add_parser("fetch", help="download the upstream files, verified, into the cache",
                                     formatter_class=_Formatter)
    fetch.add_argument("--dest", default=None, help="folder to download into (default: ~/.cache/fmnist)")
    fetch.add_argument("--mirror", action="append", help="base URL to download from (repeatable); "
                                                         "default: $FMNIST_MIRROR, then upstream")
    fetch.add_argument("--retries", type=_count(1, 20), default=3, help="attempts per file and mirror")
    fetch.set_defaults(func=_cmd_data_fetch)


def _add_training_commands(commands: argparse._SubParsersAction) -> None:
    """Training and measuring a model: train, evaluate."""
    train_parser = commands.add_parser("train", help="train a model from a preset (flags override it)",
                                       formatter_class=_Formatter)
    train_parser.add_argument("--preset", default="default", help="starting configuration; see --list-presets")
    train_parser.add_argument("--list-presets", action="store_true", help="show the presets and exit")
    train_parser.add_argument("--out", default=None, help="run folder (default: runs/<preset>-<time>)")
    train_parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    train_parser.add_argument("--resume", metavar="RUN", default=None,
                              help="continue an interrupted run folder from its last complete epoch")
    train_parser.add_argument("--config", metavar="FILE", default=None,
                              help="JSON file of settings applied over the preset (flags win)")
    _add_device(train_parser)
    train_parser.add_argument("--dry-run", action="store_true", help="1 epoch on 512 images: a quick smoke test")
    train_parser.add_argument("--no-plots", action="store_true", help="do not draw the training curves")
    train_parser.add_argument("-q", "--quiet", action="store_true", help="print nothing while training")
    train_parser.add_argument("--summary", action="store_true",
                              help="print the network layer by layer (as `fmnist summary`) before training")
    _add_tracking_flags(train_parser)
    _add_data_dir(train_parser)
    _add_setting_flags(train_parser)
    _add_trust_code(train_parser)
    train_parser.set_defaults(func=_cmd_train)

    evaluate_parser = commands.add_parser("evaluate", help="test loss/accuracy, per-class report, confusions",
                                          formatter_class=_Formatter)
    evaluate_parser.add_argument("run", help="run folder")
    evaluate_parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    _add_device(evaluate_parser)
    _add_data_dir(evaluate_parser)
    _add_trust_code(evaluate_parser)
    evaluate_parser.set_defaults(func=_cmd_evaluate)



def _add_prediction_commands(commands: argparse._SubParsersAction) -> None:
    """What a trained model answers and draws: predict, plot, export."""
    predict_parser = commands.add_parser(
        "predict", help="class probabilities for your photos or for test images", formatter_class=_Formatter,
        description="Predict your own photos (PNG, JPEG, GIF, BMP, WebP or TIFF; folders are walked) or test images.\n"
                    "  fmnist predict runs/demo shoe.jpg photos/ --top 3 --show shown.png\n"
                    "  fmnist predict runs/demo --index 0 5 42")
    predict_parser.add_argument("run", help="run folder")
    predict_parser.add_argument("files", nargs="*", help="image files or folders")
    predict_parser.add_argument("--index", type=int, nargs="+", default=None, help="test image indices")
    predict_parser.add_argument("--top", type=_count(1), default=3, help="classes to show per image")
    _add_device(predict_parser)
    output = predict_parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="machine-readable output")
    output.add_argument("--csv", metavar="OUT", default=None, help="write one CSV row per file")
    predict_parser.add_argument("--show", metavar="PNG", default=None,
                                help="draw each photo, the 28x28 the model saw and its probabilities")
    predict_parser.add_argument("--upright", action="store_true",
                                help="turn a tilted garment upright before classifying (helps photos tilted by a "
                                     "few degrees; slightly worse on upright ones, see docs/photos.md)")
    _add_data_dir(predict_parser)
    _add_trust_code(predict_parser)
    predict_parser.set_defaults(func=_cmd_predict)

    plot_parser = commands.add_parser("plot", help="draw every figure of a run into RUN/plots",
                                      formatter_class=_Formatter)
    plot_parser.add_argument("run", help="run folder")
    plot_parser.add_argument("--seed", type=_count(0, 2**32 - 1), default=0,
                             help="which test images the prediction grid shows")
    plot_parser.add_argument("--embedding", action="store_true",
                             help="also map the network's features of the test set to 2-D beside the raw pixels "
                                  "(plots/embedding.png)")
    plot_parser.add_argument("--method", choices=["auto", "umap", "tsne"], default="auto",
                             help="2-D mapping for --embedding: auto = UMAP when umap-learn is installed, else t-SNE")
    plot_parser.add_argument("--points", type=int, default=3000,
                             help="test images in the --embedding map (stratified sample; all 10,000 take minutes)")
    _add_data_dir(plot_parser)
    _add_trust_code(plot_parser)
    plot_parser.set_defaults(func=_cmd_plot)

    export_parser = commands.add_parser(
        "export", help="write a run as an ONNX file for onnxruntime and other runtimes", formatter_class=_Formatter,
        description="Export a trained run, preprocessing and calibration included, for other runtimes:\n"
                    "  fmnist export runs/demo --format onnx    # writes runs/demo/model.onnx\n"
                    "Input: uint8 (batch, 28, 28) dataset-form pixels; outputs: probabilities, logits.\n"
                    "Needs the onnx extra: pip install 'fmnist[onnx]'.")
    export_parser.add_argument("run", help="run folder")
    export_parser.add_argument("--format", choices=("onnx",), default="onnx", help="file format")
    export_parser.add_argument("--out", metavar="FILE", default=None, help="file to write (default: RUN/model.onnx)")
    _add_trust_code(export_parser)
    export_parser.set_defaults(func=_cmd_export)


def _add_run_commands(commands: argparse._SubParsersAction) -> None:
    """The commands around many runs or a service: sweep, runs, summary, compare, serve."""
    sweep_parser = commands.add_parser(
        "sweep", help="a hyper-parameter search with Ray Tune: one run folder per trial, ranked",
        formatter_class=_Formatter,
        description="Run the trials a YAML spec describes (see examples/sweep-fast.yaml) with Ray Tune:\n"
                    "  fmnist sweep examples/sweep-fast.yaml --max-concurrent 2\n"
                    "Writes OUT/trials/<trial>/ (run folders), OUT/sweep.json, OUT/sweep.md and OUT/best.\n"
                    "Needs the sweep extra: pip install 'fmnist[sweep]'.")
    sweep_parser.add_argument("spec", help="YAML sweep spec")
    sweep_parser.add_argument("--out", default=None, help="sweep folder (default: runs/sweep-<spec name>)")
    sweep_parser.add_argument("--max-concurrent", type=int, default=None,
                              help="trials at once (default: the cores divided by the spec's trial_threads)")
    sweep_parser.add_argument("-q", "--quiet", action="store_true", help="print only the final table")
    _add_tracking_flags(sweep_parser, register=False)
    _add_data_dir(sweep_parser)
    sweep_parser.set_defaults(func=_cmd_sweep)

    runs_parser = commands.add_parser("runs", help="a table of the run folders under DIR, newest first",
                                      formatter_class=_Formatter)
    runs_parser.add_argument("dir", nargs="?", default="runs", help="folder holding run folders")
    runs_parser.add_argument("--json", action="store_true", help="machine-readable output")
    runs_parser.set_defaults(func=_cmd_runs)

    summary_parser = commands.add_parser(
        "summary", help="the network layer by layer: output shapes, parameters, multiply-adds (as Keras' summary)",
        formatter_class=_Formatter)
    summary_parser.add_argument("run", nargs="?", default=None, help="run folder")
    summary_parser.add_argument("--preset", default=None, help="show the network a preset trains instead")
    _add_trust_code(summary_parser)
    summary_parser.set_defaults(func=_cmd_summary)

    compare_parser = commands.add_parser("compare", help="metrics of several runs side by side, and their curves",
                                         formatter_class=_Formatter)
    compare_parser.add_argument("runs", nargs="+", help="run folders")
    compare_parser.add_argument("--out", default="compare.png", help="figure overlaying the training curves")
    compare_parser.add_argument("--json", action="store_true", help="machine-readable output")
    compare_parser.set_defaults(func=_cmd_compare)
    _add_serve_command(commands)


def _add_serve_command(commands: argparse._SubParsersAction) -> None:
    """`fmnist serve` and its limits (each a field of `fmnist.serve.ServeSettings`, which checks them)."""
    serve_parser = commands.add_parser(
        "serve", help="web page and HTTP API for a trained model", formatter_class=_Formatter,
        description="Serve a web page (upload, drop, paste or draw an image) and an HTTP API for one trained run:\n"
                    "  GET /  the page          POST /v1/predict  images or 28x28 arrays -> probabilities\n"
                    "  GET /v1/model  GET /healthz  GET /openapi.json (GET /docs with --docs)\n"
                    "Needs the serve extra: pip install 'fmnist[serve]'.")
    serve_parser.add_argument("run", nargs="?", default=None,
                              help="run folder (default: runs/demo, else the newest run under runs/)")
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    serve_parser.add_argument("--port", type=int, default=8000, help="TCP port")
    serve_parser.add_argument("--max-mb", type=float, default=10.0, help="largest request body, in megabytes")
    serve_parser.add_argument("--max-pixels", type=int, default=25_000_000, help="largest image, in pixels")
    serve_parser.add_argument("--max-images", type=int, default=64, help="most images in one request")
    serve_parser.add_argument("--workers", type=int, default=2, help="threads decoding and preparing uploads")
    serve_parser.add_argument("--threads", type=int, default=None,
                              help="torch threads for the model (default: one per core)")
    serve_parser.add_argument("--max-batch", type=int, default=256,
                              help="most images per forward pass when requests queue up (1: no batching)")
    serve_parser.add_argument("--max-decode-pixels", type=int, default=50_000_000,
                              help="pixels decoded at once across all requests (about 6-10 bytes of memory each)")
    serve_parser.add_argument("--max-uploads", type=int, default=32,
                              help="requests with a body in progress at once; more wait up to 10 s, then get 503")
    serve_parser.add_argument("--body-timeout", type=float, default=60.0,
                              help="seconds a client may take to send a whole request body (then 408)")
    serve_parser.add_argument("--keep-alive", type=int, default=5, help="seconds an idle connection stays open")
    serve_parser.add_argument("--max-connections", type=int, default=256,
                              help="open connections at once; more are answered 503")
    serve_parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                              help="also answer requests for this host name, and posts from its pages (repeat it; "
                                   "'*' accepts any Host). Always accepted: localhost, IP addresses, --host")
    serve_parser.add_argument("--docs", action="store_true",
                              help="serve interactive API docs at /docs (Swagger UI, loaded from a public CDN)")
    serve_parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                              help="uvicorn's access/error log level (info logs every request)")
    _add_trust_code(serve_parser)
    serve_parser.set_defaults(func=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line interface; sub-commands register their handler as `func`."""
    parser = argparse.ArgumentParser(prog="fmnist", formatter_class=_Formatter,
                                     description="Fashion-MNIST with PyTorch: data, training, evaluation, plots.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    parser.add_argument("--version", action="version", version=f"fmnist {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_data(commands)
    _add_training_commands(commands)
    _add_prediction_commands(commands)
    _add_run_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fmnist` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    os.environ.setdefault("MPLBACKEND", "Agg")  # the command only writes figures; never a window, on any machine
    try:
        return int(args.func(args) or 0)
    except FmnistError as error:
        print(f"fmnist: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmnist: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())

