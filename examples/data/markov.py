"""Synthetic token sequences from a fixed random Markov chain: a language-modelling task that needs
no download and has a known loss floor (the chain's entropy rate)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def markov_chain(vocab_size: int, branching: int, seed: int) -> torch.Tensor:
    """A ``[V, V]`` row-stochastic matrix: every token has ``branching`` successors (random
    tokens, Dirichlet(1) probabilities)."""
    gen = torch.Generator().manual_seed(seed)
    transition = torch.zeros(vocab_size, vocab_size)
    for token in range(vocab_size):
        successors = torch.randperm(vocab_size, generator=gen)[:branching]
        weights = -torch.log(torch.rand(branching, generator=gen))  # Dirichlet(1, ..., 1) up to scale
        transition[token, successors] = weights / weights.sum()
    return transition


def sample_sequences(transition: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` sequences of ``length`` tokens (uniform first token), ``[count, length]`` int64."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.empty(count, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, transition.shape[0], (count,), generator=gen)
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(transition[tokens[:, t - 1]], 1, generator=gen).squeeze(1)
    return tokens


def entropy_rate(transition: torch.Tensor) -> float:
    """Mean next-token entropy (nats) under the uniform start, a lower bound of the loss."""
    p = transition.double()
    h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
    return float(h.mean())


class MarkovSequenceDataModule(pl.LightningDataModule):
    """Batches of ``[B, seq_len + 1]`` token sequences (inputs ``[:, :-1]``, targets ``[:, 1:]``).

    Args:
        vocab_size: number of tokens.
        seq_len: tokens the model sees per sequence.
        branching: successors per token (lower: a more predictable chain).
        train_sequences, val_sequences: dataset sizes (kept in memory: 8 bytes per token).
        batch_size: per-process batch size.
        seed: the chain and the samples.
    """

    def __init__(self, vocab_size: int = 64, seq_len: int = 32, branching: int = 4, train_sequences: int = 4096,
                 val_sequences: int = 256, batch_size: int = 32, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if branching < 1 or branching > vocab_size:
            raise ValueError(f"data.branching must be in [1, vocab_size={vocab_size}], got {branching}")
        self.vocab_size, self.seq_len, self.branching = vocab_size, seq_len, branching
        self.train_sequences, self.val_sequences = train_sequences, val_sequences
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.transition = markov_chain(vocab_size, branching, seed)

    @property
    def loss_floor(self) -> float:
        return entropy_rate(self.transition)

    def check(self, world_size: int = 1) -> None:
        """The batch size must leave at least one training batch (the loader drops the last one)."""
        from examples.data.common import check_batches

        check_batches(self.train_sequences, self.batch_size, world_size, "the generated sequences (data.train_sequences)")

    def setup(self, stage: str | None = None) -> None:
        self.train = TensorDataset(sample_sequences(self.transition, self.train_sequences, self.seq_len + 1, self.seed + 1))
        self.val = TensorDataset(sample_sequences(self.transition, self.val_sequences, self.seq_len + 1, self.seed + 2))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
