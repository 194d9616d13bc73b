"""Pretraining: config, Aria's optimizer/schedule/loss, overfitting a real file, exact resume after SIGKILL."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aria_model.midi import load_midi
from aria_model.model import ModelConfig, TransformerLM
from aria_model.shards import ShardConfig, build_token_shards
from aria_model.tokenizer import AbsTokenizer
from aria_model.training.callbacks import read_step_log
from aria_model.training.config import OptimConfig, PretrainConfig
from aria_model.training.lm_module import aria_loss
from aria_model.training.optim import WARMUP_START, adamw, lr_factor
from aria_model.training.pretrain import pretrain
from aria_model.training.runner import check_resumable
from tests.test_shards import make_curated_home

REPO = Path(__file__).resolve().parent.parent
SHARDS = ShardConfig(shard_tokens=8_000, row_group_tokens=500, split_fractions=(0.6, 0.4, 0.0), seed=1, workers=1)
# Small enough that a step takes tens of milliseconds on a loaded CI core.
QUICK = ["model.max_seq_len=128", "data.seq_len=128", "data.batch_size=2", "data.num_workers=0",
         "train.log_every=100", "optim.warmup_steps=4", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    curated = make_curated_home(tmp_path_factory.mktemp("pretrain") / "home")
    build_token_shards(curated.inputs, curated.home / "token_shards", SHARDS)
    return curated.home / "token_shards"


def quick_config(shards: Path, out_dir: Path, *overrides: str) -> PretrainConfig:
    return PretrainConfig.preset("tiny").with_overrides(
        [*QUICK, f"data.shards={shards}", f"out_dir={out_dir}", *overrides])


# -- configuration --------------------------------------------------------------------------


def test_presets_overrides_and_files(tmp_path):
    assert PretrainConfig.preset("medium").model == ModelConfig.preset("medium")  # 80 GB fits it unchecked
    config = PretrainConfig.preset("tiny").with_overrides(
        ["train.max_steps=7", "optim.betas=[0.8, 0.9]", "model=small", "run_name=x", "train.compile=true"])
    assert (config.train.max_steps, config.optim.betas, config.model, config.run_name, config.train.compile) == (
        7, (0.8, 0.9), ModelConfig.preset("small"), "x", True)
    toml = tmp_path / "run.toml"
    toml.write_text('run_name = "t"\n[model]\npreset = "tiny"\nn_layers = 3\n[optim]\nlr = 1\n')
    from_file = PretrainConfig.from_file(toml)
    assert from_file.model == ModelConfig.preset("tiny", n_layers=3) and from_file.optim.lr == 1.0
    assert PretrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.flat()["optim.lr"] == config.optim.lr


@pytest.mark.parametrize("bad, message", [
    (["train.max_step=3"], "unknown config field 'train.max_step'"),
    (["train.max_steps=three"], "train.max_steps must be an integer"),
    (["train.compile=1"], "train.compile must be true or false"),
    (["train.attention=fast"], "train.attention 'fast': one of auto, cudnn, flash"),
    (["model=huge"], "unknown model preset 'huge'"),
    (["lr"], "not of the form section.field=value"),
])
def test_bad_overrides_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig().with_overrides(bad)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"\['medium', 'small', 'tiny'\]"):
        PretrainConfig.preset("large")


# -- Aria's optimizer, schedule and loss -----------------------------------------------------


def test_schedule_is_arias_warmup_then_linear_decay_to_ten_percent():
    factor = [lr_factor(step, 200, 1000, 0.1) for step in range(1201)]
    assert factor[0] == pytest.approx(WARMUP_START) and factor[100] == pytest.approx(0.5, abs=1e-6)
    assert factor[200] == 1.0 and factor[600] == pytest.approx(0.55) and factor[1000] == pytest.approx(0.1)
    assert factor[1200] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(factor[:200], factor[1:201]))


def test_optimizer_is_adamw_with_arias_settings_on_every_parameter():
    model = TransformerLM(ModelConfig.preset("tiny"))
    optimizer = adamw(model.parameters(), OptimConfig())
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (3e-4, 0.1, (0.9, 0.95), 1e-5)
    assert sum(p.numel() for p in group["params"]) == model.num_params()


def test_loss_averages_masked_token_losses_over_the_non_zero_ones():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]])
    target = torch.tensor([[0, 2, 2, 1]])
    mask = torch.tensor([[True, True, True, False]])
    by_hand = [-math.log(math.exp(2) / (math.exp(2) + 2)), -math.log(1 / (math.e + 2)),
               -math.log(math.exp(3) / (math.exp(3) + 2))]
    assert aria_loss(logits, target, mask).item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    assert aria_loss(logits, target, mask).item() == pytest.approx(
        F.cross_entropy(logits[0, :3], target[0, :3]).item(), rel=1e-6)


def test_compiled_training_compiles_the_loss_too_and_it_gives_the_same_value():
    """Per-block compilation leaves the loss eager; with train.compile the module compiles it as well."""
    from aria_model.training.lm_module import PretrainModule

    config = PretrainConfig.preset("tiny").with_overrides(["train.compile=true"])
    module = PretrainModule(config, total_steps=1)
    module.configure_model()
    assert module._loss is not aria_loss
    eager = PretrainModule(PretrainConfig.preset("tiny"), total_steps=1)
    eager.configure_model()
    assert eager._loss is aria_loss
    torch.manual_seed(0)
    logits, target = torch.randn(2, 16, 50), torch.randint(0, 50, (2, 16))
    mask = torch.rand(2, 16) > 0.3
    torch.testing.assert_close(module._loss(logits, target, mask), aria_loss(logits, target, mask))


def test_overfitting_one_real_demo_file_drives_the_loss_below_0_1(tiny_demo_corpus):
    """The seed's sanity check: the tiny model memorises one real piece."""
    torch.manual_seed(0)
    tokenizer = AbsTokenizer()
    path = sorted(tiny_demo_corpus.rglob("*.mid"))[0]
    ids = torch.from_numpy(tokenizer.tokenize_ids(load_midi(path)).astype("int64"))[:257]
    source, target = ids[:-1][None], ids[1:][None]
    model = TransformerLM(ModelConfig.preset("tiny"))
    optimizer = adamw(model.parameters(), OptimConfig(lr=3e-3, weight_decay=0.0))
    mask = torch.ones_like(target, dtype=torch.bool)
    for step in range(300):
        loss = aria_loss(model(source), target, mask)
        if loss.item() < 0.1:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {step} steps on {path.name} ({len(ids)} tokens)"


# -- the Lightning run ------------------------------------------------------------------------


def test_a_run_learns_writes_its_outputs_and_a_rerun_resumes_instead_of_restarting(shards, tmp_path):
    config = quick_config(shards, tmp_path / "run", "train.max_steps=30", "train.val_every=15",
                          "train.checkpoint_every=10", "optim.lr=3e-3")
    result = pretrain(config, report=lambda line: None)
    rows = read_step_log(result.out_dir / "loss.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4
    assert math.isfinite(result.val_loss) and result.steps == 30 and result.tokens == 30 * 2 * 128
    checkpoints = sorted(p.name for p in (result.out_dir / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt", "step-00000020.ckpt", "step-00000030.ckpt"]
    weights = torch.load(result.weights, weights_only=False)
    model = TransformerLM(ModelConfig.from_dict(weights["model_config"]))
    model.load_state_dict(weights["state_dict"])
    assert weights["step"] == 30

    again = pretrain(config.with_overrides(["train.max_steps=34"]), report=lambda line: None)
    assert again.resumed_from_step == 30 and again.steps == 34
    assert [int(r["step"]) for r in read_step_log(again.out_dir / "loss.csv")] == list(range(1, 35))


def test_a_checkpoint_of_another_model_is_not_resumed(shards, tmp_path):
    result = pretrain(quick_config(shards, tmp_path / "run", "train.max_steps=2"), report=lambda line: None)
    other = quick_config(shards, tmp_path / "run", "train.max_steps=2", "model.n_layers=3")
    with pytest.raises(ValueError, match="different model config"):
        check_resumable(result.checkpoint, other)


def _launch(shards: Path, out_dir: Path, home: Path) -> subprocess.Popen:
    overrides = [*QUICK, f"data.shards={shards}", f"out_dir={out_dir}", "train.max_steps=40",
                 "train.checkpoint_every=8", "train.val_every=0", "train.deterministic=true"]
    return subprocess.Popen(
        [sys.executable, "-m", "aria_model.training.pretrain", "--preset", "tiny", "--set", *overrides],
        cwd=REPO, env={**os.environ, "ARIA_HOME": str(home)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_run_killed_with_sigkill_resumes_and_reproduces_the_uninterrupted_loss_curve(shards, tmp_path):
    """Killed mid-epoch after its step-16 checkpoint, restarted: the same 40 losses (CPU: bit for bit)."""
    straight = _launch(shards, tmp_path / "straight", tmp_path)
    killed_dir = tmp_path / "killed"
    killed = _launch(shards, killed_dir, tmp_path)
    deadline = time.monotonic() + 240
    while not (killed_dir / "checkpoints" / "step-00000016.ckpt").exists():
        assert killed.poll() is None, killed.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no step-16 checkpoint in time"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    steps_before_kill = len(read_step_log(killed_dir / "loss.csv"))
    assert 16 <= steps_before_kill < 40, "the kill did not land mid-run"

    resumed = _launch(shards, killed_dir, tmp_path)
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read().decode()[-2000:]
    assert straight.wait(timeout=240) == 0, straight.stderr.read().decode()[-2000:]
    expected = read_step_log(tmp_path / "straight" / "loss.csv")
    got = read_step_log(killed_dir / "loss.csv")
    assert [int(r["step"]) for r in got] == list(range(1, 41))
    # Tolerance 1e-6 absolute on the printed loss: the CPU run is deterministic, so in practice equal.
    for a, b in zip(expected, got):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-6, (a, b)
        assert a["lr"] == b["lr"]
