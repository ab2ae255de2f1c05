"""Adapters on the input embedding: LoRA (PEFT's lora_embedding_A/B) and trainable token rows, and the tied head.

    LoRA     e(t) = E[t] + scaling · B · A[:, t]                    A [r, vocab], B [dim, r]   (ΔEᵀ = scaling·B·A)
    tokens   e(t) = V[j] if t = indices[j], else E[t]              V [n, dim]: the trained rows themselves
    (both times `embed_scale` for embeddings that scale their output, e.g. Gemma 3's)

`LoRAEmbedding` replaces an `nn.Embedding` and keeps its `weight` (the very Parameter, so state-dict keys
and a tied head's weight are unchanged). A fresh LoRA adapter has A = 0 and B ~ N(0, 1) (PEFT's init for
embeddings); fresh token rows are copies of the rows they replace. Either way the output is unchanged
until training. Token rows follow PEFT's `trainable_token_indices`: values replace rows (they are not
added), so training moves only those rows and the gradient reaches no other.

On a model whose head is tied to the embedding (SmolLM2's is), LoRA on the embedding changes the input
side only (PEFT's default), while trainable token rows change both: `TokenHead` wraps the tied head so
that logits[..., indices[j]] = h · V[j].

Merging swaps in a new weight tensor (E with the change folded in) and keeps the original Parameter
aside; unmerging puts that very object back, so unmerge is exact and a tie is restored as it was. Merged
LoRA on a tied embedding leaves the head on the original weight: the model is then untied, which is
what the unmerged model computes (deltaw.models.export writes such a model untied).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltaw.adapters.lora.layer import AdapterParameters
from deltaw.adapters.state import check_adapter_name


class LoRAEmbedding(nn.Module):
    """An nn.Embedding with named adapters (LoRA or trainable token rows), at most one active at a time.

    Attributes:
        weight: [vocab, dim] the base embedding (the original Parameter), or the merged weight while merged.
        lora_embedding_A: adapter name -> A [r, vocab].   lora_embedding_B: adapter name -> B [dim, r].
        scaling: adapter name -> float.
        token_indices: adapter name -> the token ids whose rows it replaces.
        token_values: adapter name -> V [n, dim], the rows for those ids (in order).
        active: the adapter used in forward, or None.   merged: the adapter folded into `weight`, or None.
    """

    wraps_embedding = True  # deltaw.adapters.targets counts it as the embedding it replaced

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.weight = base.weight
        self.__dict__["base_layer"] = base  # given back by unwrap(); not a submodule (no state-dict keys)
        self.lora_embedding_A = AdapterParameters()
        self.lora_embedding_B = AdapterParameters()
        self.token_values = AdapterParameters()
        self.scaling: dict[str, float] = {}
        self.token_indices: dict[str, list[int]] = {}
        self.active: str | None = None
        self.merged: str | None = None

    # ----------------------------------------------------------------------------- adapters
    def add_lora(self, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Attach LoRA adapter `name`: A [r, vocab], B [dim, r] (taken as given)."""
        check_adapter_name(name)
        rank = lora_a.shape[0]
        if lora_a.shape != (rank, self.num_embeddings) or lora_b.shape != (self.embedding_dim, rank):
            raise ValueError(f"adapter {name!r}: expected lora_embedding_A [{rank}, {self.num_embeddings}] and "
                             f"lora_embedding_B [{self.embedding_dim}, {rank}], found {list(lora_a.shape)} and "
                             f"{list(lora_b.shape)}")
        self.lora_embedding_A[name] = nn.Parameter(lora_a, requires_grad=False)
        self.lora_embedding_B[name] = nn.Parameter(lora_b, requires_grad=False)
        self.scaling[name] = float(scaling)

    def add_tokens(self, name: str, indices: list[int], values: torch.Tensor) -> None:
        """Attach trainable-token adapter `name`: row indices[j] of the embedding becomes values[j] ([n, dim])."""
        check_adapter_name(name)
        if values.shape != (len(indices), self.embedding_dim):
            raise ValueError(f"adapter {name!r}: expected token rows [{len(indices)}, {self.embedding_dim}], "
                             f"found {list(values.shape)}")
        bad = [index for index in indices if not 0 <= index < self.num_embeddings]
        if bad or len(set(indices)) != len(indices):
            raise ValueError(f"adapter {name!r}: token ids must be distinct and in [0, {self.num_embeddings}), "
                             f"found {bad or indices}")
        self.token_indices[name] = [int(index) for index in indices]
        self.token_values[name] = nn.Parameter(values, requires_grad=False)

    def has(self, name: str) -> bool:
        return name in self.lora_embedding_A or name in self.token_indices

    def trainable(self, name: str) -> list[nn.Parameter]:
        """The parameters of adapter `name`."""
        if name in self.token_indices:
            return [self.token_values[name]]
        return [self.lora_embedding_A[name], self.lora_embedding_B[name]]

    def rank(self, name: str) -> int:
        return self.lora_embedding_A[name].shape[0]

    def delete_adapter(self, name: str) -> None:
        if self.merged == name:
            raise RuntimeError(f"adapter {name!r} is merged; call unmerge_adapter(model) before deleting it")
        if name in self.token_indices:
            del self.token_indices[name], self.token_values[name]
        else:
            del self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name]
        if self.active == name:
            self.active = None

    # ----------------------------------------------------------------------------- forward
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [...] token ids -> [..., dim]."""
        y = self.embed(ids, self.weight)
        name = self.active
        if name is None or self.merged is not None:
            return y
        if name in self.token_indices:
            return self._replace_rows(y, ids, name)
        return self._add_lora(y, ids, name)

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base embedding's lookup of `ids` in `weight` [vocab, dim], with its options and scale."""
        base = self.__dict__["base_layer"]
        y = F.embedding(ids, weight, self.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                        base.sparse)
        return self.scaled(y)

    def scaled(self, y: torch.Tensor) -> torch.Tensor:
        """y times the embedding's output scale (Gemma 3's embed_scale), in the weight's dtype; y itself if none."""
        scale = getattr(self.__dict__["base_layer"], "embed_scale", None)
        return y if scale is None else y * scale.to(device=y.device, dtype=self.weight.dtype)

    def _add_lora(self, y: torch.Tensor, ids: torch.Tensor, name: str) -> torch.Tensor:
        """y + scaling · (A[:, ids])ᵀ Bᵀ, as PEFT: F.embedding(ids, Aᵀ) @ Bᵀ · scaling."""
        lora_a, lora_b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        after_a = F.embedding(ids, lora_a.t())  # [..., r]
        if not torch.is_autocast_enabled(ids.device.type):
            after_a = after_a.to(lora_b.dtype)
        delta = self.scaled(after_a @ lora_b.t() * self.scaling[name])
        return (y + delta).to(y.dtype)

    def _replace_rows(self, y: torch.Tensor, ids: torch.Tensor, name: str) -> torch.Tensor:
        """y with every position holding indices[j] replaced by V[j] (in the weight's dtype, then scaled)."""
        indices = torch.tensor(self.token_indices[name], device=ids.device)
        match = ids.unsqueeze(-1) == indices  # [..., n]
        rows = self.token_values[name][match.long().argmax(dim=-1)].to(self.weight.dtype)  # [..., dim]
        return torch.where(match.any(dim=-1, keepdim=True), self.scaled(rows).to(y.dtype), y)

    # ----------------------------------------------------------------------------- merging
    def base_weight(self) -> torch.Tensor:
        """The unmerged embedding [vocab, dim], whether or not an adapter is merged."""
        return self.__dict__.get("_unmerged", self.weight)

    def merged_weight(self, name: str) -> torch.Tensor:
        """The embedding with adapter `name` folded in [vocab, dim] (the base weight's dtype)."""
        base = self.base_weight().detach()
        if name in self.token_indices:
            indices = torch.tensor(self.token_indices[name], device=base.device)
            return base.index_copy(0, indices, self.token_values[name].detach().to(base))
        lora_a, lora_b = self.lora_embedding_A[name].detach(), self.lora_embedding_B[name].detach()
        delta = (lora_b.float() @ lora_a.float()).t()  # [vocab, dim]
        return base.float().add(delta, alpha=self.scaling[name]).to(base.dtype)

    @torch.no_grad()
    def merge_(self, name: str) -> None:
        """weight <- a new tensor holding the merged embedding; the original Parameter is kept for unmerge."""
        if not self.has(name):
            raise KeyError(f"adapter {name!r} is not in this embedding")
        if self.merged == name:
            return
        merged = nn.Parameter(self.merged_weight(name), requires_grad=False)
        self.__dict__["_unmerged"] = self.base_weight()
        self.weight = merged
        self.merged = self.active = name

    @torch.no_grad()
    def unmerge_(self, release_memory: bool = False) -> None:
        """Put the original weight Parameter back (exact; a tied head shares it again)."""
        if self.merged is not None:
            self.weight = self.__dict__.pop("_unmerged")
            self.merged = None

    def unwrap(self) -> nn.Embedding:
        """The original embedding module holding this layer's current weight (merged or not)."""
        base = self.__dict__["base_layer"]
        base.weight = self.weight
        return base

    def extra_repr(self) -> str:
        adapters = {name: self.rank(name) for name in self.lora_embedding_A}
        adapters.update({name: f"{len(rows)} tokens" for name, rows in self.token_indices.items()})
        return (f"{self.num_embeddings}, {self.embedding_dim}, adapters={adapters}, active={self.active}, "
                f"merged={self.merged}")


class TokenHead(nn.Module):
    """An output head tied to the input embedding, following that embedding's trainable token rows:
    logits[..., indices[j]] = h · V[j] while a token adapter is active (PEFT's tied trainable tokens).

    Attributes:
        weight: [vocab, dim] the head's weight (the embedding's Parameter; the merged one while merged).
        embedding: the LoRAEmbedding whose token rows it follows (not a submodule: no duplicate keys).
    """

    wraps_linear = True  # deltaw.adapters.targets and the fingerprint count it as the head it replaced

    def __init__(self, base: nn.Linear, embedding: LoRAEmbedding) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.__dict__["base_layer"] = base
        self.__dict__["embedding"] = embedding
        self.active: str | None = None
        self.merged: str | None = None

    def has(self, name: str) -> bool:
        return name in self.__dict__["embedding"].token_indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> logits [..., vocab]."""
        y = F.linear(x, self.weight, self.bias)
        name, embedding = self.active, self.__dict__["embedding"]
        if name is None or self.merged is not None or name not in embedding.token_indices:
            return y
        indices = torch.tensor(embedding.token_indices[name], device=x.device)
        rows = F.linear(x, embedding.token_values[name].to(self.weight.dtype))  # [..., n]
        return y.index_copy(y.dim() - 1, indices, rows.to(y.dtype))

    def delete_adapter(self, name: str) -> None:
        if self.active == name:
            self.active = None

    def merge_(self, name: str) -> None:
        """Share the embedding's merged weight (the embedding merges first if it has not)."""
        embedding = self.__dict__["embedding"]
        embedding.merge_(name)
        self.weight = embedding.weight
        self.merged = self.active = name

    def unmerge_(self, release_memory: bool = False) -> None:
        """Share the embedding's original weight again."""
        if self.merged is not None:
            self.weight = self.__dict__["embedding"].base_weight()
            self.merged = None

    def unwrap(self) -> nn.Linear:
        base = self.__dict__["base_layer"]
        base.weight = self.weight
        return base

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied token rows"
