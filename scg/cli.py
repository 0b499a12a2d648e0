"""The ``scg`` command: ``scg aevb ...`` trains Certigrad's AEVB on MNIST; ``scg sbn ...``
trains a sigmoid belief net on binarized MNIST with NVIL's baseline.

Subcommands are registered in :data:`COMMANDS` (name -> (add_arguments, run)), so
others (``scg sbn``) plug in beside ``aevb`` and reuse :func:`scg.training.fit`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

__all__ = ["COMMANDS", "build_parser", "main"]


class UsageError(Exception):
    """Arguments that parse but cannot work together (reported without a traceback)."""


# --------------------------------------------------------------------------- #
# scg aevb
# --------------------------------------------------------------------------- #


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _finite_positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text}")
    return value


def _add_common_arguments(parser: argparse.ArgumentParser, *, name: str, batch_size: int, data: str,
                          passes_help: str, lr: float, lr_help: str) -> None:
    """The flags every training command shares (defined once, so they read the same everywhere)."""
    parser.add_argument("--epochs", type=_non_negative_int, default=10,
                        help="train up to this epoch (counting resumed ones; default 10)")
    parser.add_argument("--batch-size", type=_positive_int, default=batch_size,
                        help=f"examples per step (default {batch_size})")
    parser.add_argument("--data-dir", default=None, help=f"folder holding {data} (default $SCG_DATA_DIR)")
    parser.add_argument("--out", default=f"runs/{name}",
                        help=f"output folder: metrics.jsonl, checkpoint, PNGs (default runs/{name})")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seeds the initialization, batch order and sampling (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out that holds a run (deletes its checkpoint, metrics.jsonl "
                             "and final.json); without it or --resume such a folder is refused")
    parser.add_argument("--passes", choices=("auto", "none"), default="auto", help=passes_help)
    parser.add_argument("--num-samples", type=_positive_int, default=1,
                        help="particles per gradient estimate (default 1)")
    parser.add_argument("--lr", type=_finite_positive_float, default=lr, help=lr_help)
    parser.add_argument("--eval-k", type=_non_negative_int, default=100,
                        help="importance samples for the final test log-likelihood (0: skip; default 100)")
    parser.add_argument("--steps-per-dispatch", type=_positive_int, default=1,
                        help="optimizer steps per jitted call (lax.scan; default 1)")
    parser.add_argument("--eval-batch-size", type=_positive_int, default=500,
                        help="test examples per evaluation call (default 500)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = parser.add_argument_group(
        "devices", "data parallelism: each batch is split over the devices (of every process); parameters and "
                   "optimizer state are replicated; the same --seed gives the same run on any number of devices")
    group.add_argument("--devices", type=_positive_int, default=None, metavar="N",
                       help="devices to use in each process (default: all; on CPU, this many CPU devices are made)")
    group.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                       help="address of process 0 for a run over several processes (jax.distributed); with "
                            "--num-processes and --process-id")
    group.add_argument("--num-processes", type=_positive_int, default=None, metavar="N",
                       help="processes taking part")
    group.add_argument("--process-id", type=_non_negative_int, default=None, metavar="I",
                       help="this process's index (0 ... N-1)")
    group.add_argument("--distributed", choices=("auto",), default=None,
                       help="auto: let JAX read the cluster launcher's settings (SLURM, Open MPI, TPU, ...)")


def _check_out(args: argparse.Namespace) -> pathlib.Path:
    """Refuses an --out that is a file, or that holds a run without --resume/--overwrite (before any work)."""
    from scg.training import devices, run_files

    out = pathlib.Path(args.out)
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite deletes it: pass one of them")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; choose another --out")
    found = run_files(out) if out.is_dir() else []
    if found and not (args.resume or args.overwrite):
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}): add --resume to continue it, or "
                         "--overwrite to delete it and start afresh (or choose another --out)")
    devices.barrier("scg: --out checked")  # by every process, before process 0 writes to it
    return out


def _setup_devices(args: argparse.Namespace):
    """Starts jax.distributed where asked and returns the data-parallel mesh (None: one device in all)."""
    distributed = [f for f, v in (("--coordinator", args.coordinator), ("--num-processes", args.num_processes),
                                  ("--process-id", args.process_id)) if v is not None]
    if args.distributed and distributed:
        raise UsageError(f"--distributed auto reads the cluster's settings; drop {', '.join(distributed)}")
    if distributed and len(distributed) < 3:
        raise UsageError("a run over several processes needs --coordinator HOST:PORT, --num-processes N and "
                         "--process-id I (the same coordinator and N on every process)")
    if args.process_id is not None and args.process_id >= args.num_processes:
        raise UsageError(f"--process-id must be below --num-processes ({args.num_processes}), got {args.process_id}")

    from scg.training import devices

    try:
        devices.initialize(coordinator=args.coordinator, num_processes=args.num_processes,
                           process_id=args.process_id, auto=bool(args.distributed), cpu_devices=args.devices)
    except (RuntimeError, ValueError) as err:  # no cluster settings found, or JAX started already
        if args.coordinator or args.distributed:
            what = "read the cluster's settings" if args.distributed else "start jax.distributed"
            raise UsageError(f"cannot {what}: {str(err).splitlines()[0]}") from None
    import jax

    local = len(jax.local_devices())
    if args.devices is not None and args.devices > local:
        raise UsageError(f"--devices {args.devices}: this process has only {local} "
                         f"{jax.local_devices()[0].platform} devices")
    mesh = devices.data_mesh(args.devices)
    return None if mesh.size == 1 and jax.process_count() == 1 else mesh


def _describe_mesh(mesh) -> str:
    import jax

    if mesh is None:
        return "1 device"
    per = mesh.size // jax.process_count()
    platform = mesh.devices.flat[0].platform
    if jax.process_count() == 1:
        return f"{mesh.size} {platform} devices"
    return f"{jax.process_count()} processes x {per} {platform} devices"


def _add_aevb_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common_arguments(
        parser, name="aevb", batch_size=250, data="mnist/ (missing files are downloaded)",
        passes_help="auto: analytic KL and reparameterized z (default); none: the naive score-function graph",
        lr=1e-3, lr_help="Adam learning rate (default 1e-3)")
    parser.add_argument("--biases", action="store_true", help="add biases to every layer (Certigrad has none)")
    parser.add_argument("--hidden", type=_positive_int, default=1000, help="hidden layer width (default 1000)")
    parser.add_argument("--latent", type=_positive_int, default=30, help="latent dimension (default 30)")


def _run_aevb(args: argparse.Namespace) -> int:
    import jax
    import optax

    import scg
    from scg.datasets import load_mnist
    from scg.models import aevb

    mesh = _setup_devices(args)
    out = _check_out(args)
    _check_batch_size(args, mesh)
    mnist = load_mnist(args.data_dir)
    train_x, test_x = mnist.train_images, mnist.test_images
    x_dim = int(train_x.shape[1])
    if args.batch_size > train_x.shape[0]:
        raise UsageError(f"--batch-size {args.batch_size} exceeds the {train_x.shape[0]} training images")

    init_key, run_key, final_key, plot_key = jax.random.split(jax.random.key(args.seed), 4)
    params = aevb.init_params(init_key, x_dim=x_dim, hidden=args.hidden, latent=args.latent, biases=args.biases)
    objective = scg.compile(aevb.aevb, passes=args.passes)
    # the test bound is always the single-sample bound with the analytic KL (lower variance)
    eval_objective = objective if args.passes == "auto" else scg.compile(aevb.aevb, passes="auto")
    optimizer = optax.adam(args.lr, b1=0.9, b2=0.999, eps=1e-8)
    config = {"model": "aevb", "x_dim": x_dim, "hidden": args.hidden, "latent": args.latent,
              "biases": args.biases, "batch_size": args.batch_size, "seed": args.seed, "passes": args.passes,
              "lr": args.lr, "num_samples": args.num_samples, "train_examples": int(train_x.shape[0])}

    _say(f"scg aevb: {x_dim}-{args.hidden}-{args.hidden}-{args.latent}{' with biases' if args.biases else ''}, "
         f"passes={args.passes}, {train_x.shape[0]} training and {test_x.shape[0]} test images, "
         f"batch {args.batch_size}, {train_x.shape[0] // args.batch_size} steps/epoch, {_describe_mesh(mesh)}, "
         f"out {out}")
    return _train_and_report(
        args, aevb, objective, eval_objective, optimizer, params, train_x, test_x, config,
        keys=(run_key, final_key, plot_key), curve_title="AEVB on MNIST",
        samples_title="samples from the prior", iwae_batch_size=None, mesh=mesh)


# --------------------------------------------------------------------------- #
# scg sbn
# --------------------------------------------------------------------------- #

SBN_BASELINES = ("nvil", "moving_average", "leave_one_out", "none")


def _add_sbn_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common_arguments(
        parser, name="sbn", batch_size=100, data="binarized_mnist/ (nothing is downloaded)",
        passes_help="auto: the analytic Bernoulli KL (default); none: the sampled KL, so h's learning signal "
                    "is NVIL's log q(h|x) - log p(x,h)",
        lr=3e-3, lr_help="Adam learning rate of the model (default 3e-3: stable over 300 epochs at batch 100, "
                         "and 9 nats ahead of 1e-3 after 5 epochs)")
    parser.add_argument("--baseline", choices=SBN_BASELINES, default="nvil",
                        help="control variate for the score function of h: nvil (default; a learned "
                             "784-100-1 MLP on x with running centering), moving_average, leave_one_out "
                             "(needs --num-samples >= 2) or none")
    parser.add_argument("--baseline-lr", type=_finite_positive_float, default=3e-3,
                        help="Adam learning rate of the nvil baseline network (default 3e-3)")
    parser.add_argument("--hidden", type=_positive_int, default=200, help="stochastic hidden units (default 200)")
    parser.add_argument("--recognition-hidden", type=_non_negative_int, default=0,
                        help="width of a tanh layer in q(h|x) (0: linear, NVIL's; default 0)")


def _run_sbn(args: argparse.Namespace) -> int:
    import jax
    import optax

    import scg
    from scg.datasets import load_binarized_mnist
    from scg.models import sbn

    if args.baseline == "leave_one_out" and args.num_samples < 2:
        raise UsageError("--baseline leave_one_out averages the other particles' costs: it needs "
                         f"--num-samples 2 or more (got {args.num_samples})")
    mesh = _setup_devices(args)
    out = _check_out(args)
    _check_batch_size(args, mesh)
    train_x, _, test_x = load_binarized_mnist(args.data_dir)
    x_dim = int(train_x.shape[1])
    if args.batch_size > train_x.shape[0]:
        raise UsageError(f"--batch-size {args.batch_size} exceeds the {train_x.shape[0]} training images")

    init_key, baseline_key, run_key, final_key, plot_key = jax.random.split(jax.random.key(args.seed), 5)
    recognition_hidden = (args.recognition_hidden,) if args.recognition_hidden else ()
    params = sbn.init_params(init_key, x_dim=x_dim, hidden=args.hidden, recognition_hidden=recognition_hidden,
                             data_mean=train_x.mean(axis=0))
    baseline = {"nvil": lambda: sbn.nvil_baseline(baseline_key, x_dim=x_dim, lr=args.baseline_lr),
                "moving_average": lambda: "moving_average", "leave_one_out": lambda: "leave_one_out",
                "none": lambda: None}[args.baseline]()
    objective = scg.compile(sbn.sbn, passes=args.passes, baseline=baseline)
    # the test bound: the single-sample bound with the analytic KL (the same expectation, less noise);
    # compiled without the baseline, which changes gradients only
    eval_objective = scg.compile(sbn.sbn, passes="auto")
    optimizer = optax.adam(args.lr, b1=0.9, b2=0.999, eps=1e-8)
    config = {"model": "sbn", "x_dim": x_dim, "hidden": args.hidden, "recognition_hidden": args.recognition_hidden,
              "batch_size": args.batch_size, "seed": args.seed, "passes": args.passes, "baseline": args.baseline,
              "lr": args.lr, "baseline_lr": args.baseline_lr if args.baseline == "nvil" else None,
              "num_samples": args.num_samples, "train_examples": int(train_x.shape[0])}

    _say(f"scg sbn: {x_dim}-{args.hidden} sigmoid belief net, recognition "
         f"{'linear' if not args.recognition_hidden else f'MLP {x_dim}-{args.recognition_hidden}-{args.hidden}'}, "
         f"baseline={args.baseline}, passes={args.passes}, K={args.num_samples}, Adam({args.lr}), "
         f"{train_x.shape[0]} training and {test_x.shape[0]} test images, batch {args.batch_size}, "
         f"{train_x.shape[0] // args.batch_size} steps/epoch, {_describe_mesh(mesh)}, out {out}")
    return _train_and_report(
        args, sbn, objective, eval_objective, optimizer, params, train_x, test_x, config,
        keys=(run_key, final_key, plot_key), curve_title=f"SBN {x_dim}-{args.hidden} on binarized MNIST",
        samples_title="samples from the model (pixel means)", iwae_batch_size=args.eval_batch_size, mesh=mesh)


# --------------------------------------------------------------------------- #
# Shared by the training commands
# --------------------------------------------------------------------------- #


def _say(line: str) -> None:
    """Prints on process 0 only (every process of a distributed run runs the same command)."""
    import jax

    if jax.process_index() == 0:
        print(line, flush=True)


def _check_batch_size(args: argparse.Namespace, mesh) -> None:
    if mesh is not None and args.batch_size % mesh.size:
        n = mesh.size
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {n} devices ({_describe_mesh(mesh)}): "
                         f"each device takes an equal share of every batch; use a multiple of {n}, e.g. "
                         f"--batch-size {max(n, args.batch_size - args.batch_size % n)}")


def _settings_hint(args: argparse.Namespace, err, out: pathlib.Path) -> UsageError:
    """A resume refused for other settings, said with the flags that resume it."""
    from scg.training import CHECKPOINT_NAME
    from scg.training.checkpoint import load_metadata

    saved = load_metadata(out / CHECKPOINT_NAME).get("config", {})
    flags = []
    for name, value in sorted(saved.items()):
        option = "--" + name.replace("_", "-")
        now = getattr(args, name, None)
        if name not in vars(args) or now == value:
            continue
        if isinstance(value, bool):
            flags.append(option if value else f"no {option}")
        elif value is not None:
            flags.append(f"{option} {value}")
    resume = f"resume it with {' '.join(flags)}, or " if flags else ""
    return UsageError(f"{err} To go on: {resume}start a new run with --overwrite (deletes it) or another --out.")


def _train_and_report(args, model_module, objective, eval_objective, optimizer, params, train_x, test_x, config, *,
                      keys, curve_title: str, samples_title: str, iwae_batch_size, mesh=None) -> int:
    """Trains with :func:`scg.training.fit`, plots after every epoch, and writes the final bounds.

    ``model_module`` provides ``reconstruct``, ``sample_prior`` and ``iwae_log_likelihood``. With
    several processes, every process trains and evaluates; process 0 alone prints and writes files
    other than the checkpoint.
    """
    import jax
    import numpy as np

    from scg import training
    from scg.training import devices, plots
    from scg.training.checkpoint import CheckpointError, atomic_write

    run_key, final_key, plot_key = keys
    out = pathlib.Path(args.out)
    main = devices.is_main_process()

    def evaluate(params, key):
        return {"test_neg_elbo": training.evaluate_loss(eval_objective, params, test_x, key=key,
                                                     batch_size=args.eval_batch_size)}

    shown = np.asarray(test_x[:50])
    prior_key = jax.random.fold_in(plot_key, 0)

    def write_plots(state: training.TrainState) -> None:
        if not main:
            return
        local = devices.local_copy(state.params)
        if state.metrics:
            plots.plot_curve(state.metrics, out / "curve.png", title=curve_title)
        plots.plot_reconstructions(shown, np.asarray(model_module.reconstruct(local, shown)),
                                   out / "reconstructions.png", title=f"epoch {state.epoch}")
        plots.plot_image_grid(np.asarray(model_module.sample_prior(local, prior_key, 100)),
                              out / "samples.png", title=f"{samples_title}, epoch {state.epoch}")

    try:
        state = training.fit(
            objective, optimizer, params, training.EpochBatches(train_x, args.batch_size, seed=args.seed),
            epochs=args.epochs, key=run_key, num_samples=args.num_samples,
            steps_per_dispatch=args.steps_per_dispatch, evaluate=evaluate, on_epoch_end=write_plots, out_dir=out,
            resume=args.resume, overwrite=args.overwrite, config=config, train_metric="train_neg_elbo",
            progress=not args.no_progress, log=lambda line: print(line, flush=True), mesh=mesh)
    except CheckpointError as err:
        if args.resume and (err.leaf or "").startswith("config/"):
            raise _settings_hint(args, err, out) from err
        raise
    if not (out / "samples.png").exists() or state.epoch == 0:
        write_plots(state)
    final_params = devices.local_copy(state.params)

    results: dict = {"epoch": state.epoch, "step": state.step}
    if state.metrics:
        results["test_neg_elbo"] = state.metrics[-1]["test_neg_elbo"]
        results["seconds"] = state.metrics[-1]["seconds"]
    else:
        results["test_neg_elbo"] = evaluate(final_params, jax.random.fold_in(final_key, 1))["test_neg_elbo"]
    line = f"test: negative ELBO {results['test_neg_elbo']:.2f} nats (single-sample bound, analytic KL)"
    if args.eval_k > 0:
        extra = {} if iwae_batch_size is None else {"batch_size": iwae_batch_size}
        log_px = model_module.iwae_log_likelihood(final_params, test_x, jax.random.fold_in(final_key, 0),
                                                  args.eval_k, **extra)
        results.update(eval_k=args.eval_k, test_iwae_log_likelihood=float(np.mean(log_px)))
        line += f"; -log p(x) <= {-results['test_iwae_log_likelihood']:.2f} nats (IWAE, k={args.eval_k})"
    results["devices"] = 1 if mesh is None else int(mesh.size)
    results["processes"] = jax.process_count()
    if main:
        print(line, flush=True)
        with atomic_write(out / training.FINAL_NAME) as f:
            f.write((json.dumps(results, indent=1) + "\n").encode())
    devices.barrier("scg: results written")
    return 0


# --------------------------------------------------------------------------- #
# The command.
# --------------------------------------------------------------------------- #

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "aevb": ("train Certigrad's AEVB (a VAE, 784-1000-1000-30) on MNIST", _add_aevb_arguments, _run_aevb),
    "sbn": ("train a sigmoid belief net (784-200 Bernoulli units) on binarized MNIST with NVIL's baseline",
            _add_sbn_arguments, _run_sbn),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scg", description="scg: a tracing compiler for stochastic computation graphs; training commands.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``scg COMMAND ...``; returns the exit status (0 on success, 1 on an error, 2 on bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from scg import ScgError  # CheckpointError, DataError, NonFiniteLossError, ...

    # orbax logs a failed write with its traceback (absl) before raising; the error is reported below
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        return COMMANDS[args.command][2](args)
    except (ScgError, UsageError) as err:
        print(f"scg {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # --out read-only, a file, the disk full, data missing: one line, no traceback
        print(f"scg {args.command}: error: {_describe_os_error(err, getattr(args, 'out', None))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"scg {args.command}: interrupted; resume with --resume (the last finished epoch's "
              "checkpoint is kept)", file=sys.stderr)
        return 130


def _describe_os_error(err: OSError, out: str | None) -> str:
    """One line: what failed, on which file, and why (``strerror``), or the error's own message."""
    if err.strerror and err.filename:
        target = f"{err.filename!s}" + (f" -> {err.filename2!s}" if err.filename2 else "")
        inside = out is not None and pathlib.Path(os.fspath(err.filename)).resolve().is_relative_to(
            pathlib.Path(out).resolve())
        hint = f"; --out {out} must be a writable folder with free space" if inside else ""
        return f"{err.strerror}: {target}{hint}"
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":  # python -m scg.cli
    sys.exit(main())
