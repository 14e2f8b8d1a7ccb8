"""`npcd loadtest`: plays a game's dialogue traffic against a daemon and reports how it held up.

The pieces, one module each: `scenario` (what the game does, and the seeded
arrival schedule it produces), `traffic` (the gRPC client that replays a
schedule and times every request), `scrape` (the daemon's Prometheus metrics
during the run), `naive` (a one-request-at-a-time transformers + PEFT server
with the same API, the baseline that mixed-adapter batching is measured
against), `targets` (starting either server on a free loopback port),
`report` (statistics, JSON and PNG) and `command` (the CLI).
"""
