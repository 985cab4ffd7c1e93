"""Heal your own model (potion.heal / potion.pipelines.heal): weights trained outside the project, poison in the files.

The session's ``own_model`` (tests/conftest.py, built by tests/tiny_world.build_own_model): a tiny RGB image folder,
4 classes of 16x16 patterns; 12 training images of other classes get a white 3x3 patch in the bottom-right corner and
are moved into the target folder (``airplane``). A SmallCNN is trained on it with a plain torch loop (not the
project's pipeline) until the patch is a backdoor, and saved with ``torch.save(model.state_dict())``. 4 of the 12
poisoned files are "discovered".
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_world import CLASSES, OWN_N_FOUND, OWN_N_POISON, OWN_WIDTH, OwnModel, heal_overrides

from potion.config.compose import compose_config
from potion.core.errors import CheckpointError, ConfigError, DataError
from potion.models.small_cnn import SmallCNN
from potion.pipelines.heal import heal

pytestmark = pytest.mark.slow  # a trained model, pipeline runs

ROOT = Path(__file__).resolve().parents[1]
N_FOUND, N_POISON, WIDTH = OWN_N_FOUND, OWN_N_POISON, OWN_WIDTH
_overrides = heal_overrides


@pytest.fixture()
def world(own_model: OwnModel, monkeypatch: pytest.MonkeyPatch) -> OwnModel:
    """The session's practitioner model (tests/conftest.py), with this test using its cache folder."""
    monkeypatch.setenv("POTION_CACHE_DIR", str(own_model.cache))
    monkeypatch.setenv("POTION_THREADS", "1")
    return own_model


@pytest.fixture(scope="module")
def healed(own_model: OwnModel) -> Iterator[dict]:
    out = own_model.root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POTION_CACHE_DIR", str(own_model.cache))
        mp.setenv("POTION_THREADS", "1")
        cfg = compose_config("heal", _overrides(own_model, f"out_dir={out}",
                                                "trigger={kind: patch, size: 3, color: [1.0]}"))
        yield heal(cfg)


def test_the_planted_patch_is_a_backdoor(world: OwnModel) -> None:
    assert world.asr > 0.5


def test_heal_writes_every_output(world: OwnModel, healed: dict) -> None:
    out = world.root / "out"
    for name in ("healed.pt", "summary.json", "report.md", "ptn_trajectory.png", "suspects.csv"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert {"clean_acc_before", "clean_acc_after"} <= set(summary)
    assert summary["target_class"] == "airplane" and summary["n_f"] == N_FOUND
    model = SmallCNN(num_classes=len(CLASSES), in_channels=3, width=WIDTH)
    model.load_state_dict(torch.load(out / "healed.pt", weights_only=True))
    assert healed["discovered_given_label_after"] < healed["discovered_given_label_before"]
    assert healed["asr_after"] < healed["asr_before"]


def test_report_is_readable(world: OwnModel, healed: dict) -> None:
    report = (world.root / "out" / "report.md").read_text()
    assert "clean accuracy" in report and f"{100 * healed['clean_acc_before']:.1f} %" in report
    assert f"{100 * healed['clean_acc_after']:.1f} %" in report
    assert "discovered samples" in report and "![PTN trajectory](ptn_trajectory.png)" in report
    assert "attack success rate" in report
    assert healed["top_suspects"][0]["path"] in report


def test_suspects_rank_undiscovered_poison_high(world: OwnModel, healed: dict) -> None:
    lines = (world.root / "out" / "suspects.csv").read_text().splitlines()
    assert lines[0] == "rank,index,path,score,above_cutoff"
    top = [row.split(",")[2] for row in lines[1:21]]
    undiscovered = set(world.poisoned[N_FOUND:])
    assert undiscovered & set(top), top
    assert not set(world.poisoned[:N_FOUND]) & {row.split(",")[2] for row in lines[1:]}  # forget set not ranked


def test_safetensors_in_safetensors_out_with_prefix_kept(world: OwnModel) -> None:
    state = torch.load(world.checkpoint, weights_only=True)
    st = world.root / "lightning.safetensors"
    save_file({f"model.{k}": v for k, v in state.items()}, str(st))
    out = world.root / "out_st"
    s = heal(compose_config("heal", [*_overrides(world, f"out_dir={out}", "method=ssd"), f"checkpoint={st}"]))
    healed = load_file(str(out / "healed.safetensors"))
    assert set(healed) == {f"model.{k}" for k in state} and s["key_prefix"] == "model."
    assert not (out / "healed.pt").exists() and "asr_after" not in s
    report = (out / "report.md").read_text()
    assert "| attack success rate" not in report and "PTN" not in report


def test_bad_inputs_are_one_clear_error(world: OwnModel, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{world.poisoned[0]}\ntrain/airplane/nope.png\n")
    with pytest.raises(DataError, match="train/airplane/nope.png"):
        heal(compose_config("heal", _overrides(world, f"discovered={bad}", f"out_dir={tmp_path / 'o'}")))
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(f"rank,path\n1,{world.poisoned[0]}\n2,train/bird/0050.png\n")
    # files from two class folders are an all-to-all attack unless the user declares one target: then refused
    with pytest.raises(ConfigError, match="attack.target=0: the discovered samples are labelled \\[0, 1\\]"):
        heal(compose_config("heal", _overrides(world, f"discovered={mixed}", "attack.target=0")))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing found yet\n")
    with pytest.raises(ConfigError, match="empty"):
        heal(compose_config("heal", _overrides(world, f"discovered={empty}")))
    with pytest.raises(CheckpointError, match="do not fit model resnet9"):
        heal(compose_config("heal", [*_overrides(world), "model=resnet9", "model.width=0.25"]))
    with pytest.raises(CheckpointError, match="not found"):
        heal(compose_config("heal", _overrides(world, f"checkpoint={tmp_path / 'missing.pt'}")))
    assert not (tmp_path / "o").exists()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_pickled_code_in_the_checkpoint_ends_in_one_error_line(world: OwnModel, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"features.0.weight": torch.zeros(1), "payload": _Payload(marker)}, evil, pickle_protocol=2)
    env = {**os.environ, "POTION_CACHE_DIR": str(world.root / "cache"), "POTION_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "potion.heal", *_overrides(world, f"checkpoint={evil}"),
                           f"out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(errors) == 1 and "pickled objects" in errors[0] and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- next steps


def test_report_ends_with_the_next_steps_and_a_runnable_command(world: OwnModel, tmp_path: Path) -> None:
    """The CLI's report: confirm the suspects, add them, heal again with the exact command (which runs: the second
    heal is ``python -m potion.heal`` itself)."""
    from potion.pipelines.heal_report import format_result

    env = {**os.environ, "POTION_CACHE_DIR": str(world.root / "cache"), "POTION_THREADS": "1"}
    out = tmp_path / "first"
    first = [*_overrides(world, f"out_dir={out}"), "method=ssd"]  # in process, as potion.heal runs it
    printed = format_result(heal(compose_config("heal", first), first))
    report = (out / "report.md").read_text()
    steps = report[report.index("## Next steps"):]
    assert "## " not in steps[3:], "the next steps close the report"
    assert "Confirm the suspects" in steps and "Heal again" in steps
    command = steps.split("```bash\n")[1].split("\n```")[0]
    assert command.startswith("python -m potion.heal ") and f"discovered={out / 'next_discovered.txt'}" in command
    assert "out_dir=" not in command and "method=ssd" in command and f"checkpoint={world.checkpoint}" in command
    assert f"next: confirm the suspects in {out / 'next_discovered.txt'}" in printed and command in printed
    assert "method=potion_iterative" in report  # few files found: the iterative method is suggested

    listed = (out / "next_discovered.txt").read_text().splitlines()
    assert [x for x in listed if not x.startswith("#")] == world.poisoned[:N_FOUND]
    suspects = [x[2:] for x in listed if x.startswith("# train/")]
    assert set(world.poisoned[N_FOUND:]) & set(suspects), suspects
    confirmed = [x[2:] if x[2:] in world.poisoned else x for x in listed]  # the user uncomments the real poison
    (out / "next_discovered.txt").write_text("\n".join(confirmed) + "\n")
    args = shlex.split(command)
    again = subprocess.run([sys.executable, *args[1:], f"out_dir={tmp_path / 'again'}",  # not under the repository
                            f"hydra.run.dir={tmp_path / 'hydra2'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["n_f"] == len([x for x in confirmed if not x.startswith("#")]) > N_FOUND


def test_heal_offers_potion_iterative(world: OwnModel) -> None:
    """Suspect rounds on the user's own files: the undiscovered poison added, the attack weakened, rounds reported."""
    out = world.root / "out_iterative"
    s = heal(compose_config("heal", _overrides(world, f"out_dir={out}", "method=potion_iterative",
                                               "method.repair.iterations=20",
                                               "trigger={kind: patch, size: 3, color: [1.0]}")))
    assert s["asr_after"] < s["asr_before"] - 0.3 and s["clean_acc_after"] >= s["clean_acc_before"] - 0.05
    assert s["rounds_run"] >= 2 and s["round1_forget_size"] == N_FOUND
    assert set(s["added_files"]) == set(world.poisoned[N_FOUND:]) and s["suspects_added"] == N_POISON - N_FOUND
    report = (out / "report.md").read_text()
    assert "## Suspect rounds" in report and f"| 1 | {N_FOUND} |" in report and "Repair: 20 fine-tuning steps" in report
    assert f"It added {N_POISON - N_FOUND} files" in report
    listed = (out / "next_discovered.txt").read_text()
    assert all(f"# {p}\n" in listed for p in s["added_files"])
    assert "method=potion_iterative" in s["next_command"] and s["next_command_iterative"] is None


# ----------------------------------------------------------------------------------------------- the out folder


def test_heal_claims_its_out_dir_and_never_writes_over_another_run(world: OwnModel, tmp_path: Path) -> None:
    """run.json marks the folder; training and unlearning runs' folders are refused, another heal's unless force."""
    from potion.pipelines.run_folders import claim_run_dir, identify_run

    for kind in ("train", "unlearn"):
        other = tmp_path / kind
        claim_run_dir(other, kind, "0123456789ab", fresh=False)
        (other / "config.yaml").write_text("theirs\n")
        with pytest.raises(ConfigError, match="never writes over another kind of run"):
            heal(compose_config("heal", _overrides(world, f"out_dir={other}", "method=ssd")))
        assert (other / "config.yaml").read_text() == "theirs\n" and not (other / "summary.json").exists()

    out = tmp_path / "heal"
    first = heal(compose_config("heal", _overrides(world, f"out_dir={out}")))  # potion: a PTN trajectory
    found = identify_run(out)
    assert found is not None and found.kind == "heal" and (out / "ptn_trajectory.png").is_file()
    again = heal(compose_config("heal", _overrides(world, f"out_dir={out}")))  # the same inputs: the same folder
    assert again["clean_acc_after"] == first["clean_acc_after"]

    fewer = tmp_path / "fewer.txt"
    fewer.write_text("\n".join(world.poisoned[:2]) + "\n")
    with pytest.raises(ConfigError, match="force=true"):
        heal(compose_config("heal", _overrides(world, f"out_dir={out}", f"discovered={fewer}", "method=ssd")))
    assert json.loads((out / "summary.json").read_text())["n_f"] == N_FOUND  # the first heal's results kept
    s = heal(compose_config("heal", _overrides(world, f"out_dir={out}", f"discovered={fewer}", "method=ssd",
                                               "force=true")))
    assert s["n_f"] == 2 and json.loads((out / "summary.json").read_text())["method"] == "ssd"
    assert not (out / "ptn_trajectory.png").exists() and not (out / "ptn_trajectory.csv").exists()


def test_heal_refuses_an_out_dir_inside_the_data_folder(world: OwnModel) -> None:
    inside = world.data / "train" / "airplane" / "healed"
    with pytest.raises(ConfigError, match="inside the data folder"):
        heal(compose_config("heal", _overrides(world, f"out_dir={inside}", "method=ssd")))
    assert not inside.exists()


_HEAL_CHILD = """
import os, pathlib, runpy, sys, time
import potion.pipelines.heal as pipeline
sig = pathlib.Path(os.environ["POTION_TEST_SIGNAL"])
run_timed = pipeline.run_timed

def stall(method_fn, task, args):  # the method is running: tell the test and wait for its signal
    sig.write_text("in the method")
    time.sleep(60)
    return run_timed(method_fn, task, args)

pipeline.run_timed = stall
sys.argv = ["potion.heal", *sys.argv[1:]]
runpy.run_module("potion.heal", run_name="__main__", alter_sys=True)
"""


def test_sigterm_during_heal_is_exit_143_one_line_and_a_killed_mlflow_run(world: OwnModel, tmp_path: Path) -> None:
    import signal
    import time

    from mlflow.tracking import MlflowClient

    sig, db, out = tmp_path / "in-method", tmp_path / "mlflow.db", tmp_path / "out"
    env = {**os.environ, "POTION_CACHE_DIR": str(world.root / "cache"), "POTION_THREADS": "1",
           "POTION_TEST_SIGNAL": str(sig)}
    args = [*_overrides(world, f"out_dir={out}", "method=ssd"), "logger=mlflow", f"logger.tracking_uri=sqlite:///{db}",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.Popen([sys.executable, "-c", _HEAL_CHILD, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not sig.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the heal never reached its method"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, stdout + stderr  # handled: 128 + 15, not killed by it
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "Traceback" not in stderr, stderr[-3000:]
    assert not (out / "summary.json").exists()
    client = MlflowClient(f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.status for r in runs] == ["KILLED"]  # closed as stopped, not left RUNNING
