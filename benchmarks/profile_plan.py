"""Component CPU times of one planning decision (40M, fp32): encode, greedy root, planning root, one imagined
step at several beam batch sizes; optionally a torch.profiler table of one imagined step.

    OMP_NUM_THREADS=1 python benchmarks/profile_plan.py --threads 1 [--profile 4]

CPU time (time.process_time) is reported because the shared machine's wall time inflates with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def cpu_ms(fn, reps: int) -> float:
    fn()
    c = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - c) / reps * 1e3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="40M")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", default="1,2,4,8,16", help="beam batch sizes of the imagined-step timing")
    ap.add_argument("--profile", type=int, default=0, help="print a torch.profiler table of a step at this batch")
    ap.add_argument("--no-encode", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from jowa_model import cpu_kernels
    from jowa_model.planner import WorldModelImagination
    from jowa_model.presets import model_preset
    from jowa_model.world_action import WorldActionModel

    model = cpu_kernels.apply(WorldActionModel(model_preset(args.config)))
    world = WorldModelImagination(model)
    g = torch.Generator().manual_seed(0)
    obs, act, task = torch.randint(0, 2048, (1, 8, 36), generator=g), torch.randint(0, 8, (1, 7), generator=g), \
        torch.tensor([37])
    out: dict = {"threads": args.threads, "load": round(os.getloadavg()[0], 2)}
    if not args.no_encode:
        from jowa_model.tokenizer import Tokenizer, tokenizer_preset

        tok = Tokenizer(tokenizer_preset("paper")).eval()
        frame = torch.randint(0, 256, (1, 84, 84), dtype=torch.uint8, generator=g)
        out["encode_ms"] = cpu_ms(lambda: tok.encode(frame), args.reps)
    out["greedy_root_295_ms"] = cpu_ms(lambda: world.root_q(obs, act, task), args.reps)
    out["plan_root_221_ms"] = cpu_ms(lambda: world.start(obs[:, 2:], act[:, 2:], task), args.reps)
    state, _ = world.start(obs[:, 2:], act[:, 2:], task)
    for b in [int(x) for x in args.batches.split(",")]:
        st = world.select(state, torch.zeros(b, dtype=torch.long))
        acts = torch.zeros(b, dtype=torch.long)

        def step():
            st.cache.length = 221
            world.step(st, acts)

        out[f"step_B{b}_ms"] = cpu_ms(step, max(1, args.reps // 2))
        if b == args.profile:
            from torch.profiler import profile

            with profile() as prof:
                step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    out["load_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}))
    return out


if __name__ == "__main__":
    main()
