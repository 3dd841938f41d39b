"""Names every layer shares: the federated methods and the held-out accuracy metric.

The method list lives here once: the config validates `federation.method`
against it, the server maps a method to the strategy that aggregates it, the
report orders and labels methods by it, and the CLI's defaults come from it.
Plain Python with no imports, so the config, the GRPO core and the
torch-free server can all read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One way to train: `strategy` aggregates it; `weighted`: it reports per-client weights and gains;
    `server_lr`: `federation.server_lr` scales its aggregate step (FGRPO and FedOpt have their own);
    `personal`: each owner keeps its own LoRA B matrices, uploads A only (FedSA-LoRA);
    `mixed_ranks`: its aggregate is a weighted average of the uploads (or none), so owners may train different
    LoRA ranks (federation/hetlora.py); FedOpt's and FedAvgM's server state is not, and refuses them."""

    name: str
    strategy: str
    weighted: bool = False
    compared_by_default: bool = True
    server_lr: bool = False
    mixed_ranks: bool = False
    personal: bool = False  # clients upload LoRA A only and keep their B (FedSA-LoRA); evaluated per owner


REGISTRY: tuple[Method, ...] = (
    Method("fgrpo", "fgrpo", weighted=True, mixed_ranks=True),
    Method("fedavg", "fedavg", server_lr=True, mixed_ranks=True),
    Method("fedprox", "fedprox", server_lr=True, mixed_ranks=True),
    Method("fedadam", "fedadam"),
    Method("fedyogi", "fedyogi", compared_by_default=False),
    Method("fedadagrad", "fedadagrad", compared_by_default=False),
    Method("fedavgm", "fedavgm", compared_by_default=False, server_lr=True),
    Method("reward_weighted", "reward_weighted", weighted=True, server_lr=True, mixed_ranks=True),
    # Personalized: FedAvg over the LoRA A matrices, each owner's B stays on its node (federation/fedsa.py).
    Method("fedsa", "fedavg", compared_by_default=False, server_lr=True, personal=True),
    # Run modes of the same code rather than strategies: pooled data on one client, or no aggregation.
    Method("centralized", "fedavg"),  # one pooled client at model.lora.rank: owners' lora_rank do not apply
    Method("local", "fedavg", mixed_ranks=True),
)
METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY)
BY_NAME: dict[str, Method] = {m.name: m for m in REGISTRY}
# `fgrpo compare`'s default: every method but the extra FedOpt variants.
COMPARED_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.compared_by_default)
WEIGHTED_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.weighted)
SERVER_LR_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.server_lr)
MIXED_RANK_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.mixed_ranks)
PERSONAL_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.personal)

# Greedy accuracy on held-out prompts: one name end to end. The GRPO core logs
# `eval/acc_heldout`, a client sends `acc_heldout`, the server logs
# `client/acc_heldout` and `global/acc_heldout`, a summary has
# `initial/acc_heldout` and `final/acc_heldout`.
ACC_HELDOUT = "acc_heldout"
