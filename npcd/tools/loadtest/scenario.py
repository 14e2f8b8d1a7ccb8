"""What the simulated game does, and the arrival schedule that follows from it.

The schedule is computed up front from a seed, before any request is sent.
That is what makes a comparison fair: the daemon and the naive baseline get
the very same requests at the very same offsets, whatever either of them
answers. For the same reason conversation history is synthetic (drawn from
fixed lines) rather than the replies the server under test produced.

Traffic model: every NPC speaks as a Poisson process (mean interval
`speak_every_s`), and now and then a crowd of `burst_size` NPCs reacts to
the player on the same tick (Poisson, mean interval `burst_every_s`). The
game submits on ticks, so arrival times are rounded down to the tick they
fall in; requests of one tick leave together.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field

from npcd.engine.api import SAMPLING_BOUNDS

APIS = ("say", "session")

PLAYER_LINES = (
    "Hello there.", "What news from the road?", "Have you seen anything strange lately?",
    "I need a place to sleep tonight.", "Who rules this town?", "Can you help me find the old mill?",
    "What do you sell?", "Is it safe to travel north?", "Do you know a healer?", "I am looking for work.",
    "Why is everyone so nervous today?", "Tell me about yourself.", "Where can I get a drink?",
    "Did you hear the bells last night?", "I lost my way in the forest.", "What happened to the bridge?",
)
NPC_REPLIES = (
    "Keep your voice down, stranger.", "The road has been quiet, too quiet.", "Ask at the inn, not here.",
    "I have seen worse days than this.", "Coin first, questions later.", "The guards will not help you.",
    "Follow the river and you will find it.", "Nobody goes there after dark.",
)
CROWD_LINES = (
    "The player just drew a sword in the market!", "The player set the haystack on fire!",
    "The player is dancing on the fountain!", "The player shouts for the captain of the guard!",
)
LOCATIONS = ("market square", "tavern", "city gate", "forest edge", "harbour", "temple steps")
TIMES_OF_DAY = ("dawn", "noon", "dusk", "night")
PLAYER_SHARE = 0.1  # lines addressed to the player directly (PRIORITY_PLAYER); the rest are ambient
WARM_UP_S = 120.0   # a warm-up's lines get this long to finish


@dataclass(frozen=True)
class Scenario:
    """One load test's game: its size, its rhythm, its requests, and the bounds of the run."""

    npcs: int = 64
    personas: int = 8                # NPC i speaks as persona i mod min(personas, available)
    tick_hz: float = 20.0
    speak_every_s: float = 5.0       # mean interval between two lines of one NPC
    burst_every_s: float = 15.0      # mean interval between crowd reactions; 0 = none
    burst_size: int = 8              # NPCs reacting on the same tick
    history_turns: int = 2           # earlier turns sent with each line
    max_tokens: int = 40
    temperature: float = 0.0         # 0 = greedy: the daemon and the baseline write the same text
    api: str = "say"                 # say: one Say stream per line; session: one Session per client
    clients: int = 4                 # simulated game clients (gRPC channels); NPC i belongs to client i mod clients
    duration_s: float = 60.0         # requests are sent during this long
    max_requests: int = 2000
    drain_s: float = 30.0            # after duration_s, unfinished requests get this long, then are cut off
    seed: int = 0

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"loadtest scenario: {msg}")

        need(self.npcs >= 1, f"npcs must be >= 1, got {self.npcs}")
        need(self.personas >= 1, f"personas must be >= 1, got {self.personas}")
        need(0 < self.tick_hz <= 1000, f"tick_hz must be in (0, 1000], got {self.tick_hz:g}")
        need(self.speak_every_s > 0, f"speak_every_s must be > 0, got {self.speak_every_s:g}")
        need(self.burst_every_s >= 0, f"burst_every_s must be >= 0, got {self.burst_every_s:g}")
        need(self.burst_size >= 0, f"burst_size must be >= 0, got {self.burst_size}")
        need(0 <= self.history_turns <= 32, f"history_turns must be in 0..32, got {self.history_turns}")
        for name in ("max_tokens", "temperature"):  # what the daemon would accept, from the one table
            problem = SAMPLING_BOUNDS[name].check(getattr(self, name))
            need(problem is None, f"{name} {problem}")
        need(self.api in APIS, f"api must be one of {APIS}, got {self.api!r}")
        need(self.clients >= 1, f"clients must be >= 1, got {self.clients}")
        need(0 < self.duration_s <= 3600, f"duration_s must be in (0, 3600], got {self.duration_s:g}")
        need(1 <= self.max_requests <= 100_000, f"max_requests must be in 1..100000, got {self.max_requests}")
        need(0 <= self.drain_s <= 600, f"drain_s must be in 0..600, got {self.drain_s:g}")

    @property
    def offered_lines_per_s(self) -> float:
        bursts = min(self.burst_size, self.npcs) / self.burst_every_s if self.burst_every_s else 0.0
        return self.npcs / self.speak_every_s + bursts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PersonaRef:
    id: str
    display_name: str
    adapter: bool = False  # runs with a LoRA adapter (else on the base model alone)


@dataclass(frozen=True)
class Arrival:
    """One NPC line the game asks for: when, who, and the request's content."""

    index: int
    request_id: str
    at_s: float                      # offset from the start of the run (a tick boundary)
    tick: int
    npc: int
    client: int
    persona: str
    line: str
    speaker: str
    history: tuple[tuple[str, str], ...]
    context: dict[str, str] = field(hash=False)
    player: bool                     # PRIORITY_PLAYER rather than ambient
    burst: bool


def _poisson(rng: random.Random, mean_interval: float, horizon: float) -> list[float]:
    times, t = [], rng.expovariate(1.0 / mean_interval)
    while t < horizon:
        times.append(t)
        t += rng.expovariate(1.0 / mean_interval)
    return times


def build_schedule(scenario: Scenario, personas: list[PersonaRef]) -> list[Arrival]:
    """The run's requests in sending order; the same seed and personas give the same list."""
    scenario.validate()
    if not personas:
        raise ValueError("loadtest: the target serves no ready persona")
    cast = personas[: scenario.personas]
    rng = random.Random(scenario.seed)
    # (time, npc, burst): each NPC's own lines, then crowd reactions.
    events = [(t, npc, False) for npc in range(scenario.npcs)
              for t in _poisson(rng, scenario.speak_every_s, scenario.duration_s)]
    if scenario.burst_every_s and scenario.burst_size:
        for t in _poisson(rng, scenario.burst_every_s, scenario.duration_s):
            crowd = rng.sample(range(scenario.npcs), min(scenario.burst_size, scenario.npcs))
            events.extend((t, npc, True) for npc in crowd)
    events.sort(key=lambda e: (math.floor(e[0] * scenario.tick_hz), e[1]))

    arrivals = []
    for index, (t, npc, burst) in enumerate(events[: scenario.max_requests]):
        tick = math.floor(t * scenario.tick_hz)
        persona = cast[npc % len(cast)]
        history = []
        for turn in range(scenario.history_turns):
            if turn % 2 == scenario.history_turns % 2:  # the turn before the line is the NPC's own
                history.append(("Player", rng.choice(PLAYER_LINES)))
            else:
                history.append((persona.display_name, rng.choice(NPC_REPLIES)))
        arrivals.append(Arrival(
            index=index, request_id=f"r{index:05d}-npc{npc}", at_s=tick / scenario.tick_hz, tick=tick, npc=npc,
            client=npc % scenario.clients, persona=persona.id,
            line=rng.choice(CROWD_LINES if burst else PLAYER_LINES), speaker="Player", history=tuple(history),
            context={"location": rng.choice(LOCATIONS), "time_of_day": rng.choice(TIMES_OF_DAY)},
            player=not burst and rng.random() < PLAYER_SHARE, burst=burst,
        ))
    return arrivals


def warm_up_schedule(scenario: Scenario, personas: list[PersonaRef]) -> list[Arrival]:
    """One line per persona of the cast, all on the first tick, sent before anything is timed.

    A server's first lines pay for what later ones reuse (adapters paged in,
    persona prefixes cached, kernels warmed). In a short trial, where p99 is
    nearly the maximum, that one-off cost alone could fail the trial.
    """
    cast = personas[: scenario.personas]
    return [Arrival(index=i, request_id=f"warm-up{i}-{p.id}", at_s=0.0, tick=0, npc=i, client=i % scenario.clients,
                    persona=p.id, line=PLAYER_LINES[0], speaker="Player", history=(), context={}, player=False,
                    burst=False) for i, p in enumerate(cast)]


def thin(schedule: list[Arrival], fraction: float, seed: int) -> list[Arrival]:
    """A seeded subset of `schedule` keeping about `fraction` of it: the same game at a lower rate."""
    if not 0 < fraction <= 1:
        raise ValueError(f"loadtest: a load fraction must be in (0, 1], got {fraction:g}")
    if fraction == 1:
        return list(schedule)
    rng = random.Random(f"{seed}/{fraction}")
    return [a for a in schedule if rng.random() < fraction]
