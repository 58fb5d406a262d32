"""A small decoder-only transformer with QK-norm attention, for next-token prediction.

QK-norm (OLMo 2, Qwen 3, Gemma 3, ViT-22B): RMSNorm (or LayerNorm) over ``head_dim`` applied to
every head of q and k before the dot product. Head ``h`` of q is ``W_q[h] x``, so RMSNorm makes the
logits invariant to the scale of the rows ``W_q[h]`` (per head, and so of ``W_q`` as a whole); the
same holds for ``W_k``. ``W_v``, ``W_o``, the MLP, the embeddings and the head are not scale-
invariant: their outputs enter the residual stream at their own scale. SMDCallback should find
exactly the q and k projection weights (``model.blocks.{i}.attn.q_proj.weight``, ``k_proj``).

Sharding (``ModelParallelStrategy``, ``configure_model``):

* ``tensor_parallel=True``: per block, q/k/v and the MLP's first linear column-wise (weights
  ``Shard(0)``: whole heads per rank), the output projection and the MLP's second linear row-wise
  (``Shard(1)``), over ``device_mesh["tensor_parallel"]`` (Megatron layout); the q/k norms,
  which see only the rank's heads, get their gradients summed over those ranks;
* ``fully_shard=True``: FSDP2 ``fully_shard`` of each block, then of the model, over
  ``device_mesh["data_parallel"]`` (with TP: 2-D DTensors);
* ``hsdp_shard_size=n``: HSDP instead, ``fully_shard(..., mesh=(replicate, shard))`` with shards
  in groups of ``n`` ranks (e.g. one node) and replicas across the groups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from examples.modules.optim import ConfiguredOptimizerModule

__all__ = ["QKNormAttention", "QKNormTransformer", "TransformerLM"]


def _norm(kind: str | None, dim: int) -> nn.Module:
    if kind in (None, "none"):
        return nn.Identity()
    if kind == "rms":
        return nn.RMSNorm(dim, eps=1e-6)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=1e-6)
    raise ValueError(f"qk_norm must be 'rms', 'layer' or null, got {kind!r}")


class QKNormAttention(nn.Module):
    """Causal multi-head self-attention, q and k normalized per head over ``head_dim``.

    The head count is read from the projections' local output width, so the same forward runs
    on a tensor-parallel shard holding ``heads / tp`` whole heads.
    """

    def __init__(self, dim: int, heads: int, qk_norm: str | None = "rms") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = _norm(qk_norm, self.head_dim)
        self.k_norm = _norm(qk_norm, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, qk_norm: str | None) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.attn = QKNormAttention(dim, heads, qk_norm)
        self.mlp_norm = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TransformerLM(nn.Module):
    """Token + learned position embeddings, ``depth`` blocks, final RMSNorm, untied head."""

    def __init__(self, vocab_size: int = 64, seq_len: int = 32, dim: int = 64, depth: int = 2, heads: int = 4,
                 mlp_ratio: int = 4, qk_norm: str | None = "rms") -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def block_tp_plan(qk_norm: bool = True) -> dict[str, Any]:
    """The tensor-parallel plan of one block (Megatron: column-wise in, row-wise out).

    The q/k norms see only the rank's own heads, so their (replicated) weights need the gradient
    summed over the tensor-parallel ranks: ``SequenceParallel(sequence_dim=2)`` makes them
    ``Replicate`` DTensors applied to the heads dimension as ``Shard(2)`` (torchtitan's Qwen 3 plan).
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    plan: dict[str, Any] = {
        "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(),
        "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(),
    }
    if qk_norm:
        plan["attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def shard_transformer(model: TransformerLM, device_mesh: Any, fully_shard: bool = True, tensor_parallel: bool = False,
                      hsdp_shard_size: int | None = None) -> None:
    """Apply TP (``parallelize_module``) and then FSDP2 / HSDP (``fully_shard``) to ``model``."""
    from torch.distributed.fsdp import fully_shard as shard

    if tensor_parallel:
        from torch.distributed.tensor.parallel import parallelize_module

        tp = device_mesh["tensor_parallel"]
        heads = model.blocks[0].attn.q_proj.out_features // model.blocks[0].attn.head_dim
        if heads % tp.size():
            raise ValueError(f"tensor_parallel_size={tp.size()} must divide the number of heads ({heads})")
        for block in model.blocks:
            parallelize_module(block, tp, block_tp_plan(qk_norm=not isinstance(block.attn.q_norm, nn.Identity)))
    if not (fully_shard or hsdp_shard_size):
        return
    mesh = device_mesh["data_parallel"] if device_mesh is not None else None
    if hsdp_shard_size:
        from torch.distributed.device_mesh import init_device_mesh

        if tensor_parallel:
            raise ValueError("hsdp_shard_size with tensor_parallel is not supported by this example")
        world = torch.distributed.get_world_size()
        if world % hsdp_shard_size:
            raise ValueError(f"hsdp_shard_size={hsdp_shard_size} must divide the world size ({world})")
        device = device_mesh.device_type if device_mesh is not None else "cpu"
        mesh = init_device_mesh(device, (world // hsdp_shard_size, hsdp_shard_size),
                                mesh_dim_names=("replicate", "shard"))
    for block in model.blocks:
        shard(block, mesh=mesh)
    shard(model, mesh=mesh)


class QKNormTransformer(ConfiguredOptimizerModule):
    """Next-token cross-entropy of a :class:`TransformerLM` on ``[B, T + 1]`` token batches.

    Args:
        vocab_size, seq_len, dim, depth, heads, mlp_ratio: the network (``seq_len`` tokens in).
        qk_norm: ``"rms"`` (RMSNorm over ``head_dim``), ``"layer"`` (LayerNorm) or ``None`` (plain
            attention: nothing is scale-invariant then).
        fully_shard, tensor_parallel, hsdp_shard_size: sharding in ``configure_model`` under
            ``ModelParallelStrategy`` (set by ``strategy=fsdp2`` / ``fsdp2_tp`` / ``hsdp``).
        optimizer, scheduler, scheduler_interval, norm_weight_decay, bias_weight_decay:
            see :class:`~examples.modules.optim.ConfiguredOptimizerModule`.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        seq_len: int = 32,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        qk_norm: str | None = "rms",
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        norm_weight_decay: float | None = None,
        bias_weight_decay: float | None = None,
        fully_shard: bool = False,
        tensor_parallel: bool = False,
        hsdp_shard_size: int | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval, norm_weight_decay, bias_weight_decay)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = TransformerLM(vocab_size, seq_len, dim, depth, heads, mlp_ratio, qk_norm)
        self.fully_shard, self.tensor_parallel, self.hsdp_shard_size = fully_shard, tensor_parallel, hsdp_shard_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def optimized_module(self) -> nn.Module:
        return self.model

    def configure_model(self) -> None:
        if not (self.fully_shard or self.tensor_parallel or self.hsdp_shard_size):
            return
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return  # one process: nothing to shard
        shard_transformer(self.model, self.device_mesh, self.fully_shard, self.tensor_parallel, self.hsdp_shard_size)

    def _loss(self, batch: Any) -> torch.Tensor:
        tokens = batch[0] if isinstance(batch, (list, tuple)) else batch
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, sync_dist=True)
