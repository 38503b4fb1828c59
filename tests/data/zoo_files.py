"""Small files in the real zoo formats, written by the tests themselves."""

import numpy as np

from graphspace.data.small_cnn_zoo import small_cnn_layout, write_small_cnn_zoo


def keras_small_cnn_forward(row, layout, x_nhwc, activation="relu"):
    """Reference forward pass of a Small CNN Zoo network in TensorFlow conventions (NHWC inputs,
    HWIO kernels, ``valid`` stride-2 convolutions, dense kernels ``(in, out)``), in NumPy."""
    act = {"relu": lambda t: np.maximum(t, 0), "tanh": np.tanh}[activation]
    var = {r.varname: np.asarray(row[r.start:r.end], dtype=np.float64).reshape(r.shape)
           for r in layout}
    h = np.asarray(x_nhwc, dtype=np.float64)
    for name in ("conv2d", "conv2d_1", "conv2d_2"):
        k = var[f"sequential/{name}/kernel:0"]  # (3, 3, in, out)
        b = var[f"sequential/{name}/bias:0"]
        n, hh, ww, _ = h.shape
        ho, wo = (hh - 3) // 2 + 1, (ww - 3) // 2 + 1
        out = np.zeros((n, ho, wo, k.shape[3]))
        for i in range(ho):
            for j in range(wo):
                patch = h[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]  # (n, 3, 3, in)
                out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, k) + b
        h = act(out)
    h = h.mean(axis=(1, 2))
    return h @ var["sequential/dense/kernel:0"] + var["sequential/dense/bias:0"]


def make_small_cnn_zoo(raw_dir, n_runs=20, steps=(0, 1, 86), seed=0, nan_rows=(),
                       split=True, activations=("relu", "tanh")):
    """A zoo in the published format: random TF-layout weights, metrics with the published
    columns, layout.csv and an NFN-style permutation file (leading ``0``)."""
    rng = np.random.default_rng(seed)
    layout = small_cnn_layout()
    n = n_runs * len(steps)
    rows = (rng.normal(size=(n, 4970)) * 0.3).astype(np.float32)
    for r in nan_rows:
        rows[r, 5] = np.nan
    run = np.repeat(np.arange(n_runs), len(steps))
    step = np.tile(np.asarray(steps), n_runs)
    metrics = {
        "config.activation": [activations[i % len(activations)] for i in run],
        "config.b_init": ["zeros"] * n,
        "config.dataset": ["mnist"] * n,
        "config.dnn_architecture": ["cnn"] * n,
        "config.dropout": [float(rng.uniform(0, 0.7)) for _ in range(n)],
        "config.epochs": [int(max(steps))] * n,
        "config.init_std": [0.05] * n,
        "config.learning_rate": [0.01] * n,
        "config.optimizer": ["adam"] * n,
        "config.train_fraction": [1.0] * n,
        "config.w_init": ["he_normal"] * n,
        "modeldir": [f"/tmp/run{i}" for i in run],
        "step": [int(s) for s in step],
        "test_accuracy": [float(v) for v in rng.uniform(size=n)],
        "test_loss": [float(v) for v in rng.uniform(size=n)],
        "train_accuracy": [float(v) for v in rng.uniform(size=n)],
        "train_loss": [float(v) for v in rng.uniform(size=n)],
    }
    perm = rng.permutation(n) if split else None
    write_small_cnn_zoo(raw_dir, rows, metrics, layout, perm)
    return rows, metrics, layout, perm
