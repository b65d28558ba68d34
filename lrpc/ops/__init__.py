"""Built-in op specs, one module per family; :mod:`lrpc.registry` collects them."""

from . import elementwise, linear, normalization, pooling, resize, shape

BUILTIN = [*linear.SPECS, *pooling.SPECS, *resize.SPECS, *elementwise.SPECS, *normalization.SPECS, *shape.SPECS]
ACTIVATIONS = elementwise.ACTIVATIONS
