"""Benchmark: running workflow code after each input, with and without the replay cache.

Pure, no broker: the replay driver alone over a workflow of N sequential activities, fed
each step's completion as the engine would, once with a replay cache (the coroutine kept
between inputs) and once without (every input replays the history from the start).
Without the cache the k-th input's work grows with k, so a run's grows with N squared;
with it, each input runs the code on from the await it waited at.

    python3 -m bench.replay --steps 3,10,50,200 --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

from orchestrator import WorkflowContext, WorkflowRegistry
from orchestrator.protocol.records import ActivityCompleted, HistoryEvent, Payload
from orchestrator.replay.driver import ReplayCache, replay


def _registry() -> WorkflowRegistry:
    registry = WorkflowRegistry()

    @registry.workflow("bench.chain")
    async def chain(ctx: WorkflowContext, steps: int) -> int:
        total = 0
        for step in range(steps):
            total += await ctx.activity("bench.step", {"step": step}, result_type=int)
        return total

    return registry


def replay_once(steps: int, kept: bool) -> float:
    """Seconds the replay driver takes over one chain of ``steps`` activities."""
    fn = _registry().get("bench.chain")
    assert fn is not None
    cache = ReplayCache(check=False) if kept else None
    events: tuple[HistoryEvent, ...] = ()
    one = Payload(b"1")
    took = 0.0
    for _ in range(steps + 1):
        began = time.perf_counter()
        result = replay(fn, "wf-1", "bench.chain", steps, events, 0, run_id="r1", cache=cache)
        took += time.perf_counter() - began
        if result.finished:
            if result.value != steps:
                raise SystemExit(f"bench.replay: the chain of {steps} ended with {result}")
            return took
        (step,) = result.new_steps
        events = (*events, step, ActivityCompleted(step.seq, 1, one, step.at_ms))
    raise SystemExit(f"bench.replay: the chain of {steps} did not finish")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the median time per run and per step, kept against replayed from the start."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", default="3,10,50,200", help="chain lengths, comma-separated")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each, the median shown")
    args = parser.parse_args(argv)
    lengths = [int(part) for part in args.steps.split(",") if part.strip()]
    print(f"median of {args.repeat} runs; ms per run (per step)")
    print(f"{'steps':>6} {'from the start':>22} {'cache kept':>22} {'ratio':>6}")
    for steps in lengths:
        scratch, kept = (
            statistics.median(replay_once(steps, kept) for _ in range(args.repeat)) * 1000
            for kept in (False, True)
        )
        print(
            f"{steps:>6} {scratch:>12.2f} ({scratch / steps:>6.3f}) "
            f"{kept:>12.2f} ({kept / steps:>6.3f}) {scratch / kept:>6.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
