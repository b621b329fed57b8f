"""The gateway's door: every routed request and every admin call goes through here.

    auth = build_authenticator(config, table, insecure=False)
    await auth.start()                                   # fetch issuers' keys (background)
    subject = await auth.authorize_grpc(context, model)  # InferenceFrontend's `authorize`
    subject = await auth.authorize_rest(request, model)  # RestFrontend's, and any REST route's
    await auth.authorize_admin_rest(request)             # AdminApi's
    grpc.aio.server(interceptors=[ErrorInterceptor(), admin_guard(auth)])  # RegistryService: admin only

A request first proves who it is (a bearer token from a trusted issuer: else 401 /
UNAUTHENTICATED), then the model's policy decides (else 403 / PERMISSION_DENIED). An
unknown model is only reported as such (404) to an authenticated caller. Health, server
metadata and /metrics are never routed here. Tokens are never logged; decisions are, with
the subject and model: allowed at DEBUG, refused at INFO.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import aiohttp
import grpc
from aiohttp import web
from prometheus_client import Counter, Gauge

from modelgw.errors import Behaviour, BehaviourInterceptor, responses_of
from modelgw.gateway import metrics
from modelgw.gateway.auth.config import AuthConfig, check_auth_choice
from modelgw.gateway.auth.keys import IssuerKeys
from modelgw.gateway.auth.policy import OPEN, ModelPolicy, Refusal, admin_refusal
from modelgw.gateway.auth.tokens import InvalidToken, Principal, TokenVerifier
from modelgw.gateway.errors import GatewayError
from modelgw.gateway.limits import CALLER_CLAIMS
from modelgw.gateway.routing import RoutingTable
from modelgw.protos import registry_pb2 as rpb

log = logging.getLogger(__name__)

REALM = "modelgw"

# refusals only: what is let in is counted by modelgw_requests_total
REFUSALS = Counter(
    "modelgw_auth_refusals_total", "Requests refused: no or invalid token (unauthenticated) or policy (forbidden)",
    ("path", "decision"), registry=metrics.REGISTRY,
)
SIGNATURE_CHECKS = Gauge(
    "modelgw_auth_signature_checks", "Token signatures checked (verified-token cache misses) since start",
    registry=metrics.REGISTRY,
)
ISSUER_KEYS = Gauge(
    "modelgw_auth_issuer_keys", "Signing keys known per issuer (0: its tokens are refused)",
    ("issuer",), registry=metrics.REGISTRY,
)


# -- errors, with their WWW-Authenticate challenge (RFC 6750) ---------------------------


def _quoted(text: str, limit: int = 300) -> str:
    """Text fit for a quoted auth-param (RFC 6750: no '"' or '\\', printable ASCII)."""
    cleaned = "".join(c if " " <= c <= "~" and c not in '"\\' else "'" if c == '"' else "?" for c in text)
    return cleaned[:limit]


class AuthError(GatewayError):
    """A refused request: the gRPC status, and for HTTP the WWW-Authenticate header in
    `headers` (any REST route answering it sends them)."""

    def __init__(self, code: grpc.StatusCode, message: str, challenge: str) -> None:
        super().__init__(code, message)
        self.headers = {"WWW-Authenticate": challenge}


def no_token(message: str) -> AuthError:
    # RFC 6750 3.1: a request without any credentials gets no error code
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, message, f'Bearer realm="{REALM}"')


def invalid_token(reason: str, error: str = "invalid_token") -> AuthError:
    challenge = f'Bearer realm="{REALM}", error="{error}", error_description="{_quoted(reason)}"'
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, reason, challenge)


def insufficient_scope(refusal: Refusal) -> AuthError:
    challenge = f'Bearer realm="{REALM}", error="insufficient_scope", error_description="{_quoted(refusal.message)}"'
    if refusal.scopes:
        challenge += f', scope="{_quoted(" ".join(refusal.scopes))}"'
    return AuthError(grpc.StatusCode.PERMISSION_DENIED, refusal.message, challenge)


NO_TOKEN_MESSAGE = "no bearer token: send 'authorization: Bearer <token>'"


def bearer_token(values: Sequence[str]) -> str | None:
    """The token of the one `Authorization: Bearer <token>` header; None when there is
    no Authorization header; AuthError when it is anything else."""
    if not values:
        return None
    if len(values) > 1:
        raise invalid_token("more than one Authorization header", "invalid_request")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise invalid_token(
            f"the Authorization header uses the {_quoted(scheme, 20)!r} scheme; send 'Authorization: Bearer <token>'",
            "invalid_request",
        )
    token = token.strip()
    if not token:
        raise invalid_token("the Authorization header has an empty bearer token", "invalid_request")
    return token


def _grpc_authorization(context: grpc.aio.ServicerContext) -> list[str]:
    return [v for k, v in (context.invocation_metadata() or ()) if k == "authorization" and isinstance(v, str)]


def _http_authorization(request: web.Request) -> list[str]:
    return request.headers.getall("Authorization", [])


# -- the two kinds of door --------------------------------------------------------------


def _key_count(keys: IssuerKeys) -> Callable[[], float]:
    """The modelgw_auth_issuer_keys gauge's reading for one issuer."""
    return lambda: float(len(keys.keys))


class Door(Protocol):
    """What the gateway needs from authentication, with or without it."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def authorize_grpc(self, context: grpc.aio.ServicerContext, model: str) -> str | None: ...
    async def authorize_rest(self, request: web.Request, model: str) -> str | None: ...
    async def authorize_admin_rest(self, request: web.Request) -> None: ...
    async def authorize_admin_grpc(self, context: grpc.aio.ServicerContext, method: str = "") -> None: ...


class Authenticator:
    """OIDC bearer tokens from the configured issuers; policies from the routing table."""

    def __init__(self, config: AuthConfig, table: RoutingTable) -> None:
        self.config = config
        self.table = table
        self._session: aiohttp.ClientSession | None = None
        self.keys = {i.issuer: IssuerKeys(i, self._http, on_removed=self._forget) for i in config.issuers}
        self.verifier = TokenVerifier(config, self.keys)
        self._policies: dict[str, tuple[rpb.ModelSpec, ModelPolicy]] = {}
        SIGNATURE_CHECKS.set_function(lambda: float(self.verifier.signature_checks))
        for issuer, keys in self.keys.items():
            ISSUER_KEYS.labels(issuer).set_function(_key_count(keys))

    def _http(self) -> aiohttp.ClientSession:
        """One session for every issuer's fetches, made on first use (inside the loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.http_timeout_seconds))
        return self._session

    def _forget(self, issuer: str, kids: set[str]) -> None:
        self.verifier.forget_keys(issuer, kids)

    async def start(self) -> None:
        for keys in self.keys.values():
            keys.start()
        log.info(
            "authentication on: issuer(s) %s; admin scope %s",
            ", ".join(self.keys), self.config.admin_scope,
        )

    async def close(self) -> None:
        for keys in self.keys.values():
            await keys.close()
        if self._session is not None:
            await self._session.close()

    # -- decisions ------------------------------------------------------------------------

    @staticmethod
    def _refused(error: AuthError, path: str, target: str, subject: str = "-") -> AuthError:
        """Count and log a refusal (never the token), and hand the error back to raise."""
        decision = "forbidden" if error.code == grpc.StatusCode.PERMISSION_DENIED else "unauthenticated"
        REFUSALS.labels(path, decision).inc()
        log.info("deny %s %s subject=%s: %s", path, target, subject, error.message)
        return error

    def _policy(self, model: str) -> ModelPolicy:
        route = self.table.routes.get(model)
        if route is None:
            return OPEN  # unknown: authenticate, then the proxy answers NOT_FOUND
        spec = route.spec
        cached = self._policies.get(model)
        if cached is not None and cached[0] is spec:
            return cached[1]
        if len(self._policies) > 2 * len(self.table.routes) + 64:
            self._policies.clear()  # models deleted since: drop their entries
        policy = ModelPolicy.from_access(spec.access) if spec.HasField("access") else OPEN
        self._policies[model] = (spec, policy)
        return policy

    async def _principal(self, values: Sequence[str], path: str, target: str) -> Principal | None:
        """The verified caller; None when there is no Authorization header at all."""
        try:
            token = bearer_token(values)
            return None if token is None else await self.verifier.verify(token)
        except InvalidToken as err:
            raise self._refused(invalid_token(str(err)), path, target) from None
        except AuthError as err:
            raise self._refused(err, path, target) from None

    async def authorize_model(self, values: Sequence[str], model: str, path: str) -> str | None:
        """The subject for x-modelgw-subject (None for an anonymous call to a public
        model), or AuthError."""
        policy = self._policy(model)
        principal = await self._principal(values, path, model)
        # who asks, for the per-tenant limits the proxy applies (gateway/limits.py)
        CALLER_CLAIMS.set(principal.claims if principal is not None else None)
        if principal is None:
            if policy.public:
                log.debug("allow %s %s subject=- (public model)", path, model)
                return None
            raise self._refused(no_token(NO_TOKEN_MESSAGE), path, model)
        if policy is not OPEN and not policy.public:
            refusal = policy.refusal(principal, model)
            if refusal is not None:
                raise self._refused(insufficient_scope(refusal), path, model, principal.subject)
        log.debug("allow %s %s subject=%s", path, model, principal.subject)
        return principal.header_value

    async def authorize_admin(self, values: Sequence[str], path: str, target: str) -> str:
        """The admin's subject, or AuthError."""
        principal = await self._principal(values, path, target)
        if principal is None:
            raise self._refused(no_token(NO_TOKEN_MESSAGE), path, target)
        refusal = admin_refusal(principal, self.config.admin_scope)
        if refusal is not None:
            raise self._refused(insufficient_scope(refusal), path, target, principal.subject)
        log.debug("allow %s %s subject=%s", path, target, principal.subject)
        return principal.subject

    # -- the frontends' hooks -----------------------------------------------------------

    async def authorize_grpc(self, context: grpc.aio.ServicerContext, model: str) -> str | None:
        return await self.authorize_model(_grpc_authorization(context), model, "grpc")

    async def authorize_rest(self, request: web.Request, model: str) -> str | None:
        return await self.authorize_model(_http_authorization(request), model, "rest")

    async def authorize_admin_rest(self, request: web.Request) -> None:
        await self.authorize_admin(_http_authorization(request), "admin-rest", f"{request.method} {request.path}")

    async def authorize_admin_grpc(self, context: grpc.aio.ServicerContext, method: str = "") -> None:
        await self.authorize_admin(_grpc_authorization(context), "admin-grpc", method)


class InsecureDoor:
    """--insecure-no-auth: everything passes, and the log says so, at start and on the
    first request of every path."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def _first_use(self, path: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            log.warning("authentication is OFF (--insecure-no-auth): %s requests are served without any token check", path)

    async def start(self) -> None:
        log.warning(
            "authentication is OFF (--insecure-no-auth): anyone who reaches the gateway may call every model "
            "and change the registry"
        )

    async def close(self) -> None:
        pass

    async def authorize_grpc(self, context: grpc.aio.ServicerContext, model: str) -> str | None:
        self._first_use("gRPC inference")
        return None

    async def authorize_rest(self, request: web.Request, model: str) -> str | None:
        self._first_use("REST inference")
        return None

    async def authorize_admin_rest(self, request: web.Request) -> None:
        self._first_use("REST admin")

    async def authorize_admin_grpc(self, context: grpc.aio.ServicerContext, method: str = "") -> None:
        self._first_use("gRPC RegistryService")


def build_authenticator(config: AuthConfig, table: RoutingTable, insecure: bool = False) -> Door:
    """The door the gateway's config asks for (AuthConfigError: neither issuers nor an
    explicit insecure_no_auth)."""
    check_auth_choice(config, insecure)
    return InsecureDoor() if insecure else Authenticator(config, table)


# -- the RegistryService, behind the admin check -----------------------------------------

REGISTRY_SERVICE = rpb.DESCRIPTOR.services_by_name["RegistryService"].full_name
AdminCheck = Callable[[grpc.aio.ServicerContext, str], Awaitable[None]]


class AdminScopeGuard(BehaviourInterceptor):
    """Every RPC of one service (the RegistryService) behind `check`, streams included.
    A refusal is raised from the handler: install it inside modelgw.errors.ErrorInterceptor
    (after it in `interceptors=`), which answers with the refusal's status."""

    def __init__(self, check: AdminCheck, service: str = REGISTRY_SERVICE) -> None:
        super().__init__(f"/{service}/")
        self.check = check

    def wrap_unary(self, behaviour: Behaviour, method: str) -> Behaviour:
        name = method.rpartition("/")[2]

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self.check(context, name)
            return await behaviour(request, context)

        return guarded

    def wrap_stream(self, behaviour: Behaviour, method: str) -> Behaviour:
        name = method.rpartition("/")[2]

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self.check(context, name)
            async for response in responses_of(behaviour, request, context):
                yield response

        return guarded


def admin_guard(door: Door) -> AdminScopeGuard:
    """The interceptor that puts the gateway's RegistryService behind the admin scope."""
    return AdminScopeGuard(door.authorize_admin_grpc)
