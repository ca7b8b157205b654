"""`lorapipe serve`: what the registry promotes, answered over an OpenAI-compatible HTTP API.

catalog.py  REFs -> the served set (one base, adapters under public names), checked at start-up
engine.py   the model side: one base, adapters loaded/swapped by name, mixed-adapter generation
protocol.py OpenAI request parsing (400/404 errors) and response/stream shapes
app.py      the Ray Serve deployment: FastAPI ingress, dynamic batching, metrics, alias following
launch.py   start (port check, Ray, Serve on 127.0.0.1), Ctrl-C / --stop
vllm.py     the Ray Serve LLM (vLLM multi-LoRA) application config for the same REFs
"""
