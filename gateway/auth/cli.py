"""`modelgw token`: mint a token from the development issuer of `modelgw up`.

It finds the data dir as every command does (modelgw.paths.find_data_dir: --data-dir,
$MODELGW_HOME, the one the last `modelgw up` ran on, ~/.modelgw). When it cannot mint it
prints one line on stderr, nothing on stdout, and exits 1: `TOKEN=$(modelgw token ...)`
is then empty and the shell's `&&` or `set -e` sees the failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "token",
        help="mint a bearer token from the development issuer of `modelgw up`",
        description="Print a token signed by the development issuer that `modelgw up` runs (its key is in "
        "DATA_DIR/issuer). For local use only; production tokens come from your identity provider.",
    )
    p.add_argument("--sub", required=True, help="the subject (who the token is for)")
    p.add_argument("--scope", action="append", default=[],
        help="a scope to grant (repeatable; space-separated lists too), e.g. modelgw:admin")
    p.add_argument("--group", action="append", default=[], help="a group the subject is in (repeatable)")
    p.add_argument("--role", action="append", default=[], help="a role the subject has (repeatable)")
    p.add_argument("--ttl", type=int, default=3600, help="seconds the token is valid (default %(default)s)")
    p.add_argument("--audience", default=None, help="the aud claim (default: the issuer's, modelgw)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the data dir of `modelgw up` (default $MODELGW_HOME, else the last `up`'s, else ~/.modelgw)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modelgw.gateway.auth.devissuer import DevIssuerMissing, load_state
    from modelgw.paths import find_data_dir

    if args.ttl < 1:
        print("error: --ttl must be at least 1 second", file=sys.stderr)
        return 2
    data_dir = find_data_dir(args.data_dir)
    try:
        state = load_state(data_dir / "issuer")
        scopes = [s for value in args.scope for s in value.split()]
        token = state.mint(args.sub, scopes, args.group, args.role, ttl=args.ttl, audience=args.audience)
    except (DevIssuerMissing, ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not token:
        print(f"error: the development issuer in {data_dir / 'issuer'} minted an empty token", file=sys.stderr)
        return 1
    print(token)
    return 0


# -- the gateway's flags ------------------------------------------------------------------


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """`modelgw gateway` flags for who may call (see modelgw.gateway.auth.config)."""
    group = parser.add_argument_group(
        "authentication",
        "Callers present OIDC bearer JWTs from a trusted issuer; without any issuer the gateway refuses to "
        "start unless --insecure-no-auth is given. One issuer by flags or environment, any number in --auth-config.",
    )
    group.add_argument("--issuer", help="trusted issuer URL, exactly as in its tokens' iss (default $MODELGW_ISSUER)")
    group.add_argument("--audience", action="append", default=[], help="accepted aud value (repeatable; default $MODELGW_AUDIENCE)")
    group.add_argument("--algorithms", default=None, help="comma-separated allowed algorithms (default: RS*, PS*, ES*, EdDSA)")
    group.add_argument("--jwks-uri", default=None, help="the issuer's JWKS URL (default: from OIDC discovery)")
    group.add_argument("--scope-claim", action="append", default=[],
        help="claim path holding scopes (repeatable; default scope, scp)")
    group.add_argument("--group-claim", action="append", default=[], help="claim path holding groups (repeatable; default groups)")
    group.add_argument("--role-claim", action="append", default=[],
        help="claim path holding roles, dotted for nested (repeatable; default roles, realm_access.roles)")
    group.add_argument("--leeway", type=float, default=None, help="clock skew allowed on exp/nbf/iat, seconds (default 60)")
    group.add_argument("--admin-scope", default=None,
        help="scope needed for the admin API (default $MODELGW_ADMIN_SCOPE or modelgw:admin)")
    group.add_argument("--max-token-bytes", type=int, default=None, help="longest token accepted (default 8192)")
    group.add_argument("--auth-config", default=None,
        help="YAML/JSON file with issuers and settings (default $MODELGW_AUTH_CONFIG)")
    group.add_argument("--insecure-no-auth", action="store_true",
        help="no authentication at all: every caller may do everything (development only)")


def gateway_auth_config(args: argparse.Namespace):  # -> AuthConfig
    """AuthConfig from the parsed flags and the environment (AuthConfigError when unusable)."""
    from modelgw.gateway.auth.config import load_auth_config

    if args.insecure_no_auth and not (args.issuer or args.auth_config):
        from modelgw.gateway.auth.config import AuthConfig

        return AuthConfig()  # the environment's issuer is not read: the flag is explicit
    return load_auth_config(
        config_file=args.auth_config,
        issuer=args.issuer,
        audiences=args.audience,
        algorithms=[a.strip() for a in (args.algorithms or "").split(",") if a.strip()],
        jwks_uri=args.jwks_uri,
        scope_claims=args.scope_claim,
        group_claims=args.group_claim,
        role_claims=args.role_claim,
        leeway_seconds=args.leeway,
        admin_scope=args.admin_scope,
        max_token_bytes=args.max_token_bytes,
    )
