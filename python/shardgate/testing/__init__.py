"""Test support shipped with shardgate: realistic gateway traffic for tests, benches and fakes.

Nothing here is used by the gateway process itself. :mod:`shardgate.testing.payloads`
generates Discord API v10 gateway payloads, deterministically from a seed, so the fake
Discord, the property tests and the benchmarks all see the same shapes as production.
"""
