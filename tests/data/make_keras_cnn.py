"""Build the small Keras CNN under tests/data/ and export it to ONNX with tf2onnx.

The test suite does not run this script: TensorFlow is far too heavy for it. It only
reads the files written here, next to this script:

    keras_cnn.onnx                 the model (channels-last input [N, 16, 16, 3], dynamic N)
    keras_cnn_input.npy            a batch of 2 inputs, float32
    keras_cnn_reference.npy        Keras' own output (softmax probabilities) on that batch
    keras_cnn_nobias.onnx          the same architecture and weights with every bias zero
                                   (Conv/Dense biases, BatchNormalization beta and moving mean)
    keras_cnn_nobias_reference.npy Keras' output of that model on the same batch
    keras_cnn_nobias_logits.npy    its logits (the input of the softmax)
    keras_cnn_nobias_gradient_x_input.npy
                                   input * d(logit of the arg-max class)/d(input), from
                                   TensorFlow's autodiff. Without biases the network is
                                   piecewise linear and positively homogeneous, so LRP-0
                                   (EpsilonRule with a tiny epsilon on every layer, started
                                   from the logit itself) must reproduce it exactly.

What tf2onnx writes: NHWC -> NCHW Transpose at the input, Conv with explicit pads
(asymmetric [0, 0, 1, 1] for the stride-2 'same' convolution), BatchNormalization as
Mul + Add after the first Conv (folded into the Conv weights when the biases are zero),
Relu, MaxPool, a Transpose back to NHWC before Flatten, Flatten as Reshape whose target
shape is computed from the dynamic batch size (Shape -> Gather -> Cast -> Slice -> Concat
-> Cast), MatMul + Add for the Dense layers, Softmax.

The weights are random but seeded; nothing is trained. To regenerate (in a separate
virtual environment, CPU only):

    python3.11 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0
    /tmp/tfvenv/bin/python tests/data/make_keras_cnn.py

Versions that produced the committed files: Python 3.11.7, tensorflow-cpu 2.21.0,
keras 3.15.1, tf2onnx 1.17.0, onnx 1.23.2, protobuf 7.36.2, numpy 2.4.6.
ONNX opset 17. Rerunning gives the same arrays and the same graph; tf2onnx's counters
for a few generated node names may differ between runs.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import onnx
import tensorflow as tf
import tf2onnx

HERE = Path(__file__).resolve().parent
OPSET = 17
SEED = 0


def build(zero_bias: bool) -> keras.Model:
    """Conv('same') + BatchNorm + ReLU, MaxPool, Conv('valid'), Conv('same', stride 2),
    Flatten, Dense + ReLU, Dense, softmax."""
    keras.utils.set_random_seed(SEED)
    layers = keras.layers
    inp = keras.Input((16, 16, 3), name="input")
    x = layers.Conv2D(8, 3, padding="same", name="conv1")(inp)
    x = layers.BatchNormalization(epsilon=1e-3, name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 3, padding="valid", activation="relu", name="conv2")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(32, activation="relu", name="fc1")(x)
    logits = layers.Dense(10, name="fc2")(x)
    out = layers.Softmax(name="probabilities")(logits)
    model = keras.Model(inp, out, name="keras_cnn")

    # Seeded random parameters everywhere, biases and BatchNorm statistics included, so
    # that no parameter sits at its trivial initial value.
    rng = np.random.default_rng(SEED)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = weights
            gamma = rng.uniform(0.5, 1.5, gamma.shape)
            beta = rng.normal(0.0, 0.2, beta.shape)
            mean = rng.normal(0.0, 0.2, mean.shape)
            var = rng.uniform(0.5, 2.0, var.shape)
            if zero_bias:
                beta, mean = np.zeros_like(beta), np.zeros_like(mean)
            new = [gamma, beta, mean, var]
        else:
            kernel, bias = weights
            fan_in = int(np.prod(kernel.shape[:-1]))
            kernel = rng.normal(0.0, np.sqrt(2.0 / fan_in), kernel.shape)
            bias = np.zeros_like(bias) if zero_bias else rng.normal(0.0, 0.1, bias.shape)
            new = [kernel, bias]
        layer.set_weights([w.astype(np.float32) for w in new])
    return model


def export(model: keras.Model, path: Path) -> onnx.ModelProto:
    spec = [tf.TensorSpec([None, 16, 16, 3], tf.float32, name="input")]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return proto


def main() -> None:
    x = np.random.default_rng(SEED + 1).normal(0.0, 1.0, (2, 16, 16, 3)).astype(np.float32)
    np.save(HERE / "keras_cnn_input.npy", x)
    for zero_bias, stem in ((False, "keras_cnn"), (True, "keras_cnn_nobias")):
        model = build(zero_bias)
        reference = np.asarray(model(x, training=False), dtype=np.float32)
        np.save(HERE / f"{stem}_reference.npy", reference)
        proto = export(model, HERE / f"{stem}.onnx")
        if zero_bias:
            logit_model = keras.Model(model.input, model.get_layer("fc2").output)
            xt = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                logits = logit_model(xt, training=False)
                chosen = tf.reduce_sum(logits * tf.one_hot(tf.argmax(logits, axis=1), logits.shape[1]), axis=1)
            gradient = tape.gradient(chosen, xt)
            np.save(HERE / f"{stem}_logits.npy", np.asarray(logits, dtype=np.float32))
            np.save(HERE / f"{stem}_gradient_x_input.npy", (x * np.asarray(gradient)).astype(np.float32))
        ops = sorted({node.op_type for node in proto.graph.node})
        size = (HERE / f"{stem}.onnx").stat().st_size
        print(f"{stem}.onnx: {size} bytes, IR {proto.ir_version}, ops {ops}")


if __name__ == "__main__":
    main()
