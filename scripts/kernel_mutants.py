"""
Do the CPU tests of the kernels bite? Plant a bug in the real kernels (kernels/*.cu), one at a time in a
scratch copy of the repository, run the README's test command there (python -m pytest -q tests, reported with
-vv -rf, no PARSCALE_* variable set) and record which tests, and which sanitizer, caught it. A control run
with nothing planted must pass. Writes the log (default results/kernel_mutants.txt) and exits 1 if any planted
bug went uncaught.

    python scripts/kernel_mutants.py                  # the control and every mutant, the whole suite each time
    python scripts/kernel_mutants.py --only=3 --tests tests/test_kernels_cpu.py   # one mutant, one file: a quick look
"""
import argparse
import os
import re
import tempfile

import scratch

# (what the bug is, file, text in it, what replaces that text): each text occurs exactly once
MUTANTS = [
    ("no barrier after the query is staged in shared memory", "kernels/attention.cu",
     "q_s[d] = to_f32(q[d]) * scale;\n    __syncthreads();\n", "q_s[d] = to_f32(q[d]) * scale;\n"),
    ("no barrier after the LayerNorm prologue", "kernels/gemv.cu",
     "xs + r * K, K, lane);\n        __syncthreads();\n", "xs + r * K, K, lane);\n"),
    ("the split ticket counted to nsplit - 1", "kernels/attention.cu",
     "== (unsigned int)(n_active - 1));", "== (unsigned int)(nsplit - 1));"),
    ("an unused read past a weight row's end", "kernels/gemv.cu",
     "    const float bn = bias ? to_f32(bias[n]) : 0.f;\n",
     "    const float bn = bias ? to_f32(bias[n]) : 0.f;\n"
     "    { volatile float past = to_f32(wrow[K]); (void)past; }\n"),
    ("a wrong bounds guard: n > N instead of n >= N", "kernels/gemv.cu",
     "if (n >= N) return;", "if (n > N) return;"),
    ("two parameters of the same type swapped in a kernel's signature", "kernels/gemv.cu",
     "float* __restrict__ x, int R, int N, int K) {", "float* __restrict__ x, int N, int R, int K) {"),
]
HEADLINE = re.compile(r"(AddressSanitizer: [\w-]+|ThreadSanitizer: [\w -]+?(?= \(|$)|runtime error: [^\n]{0,60})", re.M)


def headline(failed, out):
    """{failed test: why}, a sanitizer test's why being the sanitizer's own first headline in its report."""
    for test in failed:
        if "sanitizer" in test:
            section = out.split(f"_ {test.split('::')[-1]} _", 1)[-1].split("\n____", 1)[0]
            found = HEADLINE.search(section)
            failed[test] = found.group(1) if found else failed[test]
    return failed


def describe(failed):
    """Failed tests grouped by test function: 'file::test x3: why'."""
    groups = {}
    for test, why in failed.items():
        groups.setdefault(test.split("[")[0], []).append(why)
    lines = []
    for name, whys in groups.items():
        sanitizer = sorted({w for w in whys if "Sanitizer" in w or "runtime error" in w})
        why = "; ".join(sanitizer) or next((w for w in whys if "died" in w), "") or next(filter(None, whys), "")
        lines.append(f"    {name}" + (f" x{len(whys)}" if len(whys) > 1 else "") + (f": {why[:110]}" if why else ""))
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(scratch.ROOT, "results", "kernel_mutants.txt"), help="the log")
    ap.add_argument("--tests", nargs="*", default=["tests"], help="what pytest runs (default: the README's: tests)")
    ap.add_argument("--only", type=int, default=None,
                    help=f"one mutant by its number (1..{len(MUTANTS)}); 0 = the control")
    args = ap.parse_args()
    lines = [f"# python scripts/kernel_mutants.py: each bug planted alone in a scratch copy of {scratch.commit()}, "
             f"then `python -m pytest -q {' '.join(args.tests)}` there (-vv -rf for the report)",
             f"# {scratch.machine()}", ""]
    chosen = range(len(MUTANTS) + 1) if args.only is None else [args.only]
    uncaught = []
    for i in chosen:
        what = f"mutant {i}: {MUTANTS[i - 1][0]} ({MUTANTS[i - 1][1]})" if i else "control: nothing planted"
        print(f"[mutants] {what} ...", flush=True)
        with tempfile.TemporaryDirectory() as dest:
            scratch.copy_repo(dest)
            if i:
                scratch.patch(dest, *MUTANTS[i - 1][1:])
            summary, failed, seconds, out = scratch.pytest(dest, args.tests)
        failed = headline(failed, out)
        if i:
            verdict = "caught" if failed else "NOT CAUGHT"
        else:
            verdict = "passes" if not failed and "passed" in summary else "FAILS"
        if verdict in ("NOT CAUGHT", "FAILS"):
            uncaught.append(what)
        block = [what, f"  {verdict}: {summary} ({seconds:.0f} s)"] + describe(failed) + [""]
        print("\n".join(block), flush=True)
        lines += block
    lines.append(f"every planted bug caught: {'yes' if not uncaught else 'NO: ' + '; '.join(uncaught)}")
    scratch.finish(args.out, lines, "mutants", uncaught)


if __name__ == "__main__":
    main()
