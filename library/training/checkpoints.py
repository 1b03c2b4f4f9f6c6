"""Names, rotation and resume state of what a training run writes (FORMATS.md 8.2).

LoRA files:  {name or "epoch"}-{epoch:06d}.ext   every --save_every_n_epochs (not the last epoch)
             {name or "at"}-step{step:08d}.ext   every --save_every_n_steps
             {name or "last"}.ext                at the end
State dirs:  the same stem + "-state"; they hold accelerate's save_state output + train_state.json.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from library.errors import ConfigError

TRAIN_STATE_FILE = "train_state.json"


def epoch_stem(output_name: str | None, epoch: int) -> str:
    return f"{output_name or 'epoch'}-{epoch:06d}"


def step_stem(output_name: str | None, step: int) -> str:
    return f"{output_name or 'at'}-step{step:08d}"


def final_stem(output_name: str | None) -> str:
    return output_name or "last"


def lora_path(output_dir: str, stem: str, save_model_as: str) -> Path:
    return Path(output_dir) / f"{stem}.{save_model_as}"


def state_dir(output_dir: str, stem: str) -> Path:
    return Path(output_dir) / f"{stem}-state"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def rotate_epoch_outputs(output_dir: str, output_name: str | None, ext: str, epoch: int, every: int,
                         keep_files: int | None, keep_states: int | None) -> None:
    """Delete the epoch-wise file/state that fell out of the last-N window (sd-scripts' rule)."""
    if keep_files:
        old = epoch - every * keep_files
        if old > 0:
            _remove(lora_path(output_dir, epoch_stem(output_name, old), ext))
    if keep_states:
        old = epoch - every * keep_states
        if old > 0:
            _remove(state_dir(output_dir, epoch_stem(output_name, old)))


_STEP_RE = re.compile(r"-step(\d{8})")


def rotate_step_outputs(output_dir: str, output_name: str | None, ext: str, step: int,
                        keep_files_steps: int | None, keep_states_steps: int | None) -> None:
    """Keep only step-wise outputs newer than (step - N), N counted in steps as sd-scripts does."""
    prefix = f"{output_name or 'at'}-step"
    for path in Path(output_dir).glob(f"{prefix}*"):
        m = _STEP_RE.search(path.name)
        if not m:
            continue
        s = int(m.group(1))
        is_state = path.name.endswith("-state")
        keep = keep_states_steps if is_state else keep_files_steps
        if not keep or (not is_state and path.suffix != f".{ext}"):
            continue
        if s <= step - keep:
            _remove(path)


@dataclass
class TrainPosition:
    """Where a run stands; saved with each state so --resume continues exactly there."""
    current_epoch: int          # epochs finished (0-based index of the epoch in progress)
    current_step: int           # optimizer steps done
    batches_done_in_epoch: int  # batches of `current_epoch` already consumed
    seed: int

    def save(self, directory: Path) -> None:
        (directory / TRAIN_STATE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: Path) -> "TrainPosition":
        f = directory / TRAIN_STATE_FILE
        if not f.is_file():
            raise ConfigError(f"--resume {directory}: no {TRAIN_STATE_FILE} inside; is this a state folder "
                              "written with --save_state?")
        data = json.loads(f.read_text())
        try:
            return cls(**{k: data[k] for k in ("current_epoch", "current_step", "batches_done_in_epoch", "seed")})
        except KeyError as e:
            raise ConfigError(f"--resume {directory}: {TRAIN_STATE_FILE} lacks {e}; it was not written by "
                              "this trainer") from None
