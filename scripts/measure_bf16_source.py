"""A bf16 source through `normswap convert --dtype auto`: the output's dtype and size on disk, and
its logits against the same conversion of the float32 source.

SmolLM2-135M-Instruct (built by ../shared/assets/smollm2-135m-instruct/fetch.sh, stored in
float32) is cast to bfloat16 and saved; both copies are converted as a user would, with the CLI;
the two outputs' logits are compared on the first 2,048 tokens of WikiText-2 test (8 rows of 256),
in float32 on the CPU.

    HF_HUB_OFFLINE=1 python scripts/measure_bf16_source.py --to rmsnorm
    HF_HUB_OFFLINE=1 python scripts/measure_bf16_source.py --to dyt

Writes docs/results/scale/bf16_source_<to>.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

SMOLLM2 = Path(os.environ.get("NORMSWAP_CACHE", Path.home() / ".cache" / "normswap-assets")) / "smollm2-135m-instruct"


def convert(src: Path, out: Path, to: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "normswap", "convert", str(src), "--to", to, "--out", str(out), "--format", "json"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"convert {src} failed: {p.stderr.strip().splitlines()[-1]}")
    data = json.loads(p.stdout)
    return {"dtype": data["dtype"], "exact": data["exact"], "max_rel_diff_vs_source": data["max_rel_diff"], "seconds": data.get("seconds"),
            "bytes_on_disk": sum(f.stat().st_size for f in out.glob("*.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--to", choices=["rmsnorm", "dyt"], default="rmsnorm")
    ap.add_argument("--model", type=Path, default=SMOLLM2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    import normswap
    from _measure_common import write_json
    from normswap.assets import asset
    from normswap.evaluation.perplexity import tokenize_text
    from normswap.loading import load_pretrained, load_tokenizer

    with tempfile.TemporaryDirectory(prefix="normswap-bf16-") as tmp:
        work = Path(tmp)
        bf16 = work / "source-bf16"
        model = load_pretrained(str(args.model), dtype=torch.bfloat16)
        model.save_pretrained(bf16)
        load_tokenizer(str(args.model)).save_pretrained(bf16)
        del model
        sources = {"float32": args.model, "bfloat16": bf16}
        report = {"model": str(args.model), "to": args.to,
                  "source_bytes": {k: sum(f.stat().st_size for f in Path(v).glob("*.safetensors")) for k, v in sources.items()}}
        report["outputs"] = {k: convert(v, work / f"out-{k}", args.to) for k, v in sources.items()}
        tok = load_tokenizer(str(args.model))
        ids = tokenize_text(tok, asset("wikitext2-raw-test", "wiki.test.raw").read_text(), max_tokens=2048)[:2048].reshape(8, 256)
        logits = {}
        for k in sources:
            m = normswap.load(str(work / f"out-{k}")).float().eval()
            with torch.no_grad():
                logits[k] = torch.cat([m(input_ids=ids[i:i + 2]).logits for i in range(0, 8, 2)])
            del m
        a, b = logits["float32"], logits["bfloat16"]
        report["logits_bf16_vs_fp32_conversion"] = {
            "tokens": int(ids.numel()), "max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max()),
            "max_rel_diff": float((a - b).abs().max() / a.abs().max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
    out = args.out or Path(f"docs/results/scale/bf16_source_{args.to}.json")
    write_json(out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
