"""``endor-gds serve``: an OpenAI-compatible HTTP server over one streaming model.

:mod:`~endor_gds.serve.engine` batches every request in flight into each forward step (one pass
over the streamed weights serves them all) with transformers' continuous batching;
:mod:`~endor_gds.serve.app` is the FastAPI application. Needs the ``serve`` extra (fastapi, uvicorn).
"""
