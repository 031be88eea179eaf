"""What a resumed run may change: one table, argument by argument.

A resumed run continues the state saved in its checkpoint (weights, optimiser, schedule,
the data order of the epoch it stopped in). Arguments that shaped that state must be the
run's own: a different --batch-size in the middle of an epoch would skip or repeat images,
a different --optimizer cannot load the saved state at all, a new --lr would be silently
replaced by the saved schedule's. Each argument of every training script is one of

* ``match``: must equal the run's saved value; a resume that differs is refused in one
  line listing every difference;
* ``change``: may differ, and the new value takes effect (it is said which);
* ``ignore``: may differ, but the run's own value stays (a warning says so);
* ``silent``: how to resume, not what: never compared.

An argument missing from this table must match (a new option is safe until it is
decided); tests/test_train.py checks that every option of train.py and of the Darknet
scripts is in the table. docs/training.md shows it; ``--help`` points there.
"""
from __future__ import annotations

import numpy as np

from errors import UserError

MATCH, CHANGE, IGNORE, SILENT = "match", "change", "ignore", "silent"

POLICY: dict[str, tuple[str, str]] = {
    # data: another data set (or order of classes) is another run
    "data": (MATCH, "the training data"), "img_dir": (MATCH, "the training images"),
    "label_dir": (MATCH, "the training labels"), "split": (MATCH, "the training split"),
    "names": (MATCH, "the class names (their order is the network's output order)"),
    "train_dir": (MATCH, "the training data"), "img_size": (MATCH, "the input size"),
    "no_augment": (MATCH, "the augmentation"),
    "val_data": (MATCH, "best.pt's score was measured on it"),
    "val_split": (MATCH, "best.pt's score was measured on it"),
    "val_dir": (MATCH, "best.pt's score was measured on it"),
    "val_labels": (MATCH, "best.pt's score was measured on it"),
    # the network and its loss
    **{k: (MATCH, "the network") for k in ("model", "S", "B", "hidden", "width", "dropout",
                                            "no_batch_norm")},
    **{k: (MATCH, "the loss") for k in ("lambda_coord", "lambda_noobj", "no_rescore", "label_smoothing",
                                         "update")},
    "flip": (MATCH, "the augmentation"), "hue": (MATCH, "the augmentation"), "cell_winner": (MATCH, "the training targets"),
    # the optimiser, its schedule and the data order: the saved state is theirs
    "batch_size": (MATCH, "the data order of the saved epoch and the steps per epoch"),
    "accum_steps": (MATCH, "the steps per epoch"), "seed": (MATCH, "the data order and augmentation"),
    **{k: (MATCH, "the saved optimiser state and schedule")
       for k in ("optimizer", "lr", "momentum", "weight_decay", "schedule", "milestones", "gamma",
                 "poly_power", "warmup_epochs", "warmup_factor", "lr_steps", "lr_scales", "max_batches")},
    # may change, and takes effect
    "epochs": (CHANGE, "extends (or shortens) the run; cosine and poly schedules stretch to the new end"),
    "grad_clip": (CHANGE, "from the next step (to rescue a diverging run)"),
    "skip_nonfinite": (CHANGE, "from the next step"),
    "eval_every": (CHANGE, "from the next epoch"), "conf_threshold": (CHANGE, "from the next validation"),
    "nms_iou": (CHANGE, "from the next validation"), "tensorboard": (CHANGE, "from the next epoch"),
    **{k: (CHANGE, "how the run executes, not what it computes")
       for k in ("device", "amp", "channels_last", "compile", "workers")},
    "decode": (CHANGE, "where the images are decoded; the same draws (a GPU's resize rounds a little "
                       "differently)"),
    # ignored: the checkpoint supplies them
    "backbone": (IGNORE, "the weights come from the checkpoint"),
    "project": (IGNORE, "the run continues in its own folder"),
    "name": (IGNORE, "the run continues in its own folder"),
    "recipe": (IGNORE, "each of the recipe's values is compared on its own"),
    "resume": (SILENT, ""), "auto_resume": (SILENT, ""),
}


def decision(name: str) -> str:
    return POLICY.get(name, (MATCH, ""))[0]


def differences(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """``(differ, notes)``: the ``match`` arguments that differ from ``saved``, and the
    notes to print for ``change`` and ``ignore`` ones. Arguments absent from ``saved``
    (a checkpoint of an older version) are not compared."""
    differ, notes = [], []
    for name in sorted(set(saved) & set(now)):
        if _same(saved[name], now[name]):
            continue
        rule, why = POLICY.get(name, (MATCH, "not in resume_policy.POLICY"))
        flag = "--" + name.replace("_", "-")
        if rule == MATCH:
            differ.append(f"{flag} {saved[name]!r} -> {now[name]!r}")
        elif rule == CHANGE:
            notes.append(f"note: resuming with {flag} {now[name]!r} (was {saved[name]!r}): {why}")
        elif rule == IGNORE:
            notes.append(f"warning: {flag} {now[name]!r} ignored on resume, the run's "
                         f"{saved[name]!r} stays: {why}")
    return differ, notes


def compare(saved: dict, now: dict, source) -> list[str]:
    """Refuse (UserError) when a ``match`` argument differs; else return the notes."""
    differ, notes = differences(saved, now)
    if differ:
        raise UserError(f"{source}: cannot resume with other arguments than the run's own "
                        f"({'; '.join(differ)}): rerun with the values in its config.json, or start "
                        "a new run (see 'Resuming' in docs/training.md)")
    return notes


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def compare_extra(saved: dict, now: dict, source) -> None:
    """What a script adds to every checkpoint (train.py: the class names in order; every
    script: the number of training images) must be the run's own."""
    for key in sorted(set(saved) & set(now)):
        if saved[key] != now[key]:
            raise UserError(f"{source}: the run was trained with {key} {_short(saved[key])}, this "
                            f"command has {_short(now[key])}: resume with the run's own data")


def compare_labels(saved, now, images, source) -> str | None:
    """The training labels, image by image (``saved`` and ``now``: one digest per image,
    dataset.DetectionDataset.label_digests; ``images``: the image paths, in order): a
    warning line naming what changed, or None.

    They may change, with a warning: refusing would block a legitimate mend. A run stopped
    by a bad file tells the user to fix it and --resume (a bad image leaves the digests as
    they were; a box found wrong mid-run is worth correcting without starting over); but
    edited boxes were accepted silently before, and a resumed run then trained on other
    data than its config.json says. The number of images must still match (compare_extra)."""
    if saved is None or now is None:  # a checkpoint of an older version, or data without labels
        return None
    saved, now = np.asarray(saved), np.asarray(now)
    changed = np.flatnonzero(saved != now) if saved.shape == now.shape else np.arange(len(now))
    if not len(changed):
        return None
    return (f"warning: {source}: the labels of {len(changed)} of {len(now)} training images changed since "
            f"this checkpoint was saved (the first: {images[changed[0]]}); the run continues with them as "
            "they are now")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def help_text() -> str:
    """One sentence for --resume's help, from the table."""
    flags = {rule: ", ".join(f"--{n.replace('_', '-')}" for n, (r, _) in POLICY.items() if r == rule)
             for rule in (CHANGE, IGNORE)}
    return (f"On resume these may change and take effect: {flags[CHANGE]}; these are ignored (with a "
            f"warning): {flags[IGNORE]}; every other argument must be the run's own")


def table_markdown() -> str:
    """The table for docs/training.md (tests check that the page shows this very table)."""
    rows = ["| argument | on resume | why |", "| --- | --- | --- |"]
    for name, (rule, why) in POLICY.items():
        if rule != SILENT:
            rows.append(f"| `--{name.replace('_', '-')}` | {rule} | {why} |")
    return "\n".join(rows)
