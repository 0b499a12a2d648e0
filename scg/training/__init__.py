"""The training application: a resumable loop over any compiled objective, checkpoints, plots,
data parallelism over a device mesh and several processes (:mod:`scg.training.devices`).

Built on the core's public API only (``scg.compile``, ``scg.Objective``), the
way ``flax.training`` sits on Flax; ``import scg`` never imports it.
"""
from scg.training import devices as devices
from scg.training.checkpoint import CheckpointError as CheckpointError
from scg.training.loop import (
    CHECKPOINT_NAME as CHECKPOINT_NAME,
    FINAL_NAME as FINAL_NAME,
    METRICS_NAME as METRICS_NAME,
    EpochBatches as EpochBatches,
    NonFiniteLossError as NonFiniteLossError,
    RunExistsError as RunExistsError,
    TrainState as TrainState,
    evaluate_loss as evaluate_loss,
    fit as fit,
    init_state as init_state,
    load_state as load_state,
    make_multi_step as make_multi_step,
    make_step as make_step,
    run_files as run_files,
    save_state as save_state,
)
