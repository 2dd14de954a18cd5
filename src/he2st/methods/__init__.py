"""Expression-prediction methods behind one protocol, registered by name.

See :mod:`he2st.methods.base` for the protocol and registry.
"""

from he2st.methods.base import (
    Capabilities,
    Method,
    create_method,
    get_method_class,
    list_methods,
    load_method,
    register_method,
)

__all__ = [
    "Capabilities",
    "Method",
    "create_method",
    "get_method_class",
    "list_methods",
    "load_method",
    "register_method",
]
