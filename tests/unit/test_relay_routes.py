"""The router's memory of jobs streaming through it is bounded, and forgets a job once told."""

from __future__ import annotations

from handlers.relay_routes import RelayRoute, RelayRoutes


def route(n: int) -> RelayRoute:
    return RelayRoute(client_node=f"client{n}", driver_node="driver", model="m", traceparent=None)


def test_the_oldest_routes_go_first_past_the_limit() -> None:
    routes = RelayRoutes(limit=2)
    for n in range(3):
        routes.remember(f"job{n}", route(n))
    assert len(routes) == 2
    assert routes.get("job0") is None
    assert routes.get("job2") == route(2)


def test_a_forgotten_route_is_gone() -> None:
    routes = RelayRoutes()
    routes.remember("job", route(1))
    routes.forget("job")
    routes.forget("never-known")
    assert routes.get("job") is None and len(routes) == 0
