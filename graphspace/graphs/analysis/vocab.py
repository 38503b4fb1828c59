"""Vocabularies stored in parameter graphs as integer ids (stable: append only)."""

from __future__ import annotations

NODE_TYPES: tuple[str, ...] = (
    "input",
    "linear",
    "conv",
    "norm",
    "embedding",
    "residual",
    "product",
    "attn_q",
    "attn_k",
    "attn_v",
    "custom",
    "free",
    "recurrent",
)
EDGE_TYPES: tuple[str, ...] = (
    "linear",
    "conv",
    "norm",
    "embedding",
    "attn_in",
    "residual",
    "product",
    "attn_qk",
    "custom",
    "free",
    "recurrent",
)
ACTIVATIONS: tuple[str, ...] = (
    "identity",
    "relu",
    "leaky_relu",
    "gelu",
    "silu",
    "tanh",
    "sigmoid",
    "sin",
    "cos",
    "elu",
    "selu",
    "celu",
    "softplus",
    "relu6",
    "hardtanh",
    "hardswish",
    "hardsigmoid",
    "mish",
    "softsign",
    "logsigmoid",
    "softmax",
    "other",
)
NODE_TYPE = {n: i for i, n in enumerate(NODE_TYPES)}
EDGE_TYPE = {n: i for i, n in enumerate(EDGE_TYPES)}
ACTIVATION = {n: i for i, n in enumerate(ACTIVATIONS)}

#: activations with $\sigma(s x) = s \sigma(x)$ for $s > 0$
POSITIVE_HOMOGENEOUS = frozenset({"relu", "leaky_relu", "identity"})
#: activations with $\sigma(-x) = -\sigma(x)$
ODD = frozenset({"tanh", "sin", "softsign", "identity"})
