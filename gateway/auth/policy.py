"""Authorization: may this verified caller use this model, or administer the registry?

A model's access policy is in its registry record (ModelSpec.access):
- scopes: the caller needs every one of them;
- groups: when any are listed, the caller needs at least one of them;
- roles: when any are listed, the caller needs at least one of them;
- public: true (only when set explicitly): no token needed at all.
A model with no policy is open to ANY AUTHENTICATED caller: a valid token from a trusted
issuer is enough. Restrict a model by giving it scopes, groups or roles.

The registry's admin API needs the configured admin scope.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelgw.gateway.auth.tokens import Principal
from modelgw.protos import registry_pb2 as rpb


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a verified caller may not do something; `scopes` are the scopes it lacks
    (for the WWW-Authenticate scope attribute)."""

    message: str
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """An AccessPolicy made ready for per-request checks (sets, not repeated fields)."""

    scopes: tuple[str, ...] = ()
    groups: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    public: bool = False

    @classmethod
    def from_access(cls, access: rpb.AccessPolicy) -> ModelPolicy:
        return cls(
            scopes=tuple(dict.fromkeys(access.scopes)),
            groups=frozenset(access.groups),
            roles=frozenset(access.roles),
            public=access.public,
        )

    def refusal(self, principal: Principal, model: str) -> Refusal | None:
        """None when `principal` may use the model, else why not."""
        missing = tuple(s for s in self.scopes if s not in principal.scopes) if self.scopes else ()
        if missing:
            return Refusal(f"model '{model}' needs scope(s) {', '.join(missing)}, which the token does not grant", missing)
        if self.groups and self.groups.isdisjoint(principal.groups):
            return Refusal(f"model '{model}' is for members of {', '.join(sorted(self.groups))}; the token names none of them")
        if self.roles and self.roles.isdisjoint(principal.roles):
            return Refusal(f"model '{model}' needs one of the roles {', '.join(sorted(self.roles))}; the token has none of them")
        return None


OPEN = ModelPolicy()  # no policy: any authenticated caller


def admin_refusal(principal: Principal, admin_scope: str) -> Refusal | None:
    if admin_scope in principal.scopes:
        return None
    return Refusal(f"the registry admin API needs scope {admin_scope}, which the token does not grant", (admin_scope,))
