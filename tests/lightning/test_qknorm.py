"""QK-norm attention: RMSNorm / LayerNorm over ``head_dim`` on q and k makes the q and k projection
weights scale-invariant (per head, so as a whole), and nothing else in the transformer.

Single process here (detection, a fit, the Hydra experiment); the FSDP × TP run with heads split
across ranks (4 processes, equal to one process) is in ``test_sharded_layouts``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from examples.data.markov import markov_chain, sample_sequences
from examples.modules.qknorm_transformer import QKNormTransformer, TransformerLM
from lightning_smd import find_scale_invariant
from tests.setups_common import GLOBAL_BATCH, data_parallel_rank, metrics_of, run_setup

VOCAB, SEQ = 32, 16


def qk_names(depth: int, prefix: str = "") -> list[str]:
    return [f"{prefix}blocks.{i}.attn.{p}_proj.weight" for i in range(depth) for p in ("q", "k")]


class QKNormNet(QKNormTransformer):
    """The example module sized for multi-process tests: global batch 16 sequences, contiguous
    slices per data-parallel rank (tensor-parallel peers share theirs), AdamW, LR ×0.1 at the
    milestones (step interval); ``layout`` as in ``tests.setups_common.LAYOUTS``."""

    def __init__(self, steps: int = 12, accumulate: int = 1, milestones: tuple[int, ...] = (), layout: str | None = None,
                 qk_norm: str | None = "rms", **unused) -> None:
        torch.manual_seed(0)
        scheduler = functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=list(milestones), gamma=0.1)
        super().__init__(vocab_size=VOCAB, seq_len=SEQ, dim=32, depth=2, heads=4, mlp_ratio=2, qk_norm=qk_norm,
                         optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
                         scheduler=scheduler if milestones else None, scheduler_interval="step",
                         fully_shard=layout in ("fsdp2", "fsdp2_tp"), tensor_parallel=layout == "fsdp2_tp",
                         hsdp_shard_size=2 if layout == "hsdp" else None)
        self.steps, self.accumulate = steps, accumulate

    def train_dataloader(self):
        tokens = sample_sequences(markov_chain(VOCAB, 3, 0), self.steps * GLOBAL_BATCH, SEQ + 1, 1)
        rank, world = data_parallel_rank(self.trainer)
        per_rank = GLOBAL_BATCH // world
        idx = [i * GLOBAL_BATCH + rank * per_rank + j for i in range(self.steps) for j in range(per_rank)]
        return DataLoader(TensorDataset(tokens[idx]), batch_size=per_rank // self.accumulate, shuffle=False)


@pytest.mark.parametrize("qk_norm", ["rms", "layer"])
def test_detection_finds_exactly_the_q_and_k_projections(qk_norm):
    """Linear → view(heads) → norm over head_dim: q_proj and k_proj; not v, o, MLP, embeddings, head."""
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=VOCAB, seq_len=SEQ, dim=32, depth=2, heads=4, qk_norm=qk_norm)
    tokens = torch.randint(0, VOCAB, (4, SEQ))
    for detect in ("structural", "auto"):
        found = find_scale_invariant(model, tokens, detect=detect)
        assert [c.name for c in found] == qk_names(2), (detect, [c.name for c in found])


def test_plain_attention_has_no_scale_invariant_tensor():
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=VOCAB, seq_len=SEQ, dim=32, depth=2, heads=4, qk_norm=None)
    assert find_scale_invariant(model, torch.randint(0, VOCAB, (4, SEQ)), detect="auto") == []


def test_qk_projections_are_invariant_per_head():
    """Scaling one head's rows of W_q (or W_k) leaves the output unchanged; scaling W_v does not."""
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=VOCAB, seq_len=SEQ, dim=32, depth=1, heads=4, qk_norm="rms").eval()
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        before = model(tokens)
        attn = model.blocks[0].attn
        attn.q_proj.weight[8:16] *= 3.0  # head 1 of q
        attn.k_proj.weight[:8] *= 0.25  # head 0 of k
        scale = before.abs().max()
        assert (model(tokens) - before).abs().max() < 1e-3 * scale  # up to the norms' eps (1e-6 vs ms ~1e-3)
        attn.v_proj.weight[:8] *= 3.0
        assert (model(tokens) - before).abs().max() > 0.1 * scale


def test_qknorm_fit_tracks_q_and_k(tmp_path):
    """A real fit (AdamW, rescale at the LR drop): the callback tracks q/k and logs their Δ_t vs Δ*."""
    trainer, cb = run_setup(tmp_path, "qknorm", steps=12, module_cls=QKNormNet, model_kwargs={"milestones": (8,)},
                            callback_kwargs={"rescale": True})
    assert sorted(cb.candidates) == sorted(qk_names(2, "model."))
    m = metrics_of(tmp_path, "qknorm")
    assert m["smd/rescale_factor"] == pytest.approx({8: 0.1**0.5})  # AdamW's own drop factor k^(-1/2)
    name = "model.blocks.0.attn.q_proj.weight"
    assert sorted(m[f"smd/angular_update/{name}"]) == list(range(4, 12))
    assert not any("v_proj" in k or "o_proj" in k or "mlp" in k for k in m)


# ------------------------------------------------------------------ Hydra configs and the example
def test_qknorm_experiment_trains_and_tracks_q_and_k(tmp_path):
    """``python examples/train.py experiment=qknorm_transformer``, in process, a few steps."""
    from examples.train import train
    from tests.examples_fixtures import TINY, composed, metrics_columns

    overrides = ["experiment=qknorm_transformer", *TINY, "trainer.max_steps=8", "scheduler.milestones=[5]",
                 "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1", "smd.rescale=true",
                 "data.train_sequences=256", "data.val_sequences=32", "smd.figures_dir=null"]
    with composed(overrides, tmp_path) as cfg:
        assert cfg.model.qk_norm == "rms" and cfg.optimizer._target_ == "torch.optim.AdamW"
        result = train(cfg)
    cols = metrics_columns(result["metrics_csv"])
    smd = {c for c in cols if c.startswith("smd/angular_update/")}
    assert smd == {f"smd/angular_update/{n}" for n in qk_names(2, "model.")}
    assert "smd/rescale_factor" in cols and "val/loss" in cols


def test_sharded_strategy_configs(tmp_path):
    from examples.train import build_strategy
    from tests.examples_fixtures import composed

    base = ["experiment=qknorm_transformer", "trainer.devices=4"]
    with composed([*base, "strategy=fsdp2_tp", "strategy.data_parallel_size=2", "strategy.tensor_parallel_size=2"],
                  tmp_path) as cfg:
        assert cfg.model.fully_shard is True and cfg.model.tensor_parallel is True
        strategy = build_strategy(cfg)
        assert type(strategy).__name__ == "ModelParallelStrategy"
        assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 2)
    with composed([*base, "strategy=fsdp2_tp"], tmp_path) as cfg:  # Lightning's auto: TP in a node, DP across
        assert (cfg.strategy.data_parallel_size, cfg.strategy.tensor_parallel_size) == ("auto", "auto")
    with composed([*base, "strategy=hsdp", "trainer.num_nodes=2"], tmp_path) as cfg:
        assert cfg.model.fully_shard is True and cfg.model.hsdp_shard_size == 4  # shard in a node, replicate across
        strategy = build_strategy(cfg)
        assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (8, 1)


@pytest.mark.parametrize("strategy,key", [("fsdp2_tp", "tensor_parallel"), ("hsdp", "hsdp_shard_size")])
def test_sharded_strategy_refuses_models_without_the_option(tmp_path, strategy, key):
    from examples.train import train
    from examples.validate import ConfigError
    from tests.examples_fixtures import TINY, composed

    with composed(["experiment=quickstart", *TINY, f"strategy={strategy}"], tmp_path) as cfg:
        with pytest.raises(ConfigError, match=f"strategy={strategy} sets model.{key}.*ImageClassifier"):
            train(cfg)


@pytest.mark.slow
def test_qknorm_experiment_fsdp2_tp_from_the_command_line(tmp_path):
    """``python examples/train.py experiment=qknorm_transformer strategy=fsdp2_tp``: 2 CPU processes
    (Lightning launches the second), tensor parallel 2 (2 heads per rank)."""
    import subprocess
    import sys

    from tests.examples_fixtures import TRAIN_PY, metrics_columns, subprocess_env

    run = tmp_path / "run"
    cmd = [sys.executable, str(TRAIN_PY), "experiment=qknorm_transformer", "strategy=fsdp2_tp", "trainer.devices=2",
           "trainer.max_steps=8", "scheduler.milestones=[5]", "trainer.val_check_interval=null",
           "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "print_config=false",
           "smd.log_every_n_steps=1", "smd.rescale=true", "smd.figures_dir=null", "data.train_sequences=256",
           f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cols = metrics_columns(run / "version_0" / "metrics.csv")  # the CSV logger writes a fresh version_0
    assert {c for c in cols if c.startswith("smd/angular_update/")} == {
        f"smd/angular_update/{n}" for n in qk_names(2, "model.")}
