"""`npcd loadtest`: plays a game's dialogue traffic against a daemon and reports how it held up.

The pieces, one module each: `scenario` (what the game does, and the seeded
arrival schedule it produces), `traffic` (the gRPC client that replays a
schedule and times every request), `scrape` (the daemon's Prometheus metrics
during the run), `capacity` (the search for the most NPCs a server
sustains), `report` (statistics, JSON and PNG) and `targets` (the baselines,
and starting any server on a free loopback port). The baselines, the
one-request-at-a-time servers that mixed-adapter batching is measured
against, share `sidecar` (the daemon's API, prompts, validation and
detokenizer over one worker thread) and differ only in how they generate:
`naive` (transformers + PEFT) and `llamacpp` (llama.cpp, its GGUF files
from `llamacpp_gguf`). The command line is `npcd.cli.loadtest`.
"""
