"""Reference infrastructure for the test-suite.

* :mod:`support.zoo` -- small seeded torch models (ReLU networks) and inputs.
* :mod:`support.export` -- ONNX export with the legacy (TorchScript) and the dynamo exporter.
* :mod:`support.zennit_ref` -- reference LRP relevances computed with Zennit.
"""
