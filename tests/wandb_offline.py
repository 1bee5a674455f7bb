"""Reading what wandb wrote offline, for the tests that check it."""
import time
from pathlib import Path


def offline_run_holding(wandb_dir: Path, keys: tuple[bytes, ...], timeout: float = 60) -> bytes:
    """The bytes of the one offline run file under `wandb_dir`, once they hold every key (or after `timeout`
    seconds): wandb's service process writes the records behind wandb.finish(), and on a loaded machine they
    can land a little later (seen in CI: only the file header there when read at once)."""
    runs = list(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    deadline = time.monotonic() + timeout
    while not all(k in runs[0].read_bytes() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    return runs[0].read_bytes()
