"""Built-in op specs, one module per family; :mod:`lrpc.registry` collects them."""

from . import elementwise, linear, normalization, pooling, shape

BUILTIN = [*linear.SPECS, *pooling.SPECS, *elementwise.SPECS, *normalization.SPECS, *shape.SPECS]
ACTIVATIONS = elementwise.ACTIVATIONS
