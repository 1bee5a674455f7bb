"""What a newcomer meets first, through the real entry points: a hub model on a machine that cannot reach
the hub, a MATH500 preset without training questions, a SLURM sweep without its plugin; each is one
line on stderr and exit 2, before any stage and without retrying the hub (counted connections, not a clock).
And library warnings print once."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdpo import hub
from cdpo.validation import problems

REPO = Path(__file__).resolve().parents[1]
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "CDPO_MATH_TRAIN", *hub.PROXY_VARIABLES)


def _closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path, **extra) -> dict:
    """The environment of a subprocess whose every socket connection is logged (see _connections)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import socket
        _connect = socket.socket.connect
        def connect(self, address):
            with open({str(tmp_path / "connections.log")!r}, "a") as f:
                f.write(repr(address) + "\\n")
            return _connect(self, address)
        socket.socket.connect = connect
    """))
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    return {**env, "HF_HOME": str(tmp_path / "hf"),  # an empty hub cache
            "PYTHONPATH": os.pathsep.join([str(site), str(REPO), str(REPO / "kernels"), env.get("PYTHONPATH", "")]),
            **extra}


def _connections(tmp_path, port: int | None = None) -> list[str]:
    """The connections the subprocesses made (to `port` only, when given)."""
    log = tmp_path / "connections.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [line for line in lines if port is None or line.endswith(f", {port})")]


def _train(tmp_path, *args, env):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    return proc


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("train.py: error: ")
    return lines[0]


@pytest.mark.parametrize("why", ["HF_HUB_OFFLINE", "unreachable"])
def test_hub_model_without_hub_fails_at_once_naming_model_path(tmp_path, why):
    """It used to sample first, then retry the hub for a minute (each retry printed twice) and end in a traceback
    (unreachable) or name a key that does not exist, model.name_or_path (HF_HUB_OFFLINE)."""
    port = _closed_port()
    extra = {"HF_HUB_OFFLINE": "1"} if why == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    proc = _train(tmp_path, "+experiment=llama3_8b_cdpo", "trainer=cpu", f"run_dir={tmp_path / 'run'}",
                           env=_env(tmp_path, **extra))
    line = _one_line_error(proc)
    assert "model.path='meta-llama/Meta-Llama-3-8B'" in line and "model.path=/path/to/" in line
    assert "name_or_path" not in line and ("HF_HUB_OFFLINE" in line if why == "HF_HUB_OFFLINE" else "127.0.0.1" in line)
    assert "Retry" not in proc.stdout + proc.stderr and "[sample]" not in proc.stdout  # no hub retries, no stage
    assert not (tmp_path / "run" / "trajectories.jsonl").exists()
    # a minute of retries before: now the probe's one connection at most (none when offline), not a clock
    assert len(_connections(tmp_path, port)) <= (0 if why == "HF_HUB_OFFLINE" else 1), _connections(tmp_path)


def test_behind_a_proxy_the_hub_is_not_probed_directly(monkeypatch):
    """A cluster whose only way out is a proxy: a direct TCP probe would fail and refuse a model the hub
    libraries can download through the proxy, so the probe stands aside."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    for var in OFFLINE_VARS:  # CI runs with HF_HUB_OFFLINE=1
        monkeypatch.delenv(var, raising=False)
    assert not hub.reachable()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed directly"))
    assert hub.reachable() and hub.unavailable() is None


def test_loading_a_hub_model_asks_the_probe_not_the_hub(tmp_path):
    """The library path (no validation before it), in a process that imported huggingface_hub online: a hub
    that does not answer the probe means the local cache only, so the error comes at once (the model used to
    retry a PEFT adapter config on the hub for 23 s even with local_files_only, a transformers 5 quirk)."""
    script = textwrap.dedent("""
        from cdpo.models import OfflineHubError, load_model, load_tokenizer
        for load in (load_model, load_tokenizer):
            try:
                load("cdpo-test-org/no-such-model-xyz")
            except OfflineHubError as e:
                print(e)
    """)
    port = _closed_port()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}"))
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout + proc.stderr[-3000:]
    # the probe (a load may ask twice: config, then adapter config); no retries, which are 5 a request
    assert len(_connections(tmp_path, port)) <= 4, _connections(tmp_path)
    for message in lines:
        assert message.startswith("model.path='cdpo-test-org/no-such-model-xyz': ") and "did not answer" in message
    assert "Retry" not in proc.stderr


def test_validation_probes_the_hub_only_for_uncached_hub_ids(monkeypatch):
    cfg = {"model": {"path": "org/model"}}
    monkeypatch.setattr(hub, "unavailable", lambda *a: "offline: HF_HUB_OFFLINE is set")
    monkeypatch.setattr(hub, "cached", lambda repo_id, filename="config.json": repo_id == "org/cached")
    [problem] = [p for p in problems(cfg) if p.startswith("model.path")]
    assert problem.startswith("model.path='org/model': a local model directory (model.path=/path/to/model)")
    assert not [p for p in problems({"model": {"path": "org/cached"}}) if p.startswith("model.path")]
    monkeypatch.setattr(hub, "unavailable", lambda *a: None)  # online: the hub will serve it
    assert not [p for p in problems(cfg) if p.startswith("model.path")]


def test_math500_preset_without_training_questions_names_data_train_source(tmp_path):
    proc = _train(tmp_path, "+experiment=llama3_8b_math500", "trainer=cpu", "model.path=tiny:llama",
                     f"run_dir={tmp_path / 'run'}", env=_env(tmp_path))
    line = _one_line_error(proc)
    assert line.startswith("train.py: error: bad setting: data.train_source=None: ")
    assert "data.train_source=jsonl:" in line and "math500" in line
    assert not (tmp_path / "run").exists()


def test_slurm_launcher_without_its_plugin_says_what_to_install(tmp_path):
    """Hydra used to fail with a traceback ("Unknown plugin class"). The plugin is made unimportable by a
    shim first on the path, so the test holds where hydra-submitit-launcher is installed too."""
    shim = tmp_path / "shim" / "hydra_plugins" / "hydra_submitit_launcher"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("simulated: hydra-submitit-launcher is not installed")\n')
    env = _env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "shim"), env["PYTHONPATH"]])
    proc = _train(tmp_path, "-m", "hydra/launcher=slurm", "model=tiny", "method=dpo,cdpo", env=env)
    line = _one_line_error(proc)
    assert 'pip install -e ".[slurm]"' in line and "hydra/launcher=slurm" in line
    assert "Traceback" not in proc.stderr and not (tmp_path / "multirun").exists()


@pytest.mark.parametrize("config", ["cdpo", "console"])
def test_library_warnings_print_once(tmp_path, config):
    """huggingface_hub (and datasets) print their warnings with their own stderr handler and also propagate them
    to the root logger, whose console handler printed them a second time. Under the entry points' logging
    config (conf/hydra/job_logging/) each shows once; cdpo's own messages still show, and the log file keeps all."""
    script = textwrap.dedent(f"""
        import logging.config
        from omegaconf import OmegaConf
        conf = OmegaConf.load({str(REPO / "conf/hydra/job_logging" / f"{config}.yaml")!r})
        if "file" in conf.handlers:
            conf.handlers.file.filename = {str(tmp_path / "job.log")!r}
        logging.config.dictConfig(OmegaConf.to_container(conf))
        from huggingface_hub.utils import logging as hf_logging
        hf_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        logging.getLogger("cdpo.pipeline.runner").info("[sample] running")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (proc.stdout + proc.stderr).count("Retrying in 1s") == 1, (proc.stdout, proc.stderr)
    assert proc.stdout.count("[sample] running") == 1
    if config == "cdpo":
        assert "Retrying in 1s" in (tmp_path / "job.log").read_text()
