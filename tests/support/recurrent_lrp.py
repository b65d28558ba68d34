"""LRP for recurrent layers, written from the papers, in numpy (float64): the reference the
recurrent tests check lrpc against.

Arras et al. 2017 ("Explaining Recurrent Neural Network Predictions in Sentiment
Analysis") and 2019 ("Evaluating Recurrent Neural Network Explanations"), and their
reference code's ``lrp_linear``:
- each gate is a constant (signal-take-all in gate × signal products);
- each linear map ``z = W x + U h + b`` shares ``R_z`` by the ε-rule (``x_j w_jk /
  (z_k + ε·sign z_k)``; the bias keeps its share);
- sums of signals (the cell update ``f·c + i·g``) share by their contributions;
- ``tanh`` passes relevance unchanged.

GRU (gates ``z``, ``r`` constants): the candidate's map ``W x + b + r ⊙ (U h + b_h)`` (torch's
``linear_before_reset`` form; or ``W x + b + U (r ⊙ h) + b_h``) shares between ``x`` and ``h``
with ``r`` as a weight. RNN: one linear map per step.

Weights come in torch's layout and gate order (``nn.LSTM``: i, f, g, o; ``nn.GRU``: r, z, n),
one direction at a time: ``W`` ``[G·H, I]``, ``U`` ``[G·H, H]``, biases ``[G·H]``.
"""

from __future__ import annotations

import numpy as np


def linear_lrp(inputs: list[np.ndarray], weights: list[np.ndarray], z: np.ndarray, R: np.ndarray,
               eps: float) -> list[np.ndarray]:
    """``z = Σ_n inputs[n] · weights[n]ᵀ + bias``; relevance ``R`` (shaped like ``z``) shared
    by the ε-rule among every input element (the bias absorbs the rest)."""
    s = R / (z + eps * np.where(z >= 0, 1.0, -1.0))
    return [x * (s @ w) for x, w in zip(inputs, weights)]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class Direction:
    """One direction of one layer: its forward pass over ``x`` ``[T, B, I]`` (rows beyond
    ``lengths`` are not processed: their outputs are 0), kept for the backward pass."""

    def __init__(self, kind: str, W, U, bw, bu, reverse: bool, h0=None, c0=None, lengths=None,
                 linear_before_reset: bool = True):
        self.kind, self.W, self.U, self.bw, self.bu, self.reverse = kind, W, U, bw, bu, reverse
        self.h0, self.c0, self.lengths = h0, c0, lengths
        self.linear_before_reset = linear_before_reset

    def _order(self, T):
        return range(T - 1, -1, -1) if self.reverse else range(T)

    def forward(self, x: np.ndarray) -> np.ndarray:
        T, B, _ = x.shape
        H = self.U.shape[1]
        lengths = np.full(B, T) if self.lengths is None else np.asarray(self.lengths)
        h = np.zeros((B, H)) if self.h0 is None else self.h0.astype(np.float64)
        c = np.zeros((B, H)) if self.c0 is None else self.c0.astype(np.float64)
        self.x, self.steps, ys = x, {}, np.zeros((T, B, H))
        for t in self._order(T):
            inside = (t < lengths)[:, None]
            step = {"h": h, "c": c}
            if self.kind == "LSTM":
                z = x[t] @ self.W.T + h @ self.U.T + self.bw + self.bu
                i, f, g, o = np.split(z, 4, axis=1)
                i, f, g, o = _sigmoid(i), _sigmoid(f), np.tanh(g), _sigmoid(o)
                c_new = f * c + i * g
                h_new = o * np.tanh(c_new)
                step.update(z_g=z[:, 2 * H: 3 * H], i=i, f=f, g=g, c_new=c_new)
            elif self.kind == "GRU":
                zx, zh = x[t] @ self.W.T + self.bw, h @ self.U.T + self.bu
                r = _sigmoid(zx[:, :H] + zh[:, :H])
                u = _sigmoid(zx[:, H: 2 * H] + zh[:, H: 2 * H])
                if self.linear_before_reset:  # torch's form: r ⊙ (h Uₙᵀ + b_h)
                    pre = zx[:, 2 * H:] + r * zh[:, 2 * H:]
                else:  # (r ⊙ h) Uₙᵀ + b_h
                    pre = zx[:, 2 * H:] + (r * h) @ self.U[2 * H:].T + self.bu[2 * H:]
                n = np.tanh(pre)
                h_new = (1 - u) * n + u * h
                step.update(r=r, u=u, n=n, pre=pre, h_new=h_new)
            else:
                pre = x[t] @ self.W.T + h @ self.U.T + self.bw + self.bu
                h_new = np.tanh(pre)
                step.update(pre=pre)
                c_new = c
            step["inside"] = inside
            self.steps[t] = step
            h = np.where(inside, h_new, h)
            if self.kind == "LSTM":
                c = np.where(inside, c_new, c)
            ys[t] = np.where(inside, h_new, 0.0)
        self.h_final = h
        return ys

    def backward(self, R_y: np.ndarray, eps: float, R_h_final=None) -> np.ndarray:
        """Relevance of ``x`` from that of the outputs ``R_y`` ``[T, B, H]`` (and of the final
        state): backwards through time, in the reverse of the processing order."""
        T, B, H = R_y.shape
        R_x = np.zeros_like(self.x)
        R_h = np.zeros((B, H)) if R_h_final is None else R_h_final.copy()  # flowing into h_{t}
        R_c = np.zeros((B, H))
        for t in reversed(list(self._order(T))):
            st, inside = self.steps[t], self.steps[t]["inside"]
            # where the step was skipped, the state passed it unchanged (Where routes it back)
            R_new = np.where(inside, R_h + R_y[t], 0.0)
            R_h = np.where(inside, 0.0, R_h)
            if self.kind == "LSTM":
                R_cn = np.where(inside, R_c + R_new, 0.0)  # h = o·tanh(c): all to the cell
                R_c = np.where(inside, 0.0, R_c)
                fc, ig = st["f"] * st["c"], st["i"] * st["g"]
                stab = st["c_new"] + eps * np.where(st["c_new"] >= 0, 1.0, -1.0)
                R_c = R_c + fc / stab * R_cn
                R_g = ig / stab * R_cn  # through i·g to g, through tanh to its pre-activation
                Wg, Ug = self.W[2 * H: 3 * H], self.U[2 * H: 3 * H]
                z_g = st["z_g"]
                R_xt, R_hp = linear_lrp([self.x[t], st["h"]], [Wg, Ug], z_g, R_g, eps)
            elif self.kind == "GRU":
                stab = st["h_new"] + eps * np.where(st["h_new"] >= 0, 1.0, -1.0)
                R_n = (1 - st["u"]) * st["n"] / stab * R_new
                R_hz = st["u"] * st["h"] / stab * R_new
                # pre = x Wₙᵀ + b + r ⊙ (h Uₙᵀ + b_h): x_j w_jk and r_k · h_j u_jk share pre_k
                s = R_n / (st["pre"] + eps * np.where(st["pre"] >= 0, 1.0, -1.0))
                R_xt = self.x[t] * (s @ self.W[2 * H:])
                if self.linear_before_reset:
                    R_hp = st["h"] * ((s * st["r"]) @ self.U[2 * H:]) + R_hz
                else:  # the gate scales h itself: r_j h_j u_jk shares pre_k
                    R_hp = st["r"] * st["h"] * (s @ self.U[2 * H:]) + R_hz
            else:
                R_xt, R_hp = linear_lrp([self.x[t], st["h"]], [self.W, self.U], st["pre"], R_new, eps)
            R_x[t] = R_xt
            R_h = R_h + R_hp
        return R_x


def stack_lrp(kind: str, layers: list[list[dict]], x: np.ndarray, head_w: np.ndarray, head_b: np.ndarray,
              target: np.ndarray, eps: float, select=None) -> tuple[np.ndarray, np.ndarray]:
    """A stack of (bi)directional layers ``x`` ``[B, T, I]`` → ``Y`` → ``logits = select(Y)
    · head_wᵀ + head_b``, ``select`` flattening ``Y`` ``[B, T, D·H]`` by default. Returns the
    logits and the relevance of ``x`` for ``target`` (the explained logit's relevance 1, as
    lrpc's normalized output relevance)."""
    select = select or (lambda y: y.reshape(len(y), -1))
    seq = np.transpose(x.astype(np.float64), (1, 0, 2))  # [T, B, I]
    directions = []
    for layer in layers:
        dirs = [Direction(kind, **d) for d in layer]
        ys = [d.forward(seq) for d in dirs]
        directions.append(dirs)
        seq = np.concatenate(ys, axis=2)
    y = np.transpose(seq, (1, 0, 2))  # [B, T, D·H]
    features = select(y)
    logits = features @ head_w.T + head_b
    R = np.zeros_like(logits)
    R[np.arange(len(x)), target] = 1.0
    R_features = linear_lrp([features], [head_w], logits, R, eps)[0]
    R_y = _unselect(select, y, R_features)
    R_seq = np.transpose(R_y, (1, 0, 2))  # [T, B, D·H]
    for dirs in reversed(directions):
        H = dirs[0].U.shape[1]
        R_in = sum(d.backward(R_seq[:, :, k * H: (k + 1) * H], eps) for k, d in enumerate(dirs))
        R_seq = R_in
    return logits, np.transpose(R_seq, (1, 0, 2))


def _unselect(select, y, R_features):
    """The relevance of ``y`` for a linear ``select`` (a reshape or a pick): ``R`` routed back
    through the same selection of position indices."""
    index = np.arange(y.size, dtype=np.float64).reshape(y.shape)
    picked = select(index).astype(np.int64)
    out = np.zeros(y.size)
    np.add.at(out, picked.reshape(-1), R_features.reshape(-1))
    return out.reshape(y.shape)


def torch_layers(module, kind: str) -> list[list[dict]]:
    """The weights of ``nn.LSTM``/``nn.GRU``/``nn.RNN``, per layer and direction."""
    layers = []
    for layer in range(module.num_layers):
        dirs = []
        for d, suffix in enumerate(["", "_reverse"][: 2 if module.bidirectional else 1]):
            get = lambda n: getattr(module, f"{n}_l{layer}{suffix}").detach().double().numpy()  # noqa: E731
            dirs.append(dict(W=get("weight_ih"), U=get("weight_hh"), bw=get("bias_ih"), bu=get("bias_hh"),
                             reverse=d == 1))
        layers.append(dirs)
    return layers
