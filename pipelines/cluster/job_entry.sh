#!/bin/sh
# The entry point of every `lorapipe submit` job: `python -m pipelines.cli ARGS` with a Python that
# has lorapipe's dependencies, whatever PATH says on the cluster. A head started as
# `.venv/bin/ray start --head` (venv not activated) has neither `lorapipe` nor the venv's `python`
# on PATH, but the job supervisor that starts this script is a Ray worker of the cluster's own
# environment: the `ray/_raylet.so` it has loaded names that environment's site-packages.
# Order: $LORAPIPE_PYTHON, the supervisor's environment, python3, python.
need="ray torch transformers peft deepspeed mlflow pydantic datasets"
raylet=$(grep -o '/[^ ]*/lib/python[0-9.]*/site-packages/ray/_raylet[^ ]*\.so' "/proc/$PPID/maps" 2>/dev/null | head -n 1)
cluster_python=${raylet%/lib/python*}/bin/python
[ -n "$raylet" ] || cluster_python=""
tried=""
for py in "$LORAPIPE_PYTHON" "$cluster_python" python3 python; do
  [ -n "$py" ] || continue
  if ! command -v "$py" >/dev/null 2>&1; then
    tried="$tried $py (not found)"
    continue
  fi
  missing=$("$py" -c "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))" $need 2>/dev/null) || missing="(python failed)"
  if [ -z "$missing" ]; then
    exec "$py" -m pipelines.cli "$@"
  fi
  tried="$tried $py (lacks $missing)"
done
echo "lorapipe: error: no Python on this cluster node has lorapipe's dependencies; tried:$tried. Install the project into the cluster's environment (pip install -e . there, or use the training image) or set LORAPIPE_PYTHON with --env" >&2
exit 2
