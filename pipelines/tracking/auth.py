"""Who lorapipe is on an MLflow server with authentication, and what that identity may do.

MLflow's basic-auth app (`mlflow server --app-name basic-auth`) checks every request against the
caller's permission on the experiment or registered model it touches (READ < USE < EDIT < MANAGE).
lorapipe sends the credentials MLflow's client reads from the environment
(MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN), asks the server
who it is (audit tags name that identity, not the local login) and what it may do, before it
writes anything: a refused action is one line naming the missing permission, with nothing done.

MLflow lets EDIT move any alias of a registered model. lorapipe adds one rule on top: a protected
alias (`champion`, plus those recorded in the model's `lorapipe.protected_aliases` tag) moves only
for an identity with MANAGE on that registered model. The server does not enforce that rule; a
user with EDIT who calls MLflow directly can still move `champion`.
"""
from __future__ import annotations

import getpass
import re
from dataclasses import dataclass
from typing import Iterable, Optional

from pipelines.core.errors import UserError
from pipelines.core.secrets import redact_uri

RANK = {"DENY": -1, "NO_PERMISSIONS": 0, "READ": 1, "USE": 2, "EDIT": 3, "MANAGE": 4}
ALWAYS_PROTECTED = ("champion",)  # the promotion gate's alias
PROTECTED_TAG = "lorapipe.protected_aliases"
CURRENT_USER = "/api/2.0/mlflow/users/current"
USER_PERMISSION = "/api/3.0/mlflow/users/permissions/get"
CREDENTIAL_VARS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"


class AccessDenied(UserError):
    """The server (or lorapipe's alias rule) refuses this identity an action; names the permission."""


@dataclass(frozen=True)
class Identity:
    name: str
    authenticated: bool  # False: the server checks no credentials (or there is no server)
    is_admin: bool = False

    @property
    def audit_name(self) -> str:
        """What audit tags record: the server's user name, or the local login marked as unchecked."""
        return self.name if self.authenticated else f"{self.name} (unauthenticated)"


def local_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (some containers)
        return "unknown"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _get(uri: str, endpoint: str, params: Optional[dict] = None):
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(get_default_host_creds(uri), endpoint, "GET", params=params, max_retries=1)


def credentials_error(uri: Optional[str] = None) -> UserError:
    """One line for a 401: no credentials sent, or the server did not accept them."""
    from mlflow.environment_variables import MLFLOW_TRACKING_TOKEN
    from mlflow.utils.credentials import read_mlflow_creds

    where = f"MLflow at {redact_uri(uri)}" if uri else "MLflow"
    creds = read_mlflow_creds()
    if creds.username and creds.password:
        return UserError(f"{where} rejected the credentials of user {creds.username!r} "
                         "(MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD): wrong password or no such user")
    if MLFLOW_TRACKING_TOKEN.get():
        return UserError(f"{where} rejected MLFLOW_TRACKING_TOKEN (expired or unknown token)")
    return UserError(f"{where} requires authentication: set {CREDENTIAL_VARS} in the environment")


def current_identity(uri: str) -> Identity:
    """The user the tracking server authenticated this process as; the local login, marked as
    unauthenticated, for a server without the auth app or a local store."""
    if not is_server(uri):
        return Identity(local_user(), authenticated=False)
    resp = _get(uri, CURRENT_USER)
    if resp.status_code == 401:
        raise credentials_error(uri)
    try:
        user = resp.json()["user"] if resp.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        user = None
    if not user:  # 404: the server runs without authentication and knows no users
        return Identity(local_user(), authenticated=False)
    return Identity(user["username"], authenticated=True, is_admin=bool(user.get("is_admin")))


def permission(uri: str, who: Identity, resource_type: str, resource_id: str) -> str:
    """The permission the server resolves for `who` on one experiment (by id) or registered model
    (by name), as its own authorization check would: READ, EDIT, MANAGE, ..."""
    if not who.authenticated or who.is_admin:
        return "MANAGE"  # no checks at all, or an admin: every request passes
    resp = _get(uri, USER_PERMISSION, {"username": who.name, "resource_type": resource_type, "resource_id": resource_id})
    if resp.status_code == 401:
        raise credentials_error(uri)
    if resp.status_code != 200:
        raise UserError(f"MLflow at {redact_uri(uri)} did not say what {who.name!r} may do on {resource_type} "
                        f"{resource_id!r} (HTTP {resp.status_code})")
    return resp.json()["permission"]


def require(uri: str, who: Identity, resource: tuple[str, str, str], needed: str, action: str) -> None:
    """AccessDenied unless `who` holds `needed` on resource = (type, id, label for the message)."""
    resource_type, resource_id, label = resource
    have = permission(uri, who, resource_type, resource_id)
    if RANK.get(have, 0) < RANK[needed]:
        raise AccessDenied(f"{action} needs {needed} permission on {label}; MLflow user {who.name!r} has {have}")


def _tagged_aliases(rm) -> set[str]:
    return {a.strip() for a in (rm.tags or {}).get(PROTECTED_TAG, "").split(",") if a.strip()}


def protected_aliases(c, name: str) -> set[str]:
    """Aliases of registered model `name` that only a MANAGE identity may move (lorapipe's rule)."""
    return set(ALWAYS_PROTECTED) | _tagged_aliases(c.get_registered_model(name))


def authorize_alias_move(uri: str, c, name: str, alias: str) -> Identity:
    """The identity moving `name@alias`, after checking it may: EDIT for an ordinary alias (what
    MLflow itself requires), MANAGE for a protected one. Call before any write."""
    who = current_identity(uri)
    needed = "MANAGE" if alias in protected_aliases(c, name) else "EDIT"
    why = " (a protected alias: lorapipe's rule)" if needed == "MANAGE" else ""
    require(uri, who, ("registered_model", name, f"registered model {name!r}{why}"), needed, f"moving {name}@{alias}")
    return who


def authorize_registration(uri: str, c, experiment: str, model_names: Iterable[str]) -> Identity:
    """Check before uploading anything that `register` can finish: EDIT on the experiment its run
    goes into and on each registered model that exists already (new ones are created, and MLflow
    makes their creator MANAGE)."""
    from mlflow.exceptions import MlflowException

    who = current_identity(uri)
    if not who.authenticated:
        return who
    exp = c.get_experiment_by_name(experiment)
    if exp is not None:
        require(uri, who, ("experiment", exp.experiment_id, f"experiment {experiment!r}"), "EDIT", "registering")
    for name in model_names:
        try:
            c.get_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            continue
        require(uri, who, ("registered_model", name, f"registered model {name!r}"), "EDIT", "registering")
    return who


def record_protected_aliases(c, name: str, aliases: Iterable[str]) -> None:
    """Add `aliases` (registry.protected_aliases) to the model's protected-alias tag; never removes
    one, so a later registration cannot unprotect what an earlier one protected."""
    have = _tagged_aliases(c.get_registered_model(name))
    want = have | {a for a in aliases if a}
    if want != have:
        c.set_registered_model_tag(name, PROTECTED_TAG, ",".join(sorted(want)))


# What a refused REST endpoint needed, for the message when a request was refused without a
# preflight check (first match wins).
ENDPOINT_NEEDS = (
    ("registered-models/alias", "EDIT permission on the registered model (MANAGE to delete an alias)"),
    ("registered-models/create", "permission to create registered models"),
    ("model-versions/create", "EDIT permission on the registered model"),
    ("registered-models/set-tag", "EDIT permission on the registered model"),
    ("model-versions/set-tag", "EDIT permission on the registered model"),
    ("registered-models/", "READ permission on the registered model"),
    ("model-versions/", "READ permission on the registered model"),
    ("experiments/create", "permission to create experiments"),
    ("experiments/set-experiment-tag", "EDIT permission on the experiment"),
    ("experiments/", "READ permission on the experiment"),
    ("runs/get", "READ permission on the run's experiment"),
    ("runs/", "EDIT permission on the run's experiment"),
    ("mlflow-artifacts/", "READ (download) or EDIT (upload) permission on the run's experiment"),
)


def access_error(exc: BaseException, what: str = "") -> Optional[UserError]:
    """A one-line UserError for MLflow's 401/403 errors (never transient: retrying cannot help);
    None for any other error."""
    code = getattr(exc, "error_code", None)
    if code in ("UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"):
        return credentials_error()
    if code != "PERMISSION_DENIED":
        return None
    from mlflow.utils.credentials import read_mlflow_creds

    endpoint = (re.search(r"endpoint (\S+)", str(exc)) or re.search(r"(/api/\S+)", str(exc)))
    path = endpoint.group(1) if endpoint else ""
    needs = next((n for key, n in ENDPOINT_NEEDS if key in path), "a permission it lacks")
    user = read_mlflow_creds().username or "(token user)"
    return AccessDenied(f"MLflow refused {what or path or 'the request'} for user {user!r}: it needs {needs}")
