"""An OpenAI-compatible HTTP server with the CLS verdict, and its playground page (docs/serving.md).

`engine` batches requests into the jitted decode loop, `protocol` is the wire format, `render`
turns a decoded row into the API's answer, `app` holds the routes and `__main__` the command line
(`clsalign-serve`, `python -m clsalign_jax.serve`).
"""
