"""`drex serve`: an OpenAI-compatible HTTP server over the continuous-batching `DrexEngine`.

protocol.py checks request bodies, text.py turns tokens into text, worker.py is the engine thread,
metrics.py the Prometheus collectors, app.py the FastAPI routes and server.py puts them together
(`run_server()` for Python, `drex serve` for the shell). Needs the `serve` extra (fastapi, uvicorn,
prometheus-client).
"""
