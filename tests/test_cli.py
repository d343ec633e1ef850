"""The ``transfusion`` command line: help, configuration errors before any work, a tiny end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_train import SMALL_ARGS, cli_env
from transfusion.cli import CliError, coerce, main, resolve_train_args
from transfusion.train import read_metrics


def run_main(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------- help
def test_help_lists_commands_and_keys(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "autoencoder" in out
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in (
        "--preset",
        "--config",
        "--steps",
        "--device",
        "--out",
        "--resume",
        "--model",
        "discrete",
        "lr = 0.001",
        "patch_size",
    ):
        assert text in out, text
    with pytest.raises(SystemExit) as e:
        main(["autoencoder", "train", "--help"])
    assert e.value.code == 0
    assert "--kind" in capsys.readouterr().out


def test_console_script_help():
    r = subprocess.run(
        [sys.executable, "-m", "transfusion.cli", "train", "--help"], capture_output=True, env=cli_env()
    )
    assert r.returncode == 0 and b"key=value" in r.stdout


# ---------------------------------------------------------------------- configuration errors
BAD = [
    (["lr=-1"], "train.lr"),
    (["train.lr=abc"], "train.lr"),
    (["model.patch_size=3"], "model.patch_size"),
    (["model.latent_size=6"], "model.latent_size"),  # patch 2 divides 6, but 6 does not divide 32 px
    (["model.latent_size=5"], "patch_size = 2 does not divide latent_size = 5"),
    (["model.dim=abc"], "model.dim"),
    (["dim=100", "n_heads=3"], "n_heads"),
    (["steps=1.5"], "train.steps"),
    (["nonsense=1"], "nonsense"),
    (["model.nonsense=1"], "model.nonsense"),
    (["bogus.key=1"], "bogus.key"),
    (["novalue"], "novalue"),
    (["data.image_size=7"], "data.image_size"),
    (["data.no_such_option=1"], "no_such_option"),
    (["seq_len=100000"], "train.seq_len"),
    (["attention=nope"], "attention"),
    (["compile=maybe"], "train.compile"),
    (["betas=0.9"], "train.betas"),
    (["autoencoder=/no/such/dir"], "train.autoencoder"),
    (["tokenizer=/no/such/file"], "train.tokenizer"),
    (["batch_rows=0"], "train.batch_rows"),
    (["dataset=imagenet"], "train.dataset"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[b[0][0] for b in BAD])
def test_bad_configuration_fails_before_work_naming_the_key(tmp_path, capsys, overrides, key):
    out = tmp_path / "run"
    code, stdout, err = run_main(
        capsys, "train", "--preset", "tiny", "--steps", "2", "--out", str(out), *overrides
    )
    assert code == 2
    assert key in err, err
    assert not out.exists(), "nothing may be written before the configuration is accepted"


def test_unknown_preset_and_bad_flag_values(tmp_path, capsys):
    code, _, err = run_main(capsys, "train", "--preset", "XXL", "--out", str(tmp_path / "r"))
    assert code == 2 and "--preset" in err and "XXL" in err
    with pytest.raises(SystemExit) as e:
        main(["train", "--steps", "many", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    assert "--steps" in capsys.readouterr().err
    code, _, err = run_main(capsys, "train", "--steps", "-3", "--out", str(tmp_path / "r"))
    assert code == 2 and "train.steps" in err


def test_model_flag_sets_the_family(tmp_path, capsys):
    model, train, _ = resolve_train_args("tiny", None, ["train.family=transfusion"], family="discrete")
    assert train.family == "discrete"  # the flag wins, like --steps / --device
    code, _, err = run_main(capsys, "train", "--model", "bogus", "--out", str(tmp_path / "r"))
    assert code == 2 and "train.family" in err and "discrete" in err
    code, out, _ = run_main(capsys, "train", "--model", "discrete", "--out", str(tmp_path / "r"), "--dry-run")
    assert code == 0 and json.loads(out)["train"]["family"] == "discrete"
    assert not (tmp_path / "r").exists()


def test_console_script_exit_code_and_stderr(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "transfusion.cli", "train", "--out", str(tmp_path / "r"), "lr=-0.5"],
        capture_output=True,
        env=cli_env(),
    )
    assert r.returncode == 2
    assert b"train.lr" in r.stderr and r.stdout == b""


def test_toml_config_and_precedence(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        'preset = "S"\n[model]\ndim = 64\nn_heads = 2\n[train]\nlr = 2e-3\nsteps = 7\n'
        "betas = [0.8, 0.9]\n[data]\nmax_objects = 1\n"
    )
    model, train, preset = resolve_train_args(None, str(cfg), ["lr=5e-3", "model.n_layers=3"], steps=9)
    assert preset == "S" and model.dim == 64 and model.n_layers == 3 and model.n_heads == 2
    assert train.lr == 5e-3 and train.steps == 9 and train.betas == (0.8, 0.9)
    assert train.dataset_options == {"max_objects": 1}
    model, _, preset = resolve_train_args("tiny", str(cfg), [])
    assert preset == "tiny" and model.dim == 64  # --preset beats the file's preset; [model] still applies
    cfg.write_text('[train]\nlr = "fast"\n')
    with pytest.raises(CliError, match="train.lr"):
        resolve_train_args(None, str(cfg), [])
    cfg.write_text("[modle]\ndim = 3\n")
    with pytest.raises(CliError, match="modle"):
        resolve_train_args(None, str(cfg), [])


def test_value_coercion():
    from typing import Optional  # noqa: UP035  (the annotation form of ModelConfig.noise_limit_t)

    assert coerce("k", "none", Optional[int]) is None  # noqa: UP045
    assert coerce("k", "500", int | None) == 500
    assert coerce("k", "32,64", tuple[int, ...]) == (32, 64)
    assert coerce("k", "yes", bool) is True
    assert coerce("k", "{a = 1}", dict) == {"a": 1}
    with pytest.raises(CliError, match="k = 'x'"):
        coerce("k", "x", float)


def test_flat_names_resolve_to_train_then_model():
    model, train, _ = resolve_train_args("tiny", None, ["attention=naive", "dim=64", "seed=3"])
    assert train.attention == "naive" and model.dim == 64 and train.seed == 3
    model, train, _ = resolve_train_args("tiny", None, ["model.attention=naive"])
    assert model.attention == "naive" and train.attention == "auto"


# ---------------------------------------------------------------------- end to end
def test_tiny_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "transfusion.cli",
        "train",
        *SMALL_ARGS,
        "--steps",
        "4",
        "--out",
        str(out),
        "log_every=2",
    ]
    r = subprocess.run(cmd, capture_output=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert b"done: step 4" in r.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["dim"] == 32 and cfg["train"]["dataset_options"] == {"max_objects": 1}
    assert cfg["provenance"]["command"].startswith("cli.py train")
    assert [row["step"] for row in read_metrics(out / "metrics.jsonl")] == [1, 2, 4]
    assert (out / "checkpoints" / "step_00000004.safetensors").exists()
    # the same directory without --resume is refused (exit 2), with --resume it is already complete
    again = subprocess.run(cmd, capture_output=True, env=cli_env(), timeout=300)
    assert again.returncode == 2 and b"--resume" in again.stderr
    more = subprocess.run([*cmd, "--resume", "--steps", "6"], capture_output=True, env=cli_env(), timeout=300)
    # changing steps is allowed on resume (the schedule is recomputed for the new length)
    assert more.returncode == 0, more.stderr.decode()[-2000:]
    assert [row["step"] for row in read_metrics(out / "metrics.jsonl")] == [1, 2, 4, 6]


def test_resume_with_a_different_configuration_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *SMALL_ARGS, "--steps", "2", "--out", str(out)]
    assert run_main(capsys, *args)[0] == 0
    code, _, err = run_main(capsys, *args, "--resume", "lr=0.5")
    assert code == 2 and "train.lr" in err


def test_nonfinite_loss_exits_1_with_the_step(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(
        capsys,
        "train",
        *SMALL_ARGS,
        "--steps",
        "20",
        "--out",
        str(out),
        "lr=1e6",
        "warmup_steps=0",
        "ckpt_every=1",
    )
    assert code == 1
    assert "non-finite" in err and "at step" in err and "last good checkpoint" in err


# ---------------------------------------------------------------------- autoencoder
def test_autoencoder_train_command(tmp_path, capsys):
    pytest.importorskip("diffusers")
    out = tmp_path / "vae"
    quick = ["steps=2", "batch_size=8", "train_images=32", "val_images=8", "ae.scale_images=16"]
    code, _, err = run_main(capsys, "autoencoder", "train", "--kind", "vae", "--out", str(out), "no_such=1")
    assert code == 2 and "no_such" in err and not out.exists()
    code, _, err = run_main(capsys, "autoencoder", "train", "--out", str(out), "steps=-1")
    assert code == 2 and "steps" in err and not out.exists()
    code, stdout, err = run_main(
        capsys, "autoencoder", "train", "--kind", "vae", "--dataset", "shapes", "--examples", "64",
        "--device", "cpu", "--out", str(out), *quick, "data.max_objects=1",
    )  # fmt: skip
    assert code == 0, err
    assert "latent shape (4, 8, 8)" in stdout
    from transfusion.autoencoders import load_autoencoder

    assert tuple(load_autoencoder(out).latent_shape) == (4, 8, 8)
