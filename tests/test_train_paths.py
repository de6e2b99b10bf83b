"""Training paths beyond the plain run: where a run starts, the model types, the precisions, the run folder.

- ``training.resume_from_checkpoint``: a run's ``last.ckpt`` is continued (weights, optimiser, schedule,
  position, metrics, best weights) and ends as an uninterrupted longer run; stopped on the way, it continues
  from its own state, not again from the checkpoint; a ``best.ckpt`` (weights only) is refused in one line
  that points to ``training.init_from``;
- ``model.model_type: mamba`` (unidirectional) trains, and its ``best.ckpt`` predicts causally;
- ``training.mixed_precision``: bf16 runs on CPU (autocast) with ``device: cpu``, fp16 is refused on CPU in one line;
- several processes without a run name write one timestamped folder, named by the main process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SEQS, settings_for, tiny_config, write_config
from ptm_mamba import train as train_module
from ptm_mamba.errors import PipelineError, StopRequested
from ptm_mamba.layout import BEST_CKPT, LAST_CKPT, RESUME_DIR, RUN_FILES, RUN_PREFIX, run_dir
from ptm_mamba.checkpoint import load_model
from ptm_mamba.predict import predict
from ptm_mamba.split import run_split
from ptm_mamba.train import without_throughput
from test_train_features import derived, records, train_here, train_steps

STEPS, LOG_STEPS = 6, 3


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[dict, Path, Path]:
    """A tiny split (no ESM) and an uninterrupted reference run: (config, split folder, reference run)."""
    root = tmp_path_factory.mktemp("paths")
    config = tiny_config(root, n=40, training={"use_esm": False, "max_steps": STEPS, "log_steps": LOG_STEPS})
    run_split(settings_for(config), root / "split")
    return config, root / "split", train_here(config, root / "split", "ref")


def sigterm_at_call(monkeypatch, call: int) -> None:
    """SIGTERM arrives during the ``call``-th training batch of the run."""
    real, calls = train_module.backward_batch, []

    def backward_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "backward_batch", backward_batch)


# ----------------------------------------------------------------------------- resume_from_checkpoint

def test_a_last_ckpt_is_continued_to_where_a_longer_run_ends(project, monkeypatch, capsys):
    config, split, ref = project
    short = train_here(derived(config, max_steps=LOG_STEPS), split, "short")
    cfg = derived(config, resume_from_checkpoint=str(short / LAST_CKPT))

    sigterm_at_call(monkeypatch, 2)  # during step 5, the second step after the checkpoint's step 3
    with pytest.raises(StopRequested, match="at step 5;"):
        train_here(cfg, split, "continued")
    monkeypatch.undo()
    assert f"resumed from {short / LAST_CKPT} at step 3" in capsys.readouterr().out

    run = train_here(cfg, split, "continued")  # stopped on the way: it continues from its own state
    assert f"resumed from {run / RESUME_DIR / 'state.ckpt'} at step 5" in capsys.readouterr().out
    assert without_throughput(records(run)) == without_throughput(records(ref))
    assert [m["Step"] for m in train_steps(records(short))] == [1, 2, 3]
    for name in (LAST_CKPT, BEST_CKPT):
        a, b = (torch.load(r / name, weights_only=True) for r in (run, ref))
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    a, b = (torch.load(r / LAST_CKPT, weights_only=True) for r in (run, ref))
    assert a["position"] == b["position"] and a["scheduler"] == b["scheduler"]
    assert all(torch.equal(x, y) for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
               for x, y in zip(s.values(), t.values()))


def test_a_run_continued_with_more_steps_follows_its_own_decaying_schedule(project):
    """From a last.ckpt of a 3-step linear schedule (at its end, lr at min_lr) to 6 steps: steps 4-6
    take the 6-step schedule's lr, as in a 6-step run, from the first one on."""
    config, split, _ = project
    linear = {"lr_schedule": "linear", "warmup_steps": 0, "min_lr_ratio": 0.1}
    short = train_here(derived(config, max_steps=LOG_STEPS, **linear), split, "short-linear")
    longer = train_here(derived(config, resume_from_checkpoint=str(short / LAST_CKPT), **linear), split,
                        "continued-linear")
    straight = train_here(derived(config, **linear), split, "straight-linear")
    lrs = {run.name: [m["lr"] for m in train_steps(records(run))] for run in (short, longer, straight)}
    assert lrs[longer.name][:3] == lrs[short.name]
    assert lrs[longer.name][3:] == lrs[straight.name][3:]
    assert lrs[straight.name][3] > lrs[short.name][-1]  # the schedules differ


def test_a_best_ckpt_or_a_missing_one_to_resume_from_is_one_line(project):
    config, split, ref = project
    best = ref / BEST_CKPT
    with pytest.raises(PipelineError, match=rf"^training.resume_from_checkpoint: {best} holds weights only "
                                            rf"\(a {re.escape(BEST_CKPT)}\).* set training.init_from") as err:
        train_here(derived(config, resume_from_checkpoint=str(best)), split, "from-best")
    assert "\n" not in str(err.value)
    missing = ref / "nowhere.ckpt"
    with pytest.raises(PipelineError, match=rf"^training.resume_from_checkpoint: checkpoint not found: {missing}$"):
        train_here(derived(config, resume_from_checkpoint=str(missing)), split, "from-missing")
    assert not run_dir(ref.parent, "from-best").exists() and not run_dir(ref.parent, "from-missing").exists()


# ----------------------------------------------------------------------------- model.model_type: mamba

def test_the_unidirectional_model_trains_and_its_checkpoint_predicts_causally(project, capsys):
    config, split, ref = project
    cfg = derived(config, max_steps=2, log_steps=2)
    cfg["model"]["model_type"] = "mamba"
    run = train_here(cfg, split, "unidirectional")
    assert "mamba: " in capsys.readouterr().out  # the summary line names the model type
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in train_steps(records(run)))

    prefix = SEQS["a"]  # 10 residues: <cls> and they are positions 0..10
    models = {name: load_model(path / BEST_CKPT) for name, path in (("mamba", run), ("bi", ref))}
    assert models["mamba"].model.config.model_type == "mamba"
    assert models["bi"].model.config.model_type == "bidirectional_mamba"
    for name, trained in models.items():
        short, longer = predict(trained.model, [prefix, prefix + "GGKLW"], esm=trained.esm,
                                trained_esm=trained.trained_esm)
        assert short.hidden_states.shape == (12, 16) and torch.isfinite(short.logits).all()
        same_prefix = torch.allclose(short.hidden_states[:11], longer.hidden_states[:11], atol=1e-6)
        assert same_prefix == (name == "mamba")  # only the bidirectional model sees what follows


# ----------------------------------------------------------------------------- training.mixed_precision

@pytest.fixture
def new_accelerator_state():
    """accelerate keeps one mixed precision per process: let this test's runs choose their own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_trains_on_cpu_with_autocast(project, new_accelerator_state):
    config, split, ref = project
    on_cpu = {**derived(config, mixed_precision="bf16", max_steps=2, log_steps=2), "device": "cpu"}
    run = train_here(on_cpu, split, "bf16")  # bf16 asks for a GPU, unless device: cpu says otherwise
    first, fp32 = train_steps(records(run))[0], train_steps(records(ref))[0]
    assert first["tokens"] == fp32["tokens"]  # the same batch, ...
    assert first["train_loss"] != fp32["train_loss"]  # ... scored in bf16
    assert first["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.02)
    weights = torch.load(run / BEST_CKPT, weights_only=True)["model"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU")
def test_fp16_on_cpu_is_one_line(project):
    config, split, ref = project
    with pytest.raises(PipelineError, match=r'^training.mixed_precision: fp16 needs a GPU .* use bf16 or "no"$'):
        train_here({**derived(config, mixed_precision="fp16"), "device": "cpu"}, split, "fp16")
    assert not run_dir(ref.parent, "fp16").exists()


# ----------------------------------------------------------------------------- processes without a run name

# Rank 1 starts 2 s after rank 0, so that a process naming the folder by its own clock would name another.
LATE_RANK_1 = """
import os, sys, time
time.sleep(2.0 * int(os.environ["RANK"]))
from ptm_mamba.cli import main
sys.exit(main())
"""


def test_two_processes_without_a_run_name_write_one_timestamped_folder(project, tmp_path):
    config, split, _ = project
    cfg = derived(config, max_steps=2, log_steps=2, num_processes=2, per_device_train_batch_size=3,
                  output_dir=str(tmp_path / "outputs"))
    cfg["run_name"] = None
    path = write_config(tmp_path / "config.yaml", **cfg)
    script = tmp_path / "late_rank_1.py"
    script.write_text(LATE_RANK_1)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), "train", "--config", str(path), "--split_dir", str(split), "--no_progress"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 processes" in result.stdout
    [run] = (tmp_path / "outputs").iterdir()
    timestamped = re.escape(RUN_PREFIX) + r"\d{4}(?:-\d\d){5}"  # a run named by its start time
    assert re.fullmatch(timestamped, run.name)
    assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES)
    # each process names its folder (the two processes' prints may share a line)
    assert re.findall(rf"outputs in (\S+?{timestamped})", result.stdout) == [str(run)] * 2
    assert [m["Step"] for m in train_steps(records(run))] == [1, 2]


def test_without_a_progress_bar_the_log_shows_step_loss_speed_and_time_left(project, monkeypatch, capsys):
    config, split, ref = project
    monkeypatch.setattr(train_module.ProgressLines, "EVERY_S", 0.0)  # a line every step
    train_here(config, split, "lines")
    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"step \d+/\d+ \(", line)]
    assert [line.split(":")[0] for line in lines] == [f"step {s}/{STEPS} ({100 * s / STEPS:.0f}%)"
                                                      for s in range(1, STEPS + 1)], lines
    assert all(re.search(r": loss \d+\.\d{4}, [\d,]+ tokens/s, \d+ min \d\d s left$", line) for line in lines), lines
