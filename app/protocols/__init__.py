"""The protocol doors: thin adapters from each HTTP API to the one data plane (``app.dataplane``).

``native`` is dropout-serve's own API, ``tfserving`` TensorFlow Serving's REST API, ``v2`` the
Open Inference Protocol (KServe, Triton, MLServer).
"""
