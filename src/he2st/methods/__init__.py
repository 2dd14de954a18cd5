"""Expression-prediction methods behind one protocol, registered by name.

- :mod:`he2st.methods.base`: the :class:`Method` protocol and :class:`Capabilities`.
- :mod:`he2st.methods.registry`: ``@register_method``, discovery of the built-ins
  and of other packages' methods (entry-point group ``he2st.methods``).
- :mod:`he2st.methods.families`: the shared machinery of each family
  (spot, slide, contrastive).
- :mod:`he2st.methods.nn`: layers, losses, likelihoods and the training loop.
- One module per paper (``stnet``, ``hist2st``, ``bleep``, ...), plus the
  baselines (``mean``, ``ridge``, ``knn``) and the ``ensemble``.
"""

from he2st.methods.base import Capabilities, Method
from he2st.methods.registry import (
    create_method,
    get_method_class,
    list_methods,
    load_method,
    method_info,
    register_method,
)

__all__ = [
    "Capabilities",
    "Method",
    "create_method",
    "get_method_class",
    "list_methods",
    "load_method",
    "method_info",
    "register_method",
]
