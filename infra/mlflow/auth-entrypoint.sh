#!/bin/sh
# Entrypoint of the MLflow server image (Dockerfile): writes the config file of MLflow's
# basic-auth app from the environment, then runs the given command, `mlflow server --app-name
# basic-auth ...`. The file holds the user store's database URI, password included, so it is
# written at start (mode 600, inside the container) and is never in git or in the image.
#
#   MLFLOW_AUTH_DATABASE_URI        where users and permissions live (required; may be the
#                                   tracking database: MLflow keeps its own tables there)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what any signed-in user may do where nothing was granted
#                                   (default READ: everyone can list, eval and serve)
#   MLFLOW_AUTH_ADMIN_USERNAME      the first admin (default admin); MLflow reads it, and
#   MLFLOW_AUTH_ADMIN_PASSWORD      its password, itself, once, when the user store is empty
#   MLFLOW_FLASK_SERVER_SECRET_KEY  read by MLflow: the CSRF key, the same on every replica
#   MLFLOW_AUTH_CACHE_TTL_SECONDS   seconds a worker trusts a checked password (default 0: every
#                                   request pays a PBKDF2 check; a password change or deleted
#                                   user reaches other workers only after this many seconds)
set -eu
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI: the database of MLflow users and permissions}"
MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-auth/basic_auth.ini}"
export MLFLOW_AUTH_CONFIG_PATH
umask 077
mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-0}
INI
exec "$@"
