"""The README's discovery table: every architecture of tests/untabled_models.py (no normswap table)
converted `--to rmsnorm --fold --tied-head untie` with a discovered plan, as markdown rows.

    HF_HUB_OFFLINE=1 python scripts/discovery_zoo.py
"""
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import torch  # noqa: E402

import normswap  # noqa: E402
from normswap.archs.plan import build_plan  # noqa: E402
from untabled_models import UNTABLED, untabled_inputs, untabled_model  # noqa: E402


def out(m, x):
    with torch.no_grad():
        o = m(**x)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state
rows = []
for name in UNTABLED:
    m = untabled_model(name); x = untabled_inputs(m); ref = out(m, x)
    plan = build_plan(m, "discover")
    m2, res = normswap.convert(m, "rmsnorm", fold=True, tied_head="untie")
    rel = float((out(m2, x) - ref).abs().max() / ref.abs().max())
    r = res.record
    n = len(r.sites); ex = sum(s.method == "exact" for s in r.sites); lns = sum(s.method == "layernorm-semantics" for s in r.sites)
    kept = sum(s.method in ("fold-gain", "keep-gain") for s in r.sites)
    notes = sorted({s.note for s in plan.sites if s.note})
    how = []
    if ex: how.append(f"{ex} exact")
    if lns: how.append(f"{lns} keep the mean")
    if kept: how.append(f"{kept} RMSNorm kept")
    if n - ex - lns - kept: how.append(f"{n-ex-lns-kept} approximate")
    extra = []
    if r.centered_inputs: extra.append("explicit centring at " + ", ".join(f"`{p}`" for p in r.centered_inputs))
    if plan.other_norms: extra.append(f"{len(plan.other_norms)} off-stream norms (QK, pooler) left alone")
    if notes: extra.append("why not centred: " + notes[0][:110].rstrip() + ("..." if len(notes[0]) > 110 else ""))
    if r.style == "post" and not r.exact: extra.append("Post-LN: approximate, recovered by finetune")
    elif r.style == "post": extra.append("norms after the sublayers (their outputs are addends): gains stay in the norms")
    rows.append(f"| {name} | {plan.style} | {n} | {', '.join(how)} | {sum(s.folded for s in r.sites)} | {rel:.1e} | {'; '.join(extra) or '-'} |")
print("| model | style | sites | `--to rmsnorm` | folded | rel. error | notes |")
print("|---|---|---|---|---|---|---|")
print("\n".join(rows))
